"""Photo-like test pictures: what a client usually sends as an init image, made without a file.

Random pixels (the other tests' pictures) compress like nothing real: a JPEG of them is as large as a PNG. A
photo is mostly smooth regions, a few edges and some sensor noise; this makes the same from a seed: a coarse
random field enlarged (regions), a ripple (edges and texture) and Gaussian noise (sigma 4 levels).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    regions = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    ripple = (np.sin(xx / 7.0) * np.cos(yy / 11.0) * 30).astype(np.int16)[..., None]
    noise = rng.normal(0, 4, regions.shape).astype(np.int16)
    return Image.fromarray(np.clip(regions + ripple + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | options)
    return out.getvalue()
