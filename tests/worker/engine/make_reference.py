"""Make the parity fixtures from PyTorch diffusers (needs torch; CI does not run this, it reads the output).

    python -c 'from pathlib import Path; from worker.engine import tiny; tiny.write(Path("/tmp/tiny"))'
    pip install torch==2.13.0 diffusers==0.39.0 transformers==4.57.1
    python tests/worker/engine/make_reference.py /tmp/tiny tests/worker/engine/fixtures/reference.npz

For each case it runs diffusers' StableDiffusionXLPipeline (float32, CPU) on the tiny model's PyTorch-layout
safetensors with fixed initial latents, and stores the float32 images, plus the schedulers' sigma and
timestep tables for several step counts. Loading the folder in PyTorch also checks that the tiny model's
safetensors use PyTorch's parameter names (diffusers warns on missing or unexpected keys; we fail on it).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

CASES = [
    # name, scheduler, prompt, negative prompt (None: zero embeddings), guidance, steps, height, width, seed
    ("euler_wide", "euler", "a photo of an astronaut riding a horse", "blurry, low quality", 7.5, 8, 64, 96, 1),
    ("euler_noneg", "euler", "a watercolor fox in the snow", None, 5.0, 6, 64, 64, 2),
    ("ddim_wide", "ddim", "a photo of an astronaut riding a horse", "blurry, low quality", 7.5, 8, 64, 96, 1),
    (
        "dpmpp_wide",
        "dpmpp_2m_karras",
        "a photo of an astronaut riding a horse",
        "blurry, low quality",
        7.5,
        8,
        64,
        96,
        1,
    ),
]
TABLE_STEPS = (1, 4, 20, 37, 150)


def scheduler_for(name: str, config: dict) -> object:
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True)


def weights_digest(folder: str) -> str:
    """The same digest as tests/worker/engine/conftest.py: a fixture made from other weights is refused."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_names(folder: str) -> None:
    """Every weight in the safetensors has PyTorch's name and every PyTorch weight is there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    for cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    print("weight names match PyTorch's")


def main(folder: str, out: str) -> None:
    torch.manual_seed(0)
    check_names(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for name, sched, prompt, neg, guidance, steps, h, w, seed in CASES:
        pipe.scheduler = scheduler_for(sched, config)
        latents = np.random.default_rng(seed).standard_normal((1, 4, h // 8, w // 8)).astype(np.float32)
        image = pipe(
            prompt=prompt,
            negative_prompt=neg,
            guidance_scale=guidance,
            num_inference_steps=steps,
            height=h,
            width=w,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images
        arrays[f"{name}/latents"] = latents
        arrays[f"{name}/image"] = image.astype(np.float32)
        meta.append(
            {
                "name": name,
                "scheduler": sched,
                "prompt": prompt,
                "negative_prompt": neg or "",
                "guidance_scale": guidance,
                "steps": steps,
                "height": h,
                "width": w,
            }
        )
        print(name, image.shape, float(image.mean()), float(image.std()))
    for sched in ("euler", "ddim", "dpmpp_2m_karras"):
        for steps in TABLE_STEPS:
            s = scheduler_for(sched, config)
            s.set_timesteps(steps)
            arrays[f"table/{sched}/{steps}/timesteps"] = s.timesteps.numpy().astype(np.float64)
            if hasattr(s, "sigmas"):
                arrays[f"table/{sched}/{steps}/sigmas"] = s.sigmas.numpy().astype(np.float64)
            arrays[f"table/{sched}/{steps}/init_noise_sigma"] = np.float64(s.init_noise_sigma)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["weights_sha256"] = np.frombuffer(weights_digest(folder).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
