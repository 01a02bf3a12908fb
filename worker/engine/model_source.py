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
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from worker.engine import attention, convert, host_memory, tensor_file, weight_cache
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


class NotEnoughMemory(ModelError):
    """A model whose weights would not fit the host's available memory while they are read: refused before any
    is read, where the kernel would otherwise kill the process without a word. The message names the bytes
    needed and available, and the dtype."""


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
    # the unit weights are converted, placed and let go in (a streamed load: background=True)
    group_bytes: int = 0  # 0: GROUP_BYTES
    # whether the served weights stay in this host's memory: a CPU serves from it; off a CPU the host holds only
    # the group in flight. What the memory check (available_bytes) counts.
    resident_on_host: bool = True
    # the host memory available now, in bytes (host_memory.available_bytes: the kernel's MemAvailable and the
    # cgroup's limit); a load that needs more is refused with NotEnoughMemory before anything is read. None: no check
    available_bytes: Callable[[], int] | None = host_memory.available_bytes


@dataclass(frozen=True)
class Source:
    """Where a model's parts come from: its configs, tokenizer folders, scheduler config, model_index
    flags, and weights(part, shapes, dtype) -> its Component (read when asked)."""

    name: str
    configs: Configs
    tokenizer_dir: Path
    scheduler: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    weights: Callable[[str, Any, Any], Component]  # (part, shapes, dtype) -> its weights, not read yet


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


# A placement group's bytes (in the serving dtype): the unit the weights are converted, placed and let go in, so
# the host holds the served weights plus about this much at a time (and on a CPU, whose device memory is the
# host's, about the served weights in all). Large enough that a group's copy keeps the cores busy.
GROUP_BYTES = 256 * 2**20
ATTENTIONS = ("attn1", "attn2")  # an attention's projections stay in one group: the program fuses them


def _unit(path: tuple[str, ...]) -> tuple[str, ...]:
    """The leaves that travel together: an attention's (program_weights fuses its projections), else a layer's."""
    for i, name in enumerate(path):
        if name in ATTENTIONS:
            return path[: i + 1]
    return path[:-1]


def plan_groups(flat: convert.FlatTree, dtype: Any, group_bytes: int) -> list[list[tuple[str, ...]]]:
    """The leaves of one component (flat: path -> array or shape) cut into groups of about group_bytes, in name
    order (so the weights' hash can be taken as they pass, in the order digest_weights takes it), an
    attention's or a layer's leaves never apart."""
    groups: list[list[tuple[str, ...]]] = []
    current: list[tuple[str, ...]] = []
    size = 0
    itemsize = np.dtype(dtype).itemsize
    for _, keys in itertools.groupby(sorted(flat), key=_unit):
        unit = list(keys)
        unit_bytes = sum(math.prod(flat[k].shape) * itemsize for k in unit)
        if current and size + unit_bytes > group_bytes:
            groups.append(current)
            current, size = [], 0
        current += unit
        size += unit_bytes
    if current:
        groups.append(current)
    return groups


@dataclass
class Component:
    """One component's weights, not read yet: whole (tree) or a group of tensors at a time (groups), through
    the converted-weights cache (weight_cache). A cache hit maps the converted file and reads nothing of the
    checkpoint; a miss converts group by group and writes each group to the cache as it goes."""

    part: str
    shapes: Any
    dtype: Any
    origin: str  # "converted cache" (mapped) or "checkpoint" (read and converted)
    identity: str | None  # what the converted weights were made from (weight_cache.identity); None: no cache
    cached_path: Path | None
    mapped: convert.FlatTree | None  # a cache hit's views on the converted file
    read: Callable[[], dict[str, np.ndarray]]  # the checkpoint's state dict, diffusers names (views)
    what: str

    def tree(self) -> dict[str, Any]:
        """All of the component: views on the converted file, or one converted copy (and the cache written)."""
        if self.mapped is not None:
            return convert.unflatten(self.mapped)
        flat: convert.FlatTree = {}
        for group in self.groups(group_bytes=2**62):  # one group: converted on every core at once
            flat.update(group)
        return convert.unflatten(flat)

    def groups(self, group_bytes: int = GROUP_BYTES, release: bool = False) -> Iterator[convert.FlatTree]:
        """The component a group at a time (path within it -> host array in dtype), in name order. A group
        the caller has let go of is not held here. release: a cache hit's mapped pages are taken out of this
        process's memory once the caller is done with each group (it has placed a copy on the devices)."""
        target = convert.flatten(self.shapes)
        plan = plan_groups(target, self.dtype, group_bytes)
        if self.mapped is not None:
            for keys in plan:
                group = {k: self.mapped[k] for k in keys}
                yield group
                if release:
                    tensor_file.release(group.values())
                del group
            return
        views = self._views(target)  # the whole checkpoint checked before any group is converted
        writer = None
        if self.identity is not None and self.cached_path is not None:
            writer = weight_cache.Writer(self.cached_path, self.identity, self.shapes, self.dtype)
        finished = False
        try:
            for keys in plan:
                source = {k: views.pop(k) for k in keys}
                group = convert.lay_out(source, self.dtype)
                tensor_file.release(source.values())  # copied: the checkpoint's pages need not stay ours
                del source
                if writer is not None:
                    writer.write(group)
                yield group
                del group
            finished = True
        finally:
            if writer is not None:
                writer.finish() if finished else writer.abort()

    def _views(self, target: convert.FlatTree) -> convert.FlatTree:
        state = self.read()
        if self.part == "vae":
            state = convert.legacy_vae_names(state)
        if self.part == "text_encoder" and state and not any(k.startswith("text_model.") for k in state):
            # transformers 5 saves CLIPTextModel without its `text_model.` level (CLIPTextModelWithProjection keeps it)
            state = {f"text_model.{k}": v for k, v in state.items()}
        try:
            return convert.match(state, target, self.what)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc


def convert_component(
    part: str,
    read: Callable[[], dict[str, np.ndarray]],
    files: list[Path],
    shapes: Any,
    dtype: Any,
    converted: Path | None,
    what: str,
) -> Component:
    """One component's weights in `dtype`, to be read (Component). read(): its PyTorch-layout state dict
    (diffusers names). converted: weight_cache's folder; a hit there maps the converted file now (cheap: the
    header) and reads nothing of the checkpoint."""
    identity = cached_path = mapped = None
    if converted is not None:
        identity = weight_cache.identity(files, dtype, shapes)
        cached_path = weight_cache.path_for(converted, part, files)
        hit = weight_cache.load(cached_path, identity, shapes, dtype)
        mapped = convert.flatten(hit) if hit is not None else None
    origin = "converted cache" if mapped is not None else "checkpoint"
    return Component(part, shapes, dtype, origin, identity, cached_path, mapped, read, what)
