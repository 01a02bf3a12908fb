"""Make the parity fixture for LoRA adapters (issue: LoRA adapters per request) from PyTorch diffusers with PEFT
(test extras only; the tests read the output, they do not run this):

    .venv/bin/python tests/worker/engine/make_lora_reference.py tests/worker/engine/fixtures/loras.npz

Same tiny weights as make_reference.py (worker/engine/tiny.py, float32, CPU) and fixed initial latents. Two
adapters made by tests/helpers/variants.py (write_lora), loaded with diffusers' `load_lora_weights` and
weighted with `set_adapters`:
- "kohya": kohya's layout (lora_unet_input_blocks_..., lora_te1_, lora_te2_), rank 4, alpha 2 (so alpha/rank
  matters), on the UNet and both text encoders;
- "peft": diffusers/PEFT's layout (unet.down_blocks..., lora_A/lora_B), rank 8, no alpha, on the UNet and the
  second text encoder only.
Cases: each adapter at scales 1.0 and 0.5, both at once (0.7 and 0.4), and no adapter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from worker.engine import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: tests.helpers
from make_reference import weights_digest

from tests.helpers import variants

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, STEPS, SEED, GUIDANCE = 64, 64, 4, 3, 5.0
ADAPTERS = {
    "kohya": {"layout": "kohya", "rank": 4, "seed": 11, "alpha": 2.0},
    "peft": {"layout": "diffusers", "rank": 8, "seed": 12, "parts": ("unet", "text_encoder_2")},
}
CASES = {
    "none": [],
    "kohya/1.0": [("kohya", 1.0)],
    "kohya/0.5": [("kohya", 0.5)],
    "peft/1.0": [("peft", 1.0)],
    "peft/0.5": [("peft", 0.5)],
    "both": [("kohya", 0.7), ("peft", 0.4)],
}


def write_adapters(tiny_dir: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        name: variants.write_lora(tiny_dir, folder / f"{name}.safetensors", **spec)  # type: ignore[arg-type]
        for name, spec in ADAPTERS.items()
    }


def main(out: str) -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sdxl-lora-"))
    folder = work / "tiny"
    tiny.write(folder)
    paths = write_adapters(folder, work / "loras")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for name, path in paths.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    latents = np.random.default_rng(SEED).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    arrays: dict[str, np.ndarray] = {"latents": latents}
    for case, chosen in CASES.items():
        if chosen:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in chosen], adapter_weights=[s for _, s in chosen])
        else:
            pipe.disable_lora()
        result = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            guidance_scale=GUIDANCE,
            num_inference_steps=STEPS,
            height=HEIGHT,
            width=WIDTH,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images
        arrays[f"{case}/image"] = result.astype(np.float32)
        print(case, float(result.mean()), float(result.std()))
    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "height": HEIGHT,
        "width": WIDTH,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "adapters": ADAPTERS,
        "cases": CASES,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["weights_sha256"] = np.frombuffer(weights_digest(folder).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
