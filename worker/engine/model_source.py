"""The base of the model loader: what every way of reading a model shares, below the readers of diffusers
folders (folder.py) and single-file checkpoints (single_file.py), the random `tiny` models (tiny.py) and the
loader on top (model.py). Nothing here imports those.

- errors (ModelError, ModelTooLarge), the component names and their weight files' stems;
- the networks' configs (Configs) and SDXL base's scheduler config (SDXL_SCHEDULER, the one copy);
- Source: where a model's parts come from; LoadOptions: how a model is loaded, whatever its source;
- reading safetensors state dicts and converting one component, through the converted-weights cache.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from worker.engine import attention, convert, tensor_file, weight_cache
from worker.engine.clip import CLIPConfig, TextEncoder
from worker.engine.layers import Projections
from worker.engine.unet import UNet, UNetConfig
from worker.engine.vae import VAE, VAEConfig

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_STEMS = {  # component: safetensors stem
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
# SDXL base 1.0's scheduler_config.json, verbatim: the scheduler of a single file without a folder, and the tiny
# models' (schedule.NoiseConfig reads the fields that decide the schedule)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def variant_name(name: str, variant: str) -> str:
    """diffusers' and transformers' file naming: model.safetensors -> model.fp16.safetensors,
    model.safetensors.index.json -> model.safetensors.index.fp16.json."""
    if not variant:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says which and where it was looked for."""


class ModelTooLarge(ModelError):
    """A model whose weights do not fit the memory left for it (load's max_bytes)."""


