"""Make the parity fixture for IP-Adapters (issue 34) from PyTorch diffusers (test extras only; the tests read the
output, they do not run this):

    .venv/bin/python tests/worker/engine/make_ip_adapter_reference.py tests/worker/engine/fixtures/ip_adapters.npz

Same tiny weights as make_reference.py (worker/engine/tiny.py, float32, CPU) and fixed initial latents. One random
IP-Adapter for the tiny model (tests/helpers/variants.py's write_ip_adapter: diffusers' load_ip_adapter layout and
a tiny CLIPVisionModelWithProjection beside it), loaded with StableDiffusionXLPipeline.load_ip_adapter.

- "pixels/{a,b}": the pipeline's feature extractor (CLIPImageProcessor) on the two images, "embeds/{a,b}" the
  image encoder's image_embeds;
- "unet/*": the UNet with the adapter's processors alone on fixed inputs (two rows, timesteps 999 and 500, image
  embeds of "a" and "b"), scale 0.7;
- "{case}/image": StableDiffusionXLPipeline with ip_adapter_image "a" at the case's scale.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from worker.engine import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: tests.helpers
from make_reference import weights_digest

from tests.helpers import variants

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, STEPS, SEED, GUIDANCE = 64, 64, 3, 4, 5.0
ADAPTER_SEED = 31
CASES = {"half": ("a", 0.5), "full": ("a", 1.0)}  # name: (image, scale)


def picture(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth picture with some noise, not square (the processor's resize and centre crop both act)."""
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([yy * (seed % 7 + 2), xx * 3, (xx + yy) * 2], -1)
    return ((noise * 0.3 + smooth * 0.7) % 256).astype(np.uint8)


def unet_call(pipe: StableDiffusionXLPipeline, embeds: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    inputs = {
        "sample": rng.standard_normal((2, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32),
        "timesteps": np.array([999.0, 500.0], np.float32),
        "context": rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32),
        "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
        "time_ids": np.array([[64, 64, 0, 0, 64, 64], [128, 96, 8, 0, 64, 64]], np.float32),
        "image_embeds": embeds,
    }
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    pipe.set_ip_adapter_scale(0.7)
    with torch.no_grad():
        out = pipe.unet(
            t["sample"],
            t["timesteps"],
            encoder_hidden_states=t["context"],
            added_cond_kwargs={
                "text_embeds": t["text_embeds"],
                "time_ids": t["time_ids"],
                "image_embeds": [t["image_embeds"][:, None]],
            },
            return_dict=False,
        )[0]
    return {f"unet/in/{k}": v for k, v in inputs.items()} | {"unet/out": out.numpy()}


def main(out: str) -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sdxl-ip-adapter-"))
    folder = work / "tiny"
    tiny.write(folder)
    weights = variants.write_ip_adapter(folder, work / "ip-adapter", ADAPTER_SEED)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name)
    pipe.set_progress_bar_config(disable=True)
    print("processors:", [k for k, v in pipe.unet.attn_processors.items() if "IPAdapter" in type(v).__name__])
    images = {"a": picture(41, 40, 48), "b": picture(42, 48, 36)}
    arrays: dict[str, np.ndarray] = {f"ip/{k}": v for k, v in images.items()}
    for name, image in images.items():
        pixels = pipe.feature_extractor(Image.fromarray(image), return_tensors="pt").pixel_values
        with torch.no_grad():
            arrays[f"embeds/{name}"] = pipe.image_encoder(pixels).image_embeds.numpy()
        arrays[f"pixels/{name}"] = pixels.numpy()
    arrays |= unet_call(pipe, np.concatenate([arrays["embeds/a"], arrays["embeds/b"]]))
    latents = np.random.default_rng(SEED).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    arrays["latents"] = latents
    for case, (image, scale) in CASES.items():
        pipe.set_ip_adapter_scale(scale)
        result = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            guidance_scale=GUIDANCE,
            num_inference_steps=STEPS,
            height=HEIGHT,
            width=WIDTH,
            ip_adapter_image=Image.fromarray(images[image]),
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
        "adapter_seed": ADAPTER_SEED,
        "cases": CASES,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["weights_sha256"] = np.frombuffer(weights_digest(folder).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
