"""Make the engine's parity fixture from PyTorch diffusers (the test extras carry torch and diffusers; the
tests read the output, they do not run this):

    .venv/bin/python tests/worker/engine/make_reference.py tests/worker/engine/fixtures/reference.npz

It builds the tiny model (worker/engine/tiny.py) in a temporary folder, writes the same weights as a
single-file checkpoint (single_file.join: the names Stability's checkpoints use) and a copy of the folder
whose model_index.json says force_zeros_for_empty_prompt: false, then for each case runs diffusers'
StableDiffusionXLPipeline (float32, CPU) with fixed initial latents and stores the float32 images:

- every loader (the folder with from_pretrained; the single file with diffusers' own from_single_file,
  offline, configs from the folder) x every scheduler x negative prompt {text, absent (None), ""};
- an absent negative prompt on the force_zeros_for_empty_prompt: false copy;
- DDIM with linspace spacing (diffusers rounds that grid);
- a VAE config with latents_mean/latents_std (applied before the decode);

plus the schedulers' timestep and sigma tables for several step counts and every spacing, and the VAE
encoder's latent mean and log-variance for a fixed image. Loading the folder in PyTorch also checks that the
tiny model's safetensors use PyTorch's parameter names (diffusers warns on missing or unexpected keys; we
fail on it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from worker.engine import single_file, tiny

SCHEDULERS = ("euler", "ddim", "dpmpp_2m_karras")
NEGATIVES = {"text": "blurry, low quality", "absent": None, "empty": ""}
PROMPT = "a photo of an astronaut riding a horse"
HEIGHT, WIDTH, STEPS, GUIDANCE, SEED = 64, 96, 6, 7.5, 1
TABLE_STEPS = (1, 4, 20, 37, 150)
# a VAE whose config carries per-channel latent statistics (as SDXL's does not, and some fine-tunes' do)
LATENT_STATS = {"latents_mean": [0.1, -0.2, 0.3, 0.05], "latents_std": [0.9, 1.1, 1.2, 0.8]}
SPACINGS = ("leading", "linspace", "trailing")


def scheduler_for(name: str, config: dict, **overrides: object) -> object:
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config, **overrides)
    if name == "ddim":
        return DDIMScheduler.from_config(config, **overrides)
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", use_karras_sigmas=True, **overrides
    )


def weights_digest(folder: Path) -> str:
    """The same digest as tests/worker/engine/conftest.py: a fixture made from other weights is refused."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*/*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_names(folder: Path) -> None:
    """Every weight in the safetensors has PyTorch's name and every PyTorch weight is there."""
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    for cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    print("weight names match PyTorch's")


def scheduler_tables(make, schedulers, spacings, steps_list) -> dict[str, np.ndarray]:
    """diffusers' timestep and sigma tables and initial noise scale for each scheduler x spacing x step count;
    make(name, spacing) gives the scheduler."""
    arrays = {}
    for scheduler in schedulers:
        for spacing in spacings:
            for steps in steps_list:
                s = make(scheduler, spacing)
                s.set_timesteps(steps)
                prefix = f"table/{scheduler}/{spacing}/{steps}"
                arrays[f"{prefix}/timesteps"] = s.timesteps.numpy().astype(np.float64)
                if hasattr(s, "sigmas"):
                    arrays[f"{prefix}/sigmas"] = s.sigmas.numpy().astype(np.float64)
                arrays[f"{prefix}/init_noise_sigma"] = np.float64(s.init_noise_sigma)
    return arrays


def run(pipe: StableDiffusionXLPipeline, config: dict, scheduler: str, negative: str | None, **sched) -> np.ndarray:
    pipe.scheduler = scheduler_for(scheduler, config, **sched)
    latents = np.random.default_rng(SEED).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    image = pipe(
        prompt=PROMPT,
        negative_prompt=negative,
        guidance_scale=GUIDANCE,
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    return image.astype(np.float32)


def main(out: str) -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sdxl-reference-"))
    folder = work / "tiny"
    tiny.write(folder)
    check_names(folder)
    single = work / "tiny.safetensors"
    single_file.write(single, *single_file.from_folder(folder))
    no_zeros = work / "tiny-no-zeros"
    shutil.copytree(folder, no_zeros)
    index = json.loads((no_zeros / "model_index.json").read_text()) | {"force_zeros_for_empty_prompt": False}
    (no_zeros / "model_index.json").write_text(json.dumps(index))
    stats = work / "tiny-latents-stats"
    shutil.copytree(folder, stats)
    vae_config = json.loads((stats / "vae" / "config.json").read_text()) | LATENT_STATS
    (stats / "vae" / "config.json").write_text(json.dumps(vae_config))

    pipes = {
        "folder": StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32),
        "single_file": StableDiffusionXLPipeline.from_single_file(
            str(single), config=str(folder), local_files_only=True, torch_dtype=torch.float32
        ),
        "no_zeros": StableDiffusionXLPipeline.from_pretrained(no_zeros, torch_dtype=torch.float32),
        "latents_stats": StableDiffusionXLPipeline.from_pretrained(stats, torch_dtype=torch.float32),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    config = dict(pipes["folder"].scheduler.config)
    latents = np.random.default_rng(SEED).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    arrays: dict[str, np.ndarray] = {"latents": latents}
    cases = []
    for loader in ("folder", "single_file"):
        for scheduler in SCHEDULERS:
            for neg_name, negative in NEGATIVES.items():
                name = f"{loader}/{scheduler}/{neg_name}"
                arrays[f"{name}/image"] = run(pipes[loader], config, scheduler, negative)
                cases.append({"name": name, "loader": loader, "scheduler": scheduler, "negative_prompt": negative})
    arrays["no_zeros/euler/absent/image"] = run(pipes["no_zeros"], config, "euler", None)
    cases.append({"name": "no_zeros/euler/absent", "loader": "no_zeros", "scheduler": "euler", "negative_prompt": None})
    arrays["latents_stats/image"] = run(pipes["latents_stats"], config, "euler", "blurry")
    cases.append(
        {
            "name": "latents_stats",
            "loader": "folder",
            "scheduler": "euler",
            "negative_prompt": "blurry",
            "vae": LATENT_STATS,
        }
    )
    arrays["ddim_linspace/image"] = run(pipes["folder"], config, "ddim", "blurry", timestep_spacing="linspace")
    cases.append(
        {
            "name": "ddim_linspace",
            "loader": "folder",
            "scheduler": "ddim",
            "negative_prompt": "blurry",
            "timestep_spacing": "linspace",
        }
    )

    arrays |= scheduler_tables(
        lambda name, spacing: scheduler_for(name, config, timestep_spacing=spacing), SCHEDULERS, SPACINGS, TABLE_STEPS
    )

    image = np.random.default_rng(3).uniform(-1, 1, (1, 3, HEIGHT, WIDTH)).astype(np.float32)
    with torch.no_grad():
        dist = pipes["folder"].vae.encode(torch.from_numpy(image)).latent_dist
    arrays["vae_encode/image"] = image
    arrays["vae_encode/mean"] = dist.mean.numpy()
    arrays["vae_encode/logvar"] = dist.logvar.numpy()

    meta = {
        "prompt": PROMPT,
        "height": HEIGHT,
        "width": WIDTH,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "cases": cases,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["weights_sha256"] = np.frombuffer(weights_digest(folder).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)
    for case in cases:
        img = arrays[f"{case['name']}/image"]
        print(case["name"], float(img.mean()), float(img.std()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1])