@dataclass(frozen=True)
class Configs:
    """The networks' configs: everything that decides parameter shapes and the traced program. SDXL's refiner
    has no first text encoder (text_encoder None)."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPConfig | None
    text_encoder_2: CLIPConfig

    @property
    def parts(self) -> tuple[str, ...]:
        """The components this model has weights for."""
        return tuple(p for p in COMPONENTS if getattr(self, p) is not None)

    @classmethod
    def from_dicts(cls, configs: dict[str, dict[str, Any]], where: str) -> Configs:
        """diffusers/transformers config.json contents per component; a config that is not SDXL's is a
        ModelError naming the component and what was found."""
        try:
            te1 = CLIPConfig.from_transformers(configs["text_encoder"]) if configs.get("text_encoder") else None
            te2 = CLIPConfig.from_transformers(configs["text_encoder_2"])
            if not te2.with_projection:
                raise ValueError("text_encoder_2 is not a CLIPTextModelWithProjection (SDXL's pooled embedding)")
            unet = UNetConfig.from_diffusers(configs["unet"], te2.projection_dim)
            vae = VAEConfig.from_diffusers(configs["vae"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: not an SDXL base model: {exc}") from exc
        text_width = te2.hidden_size + (te1.hidden_size if te1 else 0)
        if unet.cross_attention_dim != text_width:
            raise ModelError(
                f"{where}: the UNet attends to {unet.cross_attention_dim}-wide text, the text encoders give "
                f"{text_width}"
            )
        if unet.in_channels not in (vae.latent_channels, 2 * vae.latent_channels + 1):
            raise ModelError(
                f"{where}: the UNet takes {unet.in_channels} input channels and the VAE makes {vae.latent_channels}"
                f" latent channels: neither a base UNet ({vae.latent_channels}) nor an inpainting one"
                f" ({2 * vae.latent_channels + 1}: latents, mask, masked image latents)"
            )
        # SDXL base: both text encoders and 6 size ids; the refiner: the second alone and 5 ids (an aesthetic score
        # in place of the target size)
        if (unet.time_ids == 5) != (te1 is None):
            raise ModelError(
                f"{where}: a UNet with {unet.time_ids} time ids and {'one text encoder' if te1 is None else 'two'} is "
                "neither SDXL base (two, 6 ids) nor its refiner (the second alone, 5 ids)"
            )
        return cls(unet, vae, te1, te2)

    def module(self, part: str, dtype: Any, attend: Any = attention.einsum, form: Projections | None = None) -> Any:
        """A network's Flax module; form: the UNet's projections (None: the checkpoint's layout)."""
        cfg = getattr(self, part)
        if part == "unet":
            return UNet(cfg, attend, dtype, form or Projections())
        if part == "vae":
            return VAE(cfg, attend, dtype)
        return TextEncoder(cfg, dtype)

    def identity(self) -> dict[str, Any]:
        return {part: dataclasses.asdict(getattr(self, part)) for part in self.parts}


class Quantize(StrEnum):
    """SDXL_QUANTIZE: what of the model runs below its dtype."""

    none = "none"  # everything in the model's dtype
    # the UNet's linear layers and 1x1 convolutions as FP8 e4m3 matmuls (fp8.py), weights quantized per output
    # channel when they are placed; everything else (3x3 convolutions, attention, norms, the VAE, the text
    # encoders) in the model's dtype
    fp8 = "fp8"


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded, whatever its source (model.load, load_folder, load_single_file)."""

    dtype: Any = jnp.bfloat16  # the served weights' and compute dtype
    # a folder where parameter shapes are kept between starts (the worker uses its compile cache)
    shape_cache: Path | None = None
    variant: str = ""  # the folder's weight files' variant ("fp16": half of SDXL base's download); served in dtype
    # return once the configs and shapes are known, the weights still read on a thread (Model.wait), so that
    # compiling overlaps reading; missing files are reported at once
    background: bool = False
    weight_cache_dir: Path | None = None  # converted weights kept between starts (weight_cache); None: convert
    vae_dtype: str = "auto"  # auto, float32 or bfloat16 (model.resolve_vae_dtype)
    # a single file's diffusers folder for configs, tokenizers and scheduler (diffusers' from_single_file(config=))
    config_dir: Path | None = None
    unet: str | Path | None = None  # a UNet-only weights file or folder in place of the model's (folder.with_unet)
    vae: str | Path | None = None  # another VAE: a folder or a hub id (folder.with_vae)
    max_bytes: int | None = None  # ModelTooLarge before anything is read when the weights would take more
    tiny_dir: Path | None = None  # where `tiny` is built (default: tiny.default_dir())
    # served below dtype (Quantize); the weights stay in dtype here, in the checkpoint's layout, and are quantized
    # when an engine places them (program_weights.py)
    quantize: Quantize = Quantize.none


@dataclass(frozen=True)
class Source:
    """Where a model's parts come from: its configs, tokenizer folders, scheduler config, model_index
    flags, and weights(part, shapes) -> (parameters, where they came from)."""

    name: str
    configs: Configs
    tokenizer_dir: Path
    scheduler: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    weights: Callable[[str, Any, Any], tuple[Any, str]]  # (part, shapes, dtype)


def locate_weights(folder: Path, st_stem: str, variant: str = "") -> list[Path]:
    """The component's safetensors files (one, or a sharded index's). `variant` ("fp16") means
    model.fp16.safetensors instead of model.safetensors, as in diffusers. Nothing is read but a sharded index,
    so a missing file is reported before any slow work starts."""
    index = folder / variant_name(f"{st_stem}.safetensors.index.json", variant)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).exists()]
        if missing:
            raise ModelError(f"{index} names shards that are not there: {', '.join(missing)}")
        return [folder / shard for shard in shards]
    single = folder / variant_name(f"{st_stem}.safetensors", variant)
    if single.exists():
        return [single]
    expected = f"{single.name} or a sharded {index.name}" + (f" (SDXL_MODEL_VARIANT={variant})" if variant else "")
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".msgpack", ".bin"))
    if found:  # usually a variant mismatch: say which files are there, and which setting reads them
        expected += f"; the folder has {', '.join(found)}"
        named = re.compile(rf"{st_stem}\.(\w+?)(-\d+-of-\d+)?\.safetensors")  # model.fp16[-00001-of-00002]
        variants = sorted({m[1] for f in found if (m := named.fullmatch(f))})
        if variants and variant not in variants:
            expected += f": set SDXL_MODEL_VARIANT={variants[0]}"
        elif not any(f.endswith(".safetensors") for f in found):
            expected += " (Flax msgpack and PyTorch .bin weights are not read: use the repo's safetensors)"
    raise ModelError(f"no weights in {folder}: expected {expected}")


def read_state(files: list[Path]) -> dict[str, np.ndarray]:
    """The state dict of every safetensors file as views on memory maps of the files (tensor_file): the
    layout copy that follows is the only copy."""
    state: dict[str, np.ndarray] = {}
    for path in files:
        try:
            state.update(tensor_file.read(path))
        except tensor_file.TensorFileError as exc:
            raise ModelError(str(exc)) from exc
    return state


def convert_component(
    part: str,
    read: Callable[[], dict[str, np.ndarray]],
    files: list[Path],
    shapes: Any,
    dtype: Any,
    converted: Path | None,
    what: str,
) -> tuple[Any, str]:
    """(one component's parameters in `dtype`, where they came from). read(): its PyTorch-layout state dict
    (diffusers names). converted: weight_cache's folder; a hit there maps the converted file and reads nothing
    of the checkpoint, a miss converts and writes it in the background."""
    if converted is not None:
        expected = weight_cache.identity(files, dtype, shapes)
        cached_path = weight_cache.path_for(converted, part, files)
        cached = weight_cache.load(cached_path, expected, shapes, dtype)
        if cached is not None:
            return cached, "converted cache"
    state = read()
    if part == "vae":
        state = convert.legacy_vae_names(state)
    if part == "text_encoder" and state and not any(k.startswith("text_model.") for k in state):
        # transformers 5 saves CLIPTextModel without its `text_model.` level (CLIPTextModelWithProjection keeps it)
        state = {f"text_model.{k}": v for k, v in state.items()}
    try:
        params = convert.pt_to_flax(state, convert.flatten(shapes), what, dtype)
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    if converted is not None:
        weight_cache.save_in_background(cached_path, expected, params)
    return params, "checkpoint"
