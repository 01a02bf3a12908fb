"""A UNet-only weights file for the tiny model, as SDXL-Lightning ships its distilled UNet
(`sdxl_lightning_4step_unet.safetensors`: diffusers' UNet layout, no config): the tiny UNet's weights, each
moved by a fixed amount, so the same file is made wherever this runs (make_sampling_reference.py, the tests)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def write(tiny_dir: Path, path: Path) -> Path:
    state = load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = {}
    for name, value in sorted(state.items()):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        scale = float(np.abs(value).mean()) or 1.0
        moved[name] = (value + 0.3 * scale * rng.standard_normal(value.shape)).astype(value.dtype)
    save_file(moved, path)
    return path
