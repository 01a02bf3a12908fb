"""Make the parity fixture for serving a model with parts replaced (issue: several models per deployment, VAE
override) from PyTorch diffusers (test extras only; the tests read the output, they do not run this):

    .venv/bin/python tests/worker/engine/make_models_reference.py tests/worker/engine/fixtures/models.npz

The tiny model (worker/engine/tiny.py, float32, CPU) with another VAE (tests/helpers/variants.py: moved
weights and another scaling factor) passed to diffusers' pipelines as `vae=AutoencoderKL.from_pretrained(...)`:
StableDiffusionXLPipeline (the decode), and StableDiffusionXLImg2ImgPipeline at strength 0.6 (the encoder too;
its starting noise and the encoder's sample handed in as in make_sampling_reference.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module
from PIL import Image

from worker.engine import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: tests.helpers
from make_reference import weights_digest
from make_sampling_reference import fixed, mode_latents

from tests.helpers import variants
from tests.helpers.variants import folder_digest

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, STEPS, SEED = 64, 96, 6, 1


def main(out: str) -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sdxl-models-"))
    folder = work / "tiny"
    tiny.write(folder)
    vae_folder = variants.write_vae(folder, work / "other-vae")
    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32)
    assert vae.config.scaling_factor == variants.VAE_SCALING_FACTOR
    latents = np.random.default_rng(SEED).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    image = np.random.default_rng(5).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    arrays: dict[str, np.ndarray] = {"latents": latents, "image": image}
    cases = []

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, vae=vae, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    result = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=7.5,
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    arrays["vae_override/text2img/image"] = result.astype(np.float32)
    cases.append({"name": "vae_override/text2img"})

    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img_module.randn_tensor = fixed(latents)
    img2img_module.retrieve_latents = mode_latents
    result = img2img(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=Image.fromarray(image),
        strength=0.6,
        guidance_scale=7.5,
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    arrays["vae_override/img2img/image"] = result.astype(np.float32)
    cases.append({"name": "vae_override/img2img", "strength": 0.6})

    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "height": HEIGHT,
        "width": WIDTH,
        "steps": STEPS,
        "seed": SEED,
        "cases": cases,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["weights_sha256"] = np.frombuffer(weights_digest(folder).encode(), dtype=np.uint8)
    arrays["vae_sha256"] = np.frombuffer(folder_digest(vae_folder).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)
    for case in cases:
        print(case["name"], float(arrays[f"{case['name']}/image"].mean()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1])
