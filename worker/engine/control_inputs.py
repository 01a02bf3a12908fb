"""A row's ControlNets as the caller names them (Control), checked, and a batch's control inputs made on the host:
each served ControlNet's control image per row and its scale per row and step (arguments.ControlInputs).

The step window is diffusers' control_guidance_start/end: of a row's n steps run, step i uses the ControlNet
unless i / n < start or (i + 1) / n > end (the pipelines' `controlnet_keep`); n is the steps the row runs, after
an image-to-image strength has skipped some, as in diffusers' image-to-image and inpainting pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.vocabulary import MAX_STEPS


class ControlError(ValueError):
    """A row's controls that cannot run; the message names the ControlNet."""


@dataclass(frozen=True)
class Control:
    """One ControlNet on one row: its served name (never a path), the control image (H, W, 3) uint8 at the output
    size (a prepared map: edges, depth, pose, ...), its conditioning scale and the share of the steps it acts on."""

    name: str
    image: np.ndarray
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def check(controls: Sequence[Control], served: Sequence[str], height: int, width: int) -> None:
    """ControlError for a row's controls this engine cannot run (see Control)."""
    if controls and not served:
        raise ControlError("this engine serves no ControlNets")
    names = [c.name for c in controls]
    if len(set(names)) != len(names):
        raise ControlError(f"each ControlNet at most once per image, got {names}")
    for c in controls:
        if c.name not in served:
            raise ControlError(f"no ControlNet named {c.name!r}; served: {', '.join(served)}")
        if not math.isfinite(c.scale):
            raise ControlError(f"{c.name!r}: scale must be a finite number, got {c.scale}")
        if not 0 <= c.start < c.end <= 1:
            raise ControlError(f"{c.name!r}: start and end must satisfy 0 <= start < end <= 1, got {c.start}, {c.end}")
        if c.image.shape != (height, width, 3) or c.image.dtype != np.uint8:
            raise ControlError(
                f"{c.name!r}: the control image must be ({height}, {width}, 3) uint8 (the output size), got "
                f"{c.image.shape} {c.image.dtype}"
            )


def keep(steps: int, start: float, end: float) -> np.ndarray:
    """(MAX_STEPS,) 1.0 where step i of `steps` uses the ControlNet, 0.0 elsewhere (and past the row's steps)."""
    i = np.arange(MAX_STEPS)
    inside = ~((i / steps < start) | ((i + 1) / steps > end)) & (i < steps)
    return inside.astype(np.float32)


def tables(
    rows: Sequence[Sequence[Control]], steps: Sequence[int], served: Sequence[str], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images (rows, ControlNets, 3, H, W) in [0, 1], scales (rows, ControlNets, MAX_STEPS)) in `served`'s order:
    a ControlNet a row does not use has a zero image and zero scales. steps: each row's steps run."""
    images = np.zeros((len(rows), len(served), 3, height, width), np.float32)
    scales = np.zeros((len(rows), len(served), MAX_STEPS), np.float32)
    for r, (controls, n) in enumerate(zip(rows, steps, strict=True)):
        for c in controls:
            k = served.index(c.name)
            # diffusers' control image processor: RGB, [0, 255] -> [0, 1], not normalized to [-1, 1]
            images[r, k] = c.image.astype(np.float32).transpose(2, 0, 1) / 255.0
            scales[r, k] = c.scale * keep(n, c.start, c.end)
    return images, scales
