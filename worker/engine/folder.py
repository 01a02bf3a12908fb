"""Reading a diffusers-format SDXL folder (model_index.json, one folder per component, PyTorch-layout
safetensors, variants such as fp16), and the overrides that take one component from elsewhere: another UNet's
weights (with_unet) or another VAE (with_vae), on any Source.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.model_source import (
    COMPONENTS,
    WEIGHT_STEMS,
    Component,
    Configs,
    LoadOptions,
    ModelError,
    Source,
    convert_component,
    locate_weights,
    read_state,
)
from worker.engine.unet import UNetConfig
from worker.engine.vae import VAEConfig


def read_component(root: Path, part: str, variant: str = "") -> dict[str, np.ndarray]:
    """One component of a diffusers folder as its PyTorch-layout state dict (views on memory maps)."""
    return read_state(locate_weights(root / part, WEIGHT_STEMS[part], variant))


def check(root: Path) -> None:
    if not (root / "model_index.json").exists():
        raise ModelError(f"{root} is not a diffusers SDXL folder (no model_index.json)")
    index = json.loads((root / "model_index.json").read_text())
    for part in (*COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"):
        if part in ("text_encoder", "tokenizer") and index.get(part, [None])[0] is None and part in index:
            continue  # the refiner's model_index says [null, null]
        if not (root / part).is_dir():
            raise ModelError(f"{root} has no {part}/ folder; an SDXL model needs {part}")


def source(root: Path, name: str, options: LoadOptions) -> Source:
    """A diffusers SDXL folder: configs, tokenizers and scheduler from it, weights from its safetensors."""
    check(root)
    present = [part for part in COMPONENTS if (root / part / "config.json").exists()]
    configs = Configs.from_dicts(
        {part: json.loads((root / part / "config.json").read_text()) for part in present}, str(root)
    )
    files = {part: locate_weights(root / part, WEIGHT_STEMS[part], options.variant) for part in configs.parts}
    index = json.loads((root / "model_index.json").read_text())

    def weights(part: str, shapes: Any, dtype: Any) -> Component:
        what = str(root / part)
        return convert_component(
            part, lambda: read_state(files[part]), files[part], shapes, dtype, options.weight_cache_dir, what
        )

    return Source(
        name=name,
        configs=configs,
        tokenizer_dir=root,
        scheduler=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        weights=weights,
    )


def with_vae(source: Source, path: Path, weight_cache_dir: Path | None) -> Source:
    """The model with another VAE: a diffusers AutoencoderKL folder (config.json and its weights), such as
    madebyollin/sdxl-vae-fp16-fix or the VAE a fine-tune ships. Its config replaces the model's (scaling factor,
    latent statistics, force_upcast); it must make the UNet's latent channels. The name says so."""
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelError(f"VAE {path}: not a diffusers AutoencoderKL folder (no config.json)")
    try:
        vae = VAEConfig.from_diffusers(json.loads(config_path.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"VAE {path}: {exc}") from exc
    if vae.latent_channels != source.configs.vae.latent_channels:
        raise ModelError(
            f"VAE {path}: makes {vae.latent_channels} latent channels, the model's UNet takes "
            f"{source.configs.vae.latent_channels}"
        )
    files = locate_weights(path, WEIGHT_STEMS["vae"])
    base = source.weights

    def weights(part: str, shapes: Any, dtype: Any) -> Component:
        if part != "vae":
            return base(part, shapes, dtype)
        return convert_component("vae", lambda: read_state(files), files, shapes, dtype, weight_cache_dir, str(path))

    configs = dataclasses.replace(source.configs, vae=vae)
    return dataclasses.replace(source, name=f"{source.name}+vae:{path.name}", configs=configs, weights=weights)


def with_unet(source: Source, path: Path, weight_cache_dir: Path | None) -> Source:
    """The model with its UNet's weights read from another file: a UNet-only .safetensors in diffusers' layout
    (how SDXL-Lightning ships `sdxl_lightning_4step_unet.safetensors`) or a diffusers UNet folder, of the same
    architecture (a folder's config.json must agree). The name says so, and the weights' hash follows."""
    if path.is_dir():
        config = path / "config.json"
        if config.exists():
            theirs = UNetConfig.from_diffusers(json.loads(config.read_text()), source.configs.unet.pooled_width)
            if theirs != source.configs.unet:
                raise ModelError(f"UNet {path}: its config.json is not the model's UNet architecture")
        files = locate_weights(path, WEIGHT_STEMS["unet"])
    elif path.is_file():
        files = [path]
    else:
        raise ModelError(f"UNet {path}: no such file or folder")
    base = source.weights

    def weights(part: str, shapes: Any, dtype: Any) -> Component:
        if part != "unet":
            return base(part, shapes, dtype)
        return convert_component("unet", lambda: read_state(files), files, shapes, dtype, weight_cache_dir, str(path))

    return dataclasses.replace(source, name=f"{source.name}+unet:{path.name}", weights=weights)
