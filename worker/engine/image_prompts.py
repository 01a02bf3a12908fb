"""A row's image prompt as the caller names it (ImagePrompt), checked, and a batch's IP-Adapter inputs made on the
host: each served adapter's encoder pixels per row and its scale per row (arguments.ImageInputs). A row uses at
most one adapter; the others, and rows without one, get scale 0 (their term is exactly zero), so every row shares
the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.engine.clip_vision import preprocess


class ImagePromptError(ValueError):
    """A row's image prompt that cannot run; the message names the adapter."""


@dataclass(frozen=True)
class ImagePrompt:
    """An IP-Adapter on one row: its served name (never a path), the image (H, W, 3) uint8 at any size (the
    encoder's processor resizes and crops it) and the scale of its attention."""

    name: str
    image: np.ndarray
    scale: float = 1.0


def check(prompt: ImagePrompt | None, served: Sequence[str]) -> None:
    if prompt is None:
        return
    if not served:
        raise ImagePromptError("this engine serves no IP-Adapters")
    if prompt.name not in served:
        raise ImagePromptError(f"no IP-Adapter named {prompt.name!r}; served: {', '.join(served)}")
    if not math.isfinite(prompt.scale):
        raise ImagePromptError(f"{prompt.name!r}: scale must be a finite number, got {prompt.scale}")
    image = prompt.image
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ImagePromptError(f"{prompt.name!r}: the image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")


def tables(rows: Sequence[ImagePrompt | None], served: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (rows, adapters, 3, size, size) normalized as CLIP's processor, scales (rows, adapters)) in
    `served`'s order: an adapter a row does not use has zero pixels and scale 0."""
    pixels = np.zeros((len(rows), len(served), 3, size, size), np.float32)
    scales = np.zeros((len(rows), len(served)), np.float32)
    for r, prompt in enumerate(rows):
        if prompt is not None:
            k = served.index(prompt.name)
            pixels[r, k] = preprocess(prompt.image, size)
            scales[r, k] = prompt.scale
    return pixels, scales
