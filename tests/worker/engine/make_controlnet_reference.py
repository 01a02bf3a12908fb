"""Make the parity fixture for ControlNets (issue 34) from PyTorch diffusers (test extras only; the tests read the
output, they do not run this):

    .venv/bin/python tests/worker/engine/make_controlnet_reference.py tests/worker/engine/fixtures/controlnets.npz

Same tiny weights as make_reference.py (worker/engine/tiny.py, float32, CPU) and fixed initial latents. Two
random ControlNets for the tiny model ("a", "b": tests/helpers/variants.py's write_controlnet, their zero
convolutions random too) loaded with diffusers' ControlNetModel.from_pretrained. What diffusers draws itself
is handed in as in make_sampling_reference.py: image-to-image's and inpainting's starting noise is the fixed
latents, and the VAE encoder's sample its mode.

- "residuals": ControlNetModel "a" alone on fixed inputs (two rows, timesteps 999 and 500), scale 1;
- StableDiffusionXLControlNetPipeline: "one" ("a" at 1.0), "scaled" ("a" at 0.5), "window" ("a" at 1.0 from
  0.3 to 0.7 of the steps: the middle step alone), "two" (MultiControlNet: "a" at 0.7, "b" at 0.5 until 0.6);
- "img2img": StableDiffusionXLControlNetImg2ImgPipeline, "a" at 0.8, strength 0.7;
- "inpaint": StableDiffusionXLControlNetInpaintPipeline (the base UNet: its mask blending), "a" at 0.8,
  strength 0.75.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint_sd_xl as inpaint_module
from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img as img2img_module
from PIL import Image

from worker.engine import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: tests.helpers
from make_reference import weights_digest

from tests.helpers import variants

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, STEPS, SEED, GUIDANCE = 64, 64, 3, 4, 5.0
CONTROLNETS = {"a": 21, "b": 22}  # name: write_controlnet's seed
# name: ([(controlnet, control image, scale, start, end)], pipeline, strength)
CASES = {
    "one": ([("a", "a", 1.0, 0.0, 1.0)], "text", None),
    "scaled": ([("a", "a", 0.5, 0.0, 1.0)], "text", None),
    "window": ([("a", "a", 1.0, 0.3, 0.7)], "text", None),
    "two": ([("a", "a", 0.7, 0.0, 1.0), ("b", "b", 0.5, 0.0, 0.6)], "text", None),
    "img2img": ([("a", "a", 0.8, 0.0, 1.0)], "img2img", 0.7),
    "inpaint": ([("a", "a", 0.8, 0.0, 1.0)], "inpaint", 0.75),
}


def picture(seed: int, fx: int, fy: int) -> np.ndarray:
    """A smooth picture with some noise: the init image."""
    noise = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8).astype(np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    smooth = np.stack([yy * fy, xx * fx, (xx + yy) * 2], -1)
    return ((noise * 0.3 + smooth * 0.7) % 256).astype(np.uint8)


def edges(kind: str) -> np.ndarray:
    """A control map as an edge detector draws one: white lines on black (a ring, or slanted stripes)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    if kind == "ring":
        radius = np.hypot(yy - HEIGHT / 2, xx - WIDTH / 3)
        lines = np.abs(radius - HEIGHT / 4) < 1.5
    else:
        lines = (xx + 2 * yy) % 16 < 2
    return np.repeat((lines * 255).astype(np.uint8)[..., None], 3, axis=-1)


def fixed(latents: np.ndarray):
    return lambda shape, generator=None, device=None, dtype=None, layout=None: torch.from_numpy(latents.copy())


def mode_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def residuals(controlnet: ControlNetModel, cond: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    inputs = {
        "sample": rng.standard_normal((2, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32),
        "timesteps": np.array([999.0, 500.0], np.float32),
        "context": rng.standard_normal((2, 77, 80)).astype(np.float32),
        "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
        "time_ids": np.array([[64, 64, 0, 0, 64, 64], [128, 96, 8, 0, 64, 64]], np.float32),
        "cond": cond,
    }
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        down, mid = controlnet(
            t["sample"],
            t["timesteps"],
            encoder_hidden_states=t["context"],
            controlnet_cond=t["cond"],
            conditioning_scale=1.0,
            added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
            return_dict=False,
        )
    out = {f"residuals/in/{k}": v for k, v in inputs.items()}
    out |= {f"residuals/down_{i}": d.numpy() for i, d in enumerate(down)}
    return out | {"residuals/mid": mid.numpy()}


def pick(chosen: list[tuple], i: int) -> object:
    """Field i of the chosen ControlNets: a list for a MultiControlNet, the value for one."""
    return [c[i] for c in chosen] if len(chosen) > 1 else chosen[0][i]


def main(out: str) -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sdxl-controlnet-"))
    folder = work / "tiny"
    tiny.write(folder)
    nets = {
        name: ControlNetModel.from_pretrained(
            variants.write_controlnet(folder, work / f"controlnet-{name}", seed), torch_dtype=torch.float32
        )
        for name, seed in CONTROLNETS.items()
    }
    base = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    latents = np.random.default_rng(SEED).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    controls = {"a": edges("ring"), "b": edges("stripes")}
    image = picture(33, 3, 2)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[16:48, 8:40] = 255
    arrays: dict[str, np.ndarray] = {"latents": latents, "image": image, "mask": mask}
    arrays |= {f"control/{k}": v for k, v in controls.items()}
    cond = np.stack([controls["a"], controls["b"]]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    arrays |= residuals(nets["a"], cond)
    img2img_module.randn_tensor = fixed(latents)
    img2img_module.retrieve_latents = mode_latents
    inpaint_module.randn_tensor = fixed(latents)
    inpaint_module.retrieve_latents = mode_latents
    kinds = {
        "text": StableDiffusionXLControlNetPipeline,
        "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
        "inpaint": StableDiffusionXLControlNetInpaintPipeline,
    }
    for case, (chosen, kind, strength) in CASES.items():
        used = [nets[n] for n, *_ in chosen]
        pipe = kinds[kind](**base.components, controlnet=used if len(used) > 1 else used[0])
        pipe.set_progress_bar_config(disable=True)
        many = len(chosen) > 1
        control = [Image.fromarray(controls[c[1]]) for c in chosen]
        kwargs = {
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "guidance_scale": GUIDANCE,
            "num_inference_steps": STEPS,
            "height": HEIGHT,
            "width": WIDTH,
            "controlnet_conditioning_scale": pick(chosen, 2),
            "control_guidance_start": pick(chosen, 3),
            "control_guidance_end": pick(chosen, 4),
            "output_type": "np",
        }
        if kind == "text":
            kwargs |= {"image": control if many else control[0], "latents": torch.from_numpy(latents)}
        else:
            kwargs |= {"image": Image.fromarray(image), "control_image": control[0], "strength": strength}
        if kind == "inpaint":
            kwargs["mask_image"] = Image.fromarray(mask)
        result = pipe(**kwargs).images
        arrays[f"{case}/image"] = result.astype(np.float32)
        print(case, float(result.mean()), float(result.std()))
    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "height": HEIGHT,
        "width": WIDTH,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "controlnets": CONTROLNETS,
        "cases": CASES,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["weights_sha256"] = np.frombuffer(weights_digest(folder).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
