"""How an engine draws a running batch's row for a preview (worker/loop/preview.py makes the WebP): the row's
denoised estimate after a chunk of steps (SamplerState.d: latents in the scaled space the VAE decodes) as RGB.

Two decoders:
- TAESD (taesd.py), when the engine serves one (SDXL_PREVIEW_DECODER): a compiled program per shape (`preview`,
  compiled at start with the served ones), which takes the batch's estimate where it is, on the devices, picks
  the row, decodes it and shrinks it to 256 px there: only the small picture's bytes leave the device. One row a
  call, so a batch pays for the jobs that asked, not for every row. TAESD-XL decodes a 1024 px row in about
  0.56 TFLOP (its 64-wide convolutions at full size, counted from its shapes): seconds on a CPU
  (docs/benchmarks.md, "Previews"), an accelerator's business.
- Otherwise SDXL's fixed latent-to-RGB map, on the host in numpy: the batch's estimate copied off the device
  (small: 128x128x4 per 1024 px row), one matrix product per pixel, the latents' own size (128 px for 1024).

The map: SDXL's latent-to-RGB factors as ComfyUI publishes them (comfy/latent_formats.py, class SDXL): a least
squares fit of the VAE's decoded colours, RGB in [-1, 1], on latents that include the 0.13025 scaling. These
are numbers (a fit of SDXL's VAE), not code; they describe any model with SDXL's VAE, and nothing else: a model
with another latent space (tests' tiny one is random) gets plausible colours, not its image.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from worker.engine.executables import Executables
from worker.engine.program_kind import Part, ProgramKind
from worker.engine.taesd import PreviewDecoder

PREVIEW = ProgramKind(Part.preview)

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


class Previews:
    """An engine's preview decoder: TAESD's weights on every device (replicated) and its compiled program, or the
    fixed map when `decoder` is None."""

    def __init__(self, decoder: PreviewDecoder | None, executables: Executables, replicated: Any):
        self.decoder = decoder
        self.executables = executables
        self.params = None if decoder is None else jax.device_put(decoder.params, replicated)

    def draw(self, estimate: Any, row: int, size: tuple[int, int]) -> np.ndarray:
        """Row `row` of a batch's estimate (batch_rows, C, h, w), on the devices, for an image of `size` (height,
        width) -> (H, W, 3) uint8: TAESD's picture (at most 256 px on its long side) or the fixed map's."""
        if self.params is None:
            return latent_rgb(np.asarray(estimate, np.float32)[row])  # the host copy is kept by the array
        program = self.executables.get(PREVIEW, *size)
        return np.asarray(program(self.params, estimate, np.int32(row)))[0]
