"""Make the parity fixture for LoRA adapters (issue: LoRA adapters per request) from PyTorch diffusers with PEFT
(test extras only; the tests read the output, they do not run this):

    .venv/bin/python tests/worker/engine/make_lora_reference.py tests/worker/engine/fixtures/loras.npz

Same tiny weights as make_reference.py (worker/engine/tiny.py, float32, CPU) and fixed initial latents. Two
adapters made by tests/helpers/variants.py (write_lora), loaded with diffusers' `load_lora_weights` and
weighted with `set_adapters`:
- "kohya": kohya's layout (lora_unet_input_blocks_..., lora_te1_, lora_te2_), rank 4, alpha 2 (so alpha/rank
  matters), on the UNet and both text encoders;
- "peft": diffusers/PEFT's layout (unet.down_blocks..., lora_A/lora_B), rank 8, no alpha, on the UNet and the
  second text encoder only;
- alpha from the PEFT config diffusers writes into the header (`lora_adapter_metadata`), never `.alpha` keys:
  "peft-alpha-up" alpha 8 at rank 4 (UNet, first text encoder), "peft-alpha-down" alpha 4 at rank 8 with an
  alpha_pattern of 16 on the cross-attention keys (UNet, second text encoder), "peft-te" alpha 1 at rank 4 on the
  first text encoder alone; each header is checked equal to the one diffusers' own save_lora_weights writes for
  the same tensors and config, and diffusers loads the file it wrote itself;
- "old-keys": diffusers' older key names (attention processors' `to_q_lora.down`, `.lora.down`, the text
  encoder's `lora_linear_layer`), alpha 2 at rank 4 from the metadata.
Cases: each adapter at scale 1.0, the first two at 0.5 too, both of those at once (0.7 and 0.4), and none.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from peft import LoraConfig
from safetensors import safe_open
from safetensors.numpy import load_file

from worker.engine import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: tests.helpers
from make_reference import weights_digest

from tests.helpers import variants

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, STEPS, SEED, GUIDANCE = 64, 64, 4, 3, 5.0
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_config(rank: int, alpha: float, modules: list[str], **more) -> dict:
    """A LoraConfig as diffusers' save_lora_weights stores it (its to_dict, sets as lists)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, **more).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


ADAPTERS = {
    "kohya": {"layout": "kohya", "rank": 4, "seed": 11, "alpha": 2.0},
    "peft": {"layout": "diffusers", "rank": 8, "seed": 12, "parts": ("unet", "text_encoder_2")},
    "peft-alpha-up": {
        "layout": "diffusers",
        "rank": 4,
        "seed": 13,
        "strength": 0.15,  # alpha/rank 2: at 0.6 a 1e-5 change of its scale moved the image by 0.25
        "parts": ("unet", "text_encoder"),
        "peft": {"unet": peft_config(4, 8, UNET_MODULES), "text_encoder": peft_config(4, 8, TEXT_MODULES)},
    },
    "peft-alpha-down": {
        "layout": "diffusers",
        "rank": 8,
        "seed": 14,
        "parts": ("unet", "text_encoder_2"),
        "peft": {
            "unet": peft_config(8, 4, UNET_MODULES, alpha_pattern={"attn2.to_k": 16}),
            "text_encoder_2": peft_config(8, 4, TEXT_MODULES),
        },
    },
    "peft-te": {
        "layout": "diffusers",
        "rank": 4,
        "seed": 15,
        "parts": ("text_encoder",),
        "peft": {"text_encoder": peft_config(4, 1, TEXT_MODULES)},
    },
    "old-keys": {
        "layout": "diffusers-old",
        "rank": 4,
        "seed": 16,
        "parts": ("unet", "text_encoder"),
        "peft": {"unet": peft_config(4, 2, UNET_MODULES), "text_encoder": peft_config(4, 2, TEXT_MODULES)},
    },
}
CASES = {
    "none": [],
    "kohya/1.0": [("kohya", 1.0)],
    "kohya/0.5": [("kohya", 0.5)],
    "peft/1.0": [("peft", 1.0)],
    "peft/0.5": [("peft", 0.5)],
    "both": [("kohya", 0.7), ("peft", 0.4)],
    "peft-alpha-up/1.0": [("peft-alpha-up", 1.0)],
    "peft-alpha-down/1.0": [("peft-alpha-down", 1.0)],
    "peft-te/1.0": [("peft-te", 1.0)],
    "old-keys/1.0": [("old-keys", 1.0)],
}


def write_adapters(tiny_dir: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        name: variants.write_lora(tiny_dir, folder / f"{name}.safetensors", **spec)  # type: ignore[arg-type]
        for name, spec in ADAPTERS.items()
    }


def saved_by_diffusers(path: Path, spec: dict, folder: Path) -> Path:
    """The same tensors and PEFT configs saved by diffusers' own save_lora_weights; its header's metadata must be
    what tests/helpers/variants.py wrote (the tests write their adapters with that, no torch)."""
    state = {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    layers = {
        part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
        for part in spec["parts"]
    }
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        unet_lora_adapter_metadata=spec["peft"].get("unet"),
        text_encoder_lora_adapter_metadata=spec["peft"].get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=spec["peft"].get("text_encoder_2"),
        weight_name=path.name,
    )
    theirs = folder / path.name
    with safe_open(path, "np") as ours, safe_open(theirs, "np") as written:
        assert ours.metadata() == written.metadata(), (ours.metadata(), written.metadata())
        assert sorted(ours.keys()) == sorted(written.keys())
    return theirs


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
        if ADAPTERS[name]["layout"] == "diffusers" and "peft" in ADAPTERS[name]:
            path = saved_by_diffusers(path, ADAPTERS[name], work / "diffusers" / name)
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
