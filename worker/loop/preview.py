"""A running job's preview: its current estimate of the image, small, as a WebP data URL on the event stream.

The sampler's denoised estimate (SamplerState.d: latents in the scaled space the VAE decodes, (C, h, w)) is
mapped to RGB by a fixed linear map per pixel, on the host in numpy: no VAE, no device program, no compile. A
1024 px image's latents are 128x128, already under PREVIEW_MAX_SIDE_PX, so the preview is one small matrix
product and one WebP encode (a few ms on the CPU; docs/benchmarks.md has its cost to a batch).

The map: SDXL's latent-to-RGB factors as ComfyUI publishes them (comfy/latent_formats.py, class SDXL): a least
squares fit of the VAE's decoded colours, RGB in [-1, 1], on latents that include the 0.13025 scaling. These
are numbers (a fit of SDXL's VAE), not code; they describe any model with SDXL's VAE, and nothing else: a model
with another latent space (tests' tiny one is random) gets plausible colours, not its image.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

PREVIEW_MAX_SIDE_PX = 256  # the preview's long side at most: small on the wire and in the job record
PREVIEW_MAX_BYTES = 64 * 1024  # a data URL longer than this is dropped (a 256 px WebP is usually 3-15 KiB)
WEBP_QUALITY = 70  # a preview is a glimpse: smaller beats sharper

# (4 latent channels, RGB); RGB = latents @ factors + bias, in [-1, 1]
SDXL_LATENT_RGB = np.array(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    np.float32,
)
SDXL_LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], np.float32)


def latent_rgb(latents: np.ndarray) -> np.ndarray:
    """(4, h, w) scaled latents -> (h, w, 3) uint8 by the fixed map. Non-finite values draw as black."""
    if latents.ndim != 3 or latents.shape[0] != SDXL_LATENT_RGB.shape[0]:
        raise ValueError(f"expected (4, h, w) latents, got {latents.shape}")
    hwc = np.moveaxis(np.asarray(latents, np.float32), 0, -1)  # (h, w, 4)
    rgb = hwc @ SDXL_LATENT_RGB + SDXL_LATENT_RGB_BIAS  # (h, w, 3) in about [-1, 1]
    rgb = np.nan_to_num(rgb, nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)


def webp_data_url(rgb: np.ndarray, max_side_px: int = PREVIEW_MAX_SIDE_PX) -> str | None:
    """(h, w, 3) uint8 -> "data:image/webp;base64,...", shrunk to at most max_side_px on its long side (never
    enlarged); None when it would pass PREVIEW_MAX_BYTES (then no preview is better than a heavy event)."""
    image = Image.fromarray(rgb, "RGB")
    if max(image.size) > max_side_px:
        image.thumbnail((max_side_px, max_side_px), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=0)  # method 0: the fastest encoder
    url = "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()
    return url if len(url) <= PREVIEW_MAX_BYTES else None


def preview(latents: np.ndarray) -> str | None:
    """A row's denoised estimate (4, h, w) as a preview data URL."""
    return webp_data_url(latent_rgb(latents))


def due(done: int, last: int, steps: int, every_steps: int) -> bool:
    """Whether a report at `done` steps carries a preview: `every_steps` since the last one (`last`, 0 at the
    start), and not at the last step (the image itself comes next)."""
    return done < steps and done - last >= every_steps
