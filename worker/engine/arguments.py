"""The programs' arguments and results as typed pytrees (flax.struct dataclasses): what begin, advance, finish and
encode take and give (program.py), by name instead of by position or column.

Each per-row array field declares its shape, in the names of `Dims` or numbers, and its dtype (`array`); the
abstract arguments an executable is lowered with (`abstract`: jax.ShapeDtypeStruct with the rows split over
the devices) are made from those declarations, so the classes the engine fills on the host (batch_inputs.py)
and the program reads are also the executables' signatures. Adding an input is one field here, its value
where the batch is made and its use in the program. Fields declared `given()` hold trees whose shapes come
from elsewhere (the adapter bank, begin's text embeddings).

Every array is a per-row input, sharded over the rows: nothing per job is baked into an executable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from common.vocabulary import MAX_STEPS, MAX_TOKENS
from worker.engine.schedule import TABLES

Array = Any  # a jax.Array on the devices, a numpy array on the host, a jax.ShapeDtypeStruct when lowering


@dataclass(frozen=True)
class Dims:
    """The sizes one executable is compiled for, by the names the fields' shapes use."""

    rows: int  # the batch: images, not UNet rows (guidance doubles those inside the program)
    height: int  # pixels
    width: int
    channels: int  # latent channels
    latent_height: int
    latent_width: int
    time_ids: int  # the UNet's conditioning ids per row: 6 (SDXL base: sizes), 5 (the refiner: an aesthetic score)
    per_row: int = 1  # adapters one row may combine (the bank's)
    controlnets: int = 1  # the ControlNets the engine serves (a controlled advance runs each on every row)
    ip_adapters: int = 1  # the IP-Adapters the engine serves (an imaged begin runs each on every row)
    ip_size: int = 224  # their image encoders' input size (the same for all: every CLIP ViT-H and bigG's)

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return self.rows, self.channels, self.latent_height, self.latent_width


LATENTS = ("rows", "channels", "latent_height", "latent_width")


def array(*dims: int | str, dtype: Any) -> Any:
    """A per-row array field of shape `dims` (Dims' names or numbers) and `dtype`."""
    return struct.field(metadata={"dims": dims, "dtype": dtype})


def nested(cls: type) -> Any:
    """A field holding another of these classes."""
    return struct.field(metadata={"nested": cls})


def given(optional: bool = False) -> Any:
    """A field whose shapes `abstract` takes from its caller, by the field's name; optional: None by default
    (and when the caller gives none)."""
    if optional:
        return struct.field(default=None, metadata={"given": True})
    return struct.field(metadata={"given": True})


def abstract(cls: type, dims: Dims, sharding: Any, **given_trees: Any) -> Any:
    """An instance of `cls` made of jax.ShapeDtypeStruct with `sharding` (rows split over the devices), from
    its fields' declarations; `given()` fields from `given_trees` (which keep their own shardings)."""
    values = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "dims" in meta:
            shape = tuple(getattr(dims, d) if isinstance(d, str) else d for d in meta["dims"])
            values[f.name] = jax.ShapeDtypeStruct(shape, meta["dtype"], sharding=sharding)
        elif "nested" in meta:
            values[f.name] = abstract(meta["nested"], dims, sharding, **given_trees)
        elif f.default is None:
            values[f.name] = given_trees.get(f.name)
        else:
            values[f.name] = given_trees[f.name]
    return cls(**values)


@struct.dataclass
class RowScalars:
    """Per-row numbers of the sampler (from the row and its schedule.Schedule)."""

    guidance: Array = array("rows", dtype=jnp.float32)  # classifier-free guidance scale; <= 1: none
    # the starting sample = init_weight * image latents + init_scale * noise (a pure-noise start: weight 0)
    init_weight: Array = array("rows", dtype=jnp.float32)
    init_scale: Array = array("rows", dtype=jnp.float32)
    out_scale: Array = array("rows", dtype=jnp.float32)  # the latents handed to the VAE = the last sample * out_scale


@struct.dataclass
class Prompts:
    """Token ids, from both tokenizers (the refiner has the second alone: its ids stand in both places)."""

    ids: Array = array("rows", 2, MAX_TOKENS, dtype=jnp.int32)
    neg_ids: Array = array("rows", 2, MAX_TOKENS, dtype=jnp.int32)
    # the unconditional row is zero embeddings (no negative prompt, on a model with force_zeros_for_empty_prompt)
    neg_zero: Array = array("rows", dtype=jnp.bool_)


@struct.dataclass
class Start:
    """Where each row's sampling starts."""

    noise: Array = array(*LATENTS, dtype=jnp.float32)  # unit noise, from the row's seed (or given: parity checks)
    init: Array = array(
        *LATENTS, dtype=jnp.float32
    )  # image latents; zeros without an image; the base's for the refiner
    mask: Array = array("rows", 1, "latent_height", "latent_width", dtype=jnp.float32)  # 1: generate, 0: keep the image
    masked: Array = array(*LATENTS, dtype=jnp.float32)  # the masked image's latents (an inpainting UNet), else zeros
    seeds: Array = array("rows", dtype=jnp.uint32)  # the row's noise at each step comes from it alone


@struct.dataclass
class ImageInputs:
    """The rows' IP-Adapters (ip_adapter.py): every adapter the engine serves, in its order, with each row's
    encoder pixels and scale (0 for an adapter the row does not use), so rows with another adapter, or none,
    share a batch."""

    weights: Any = given()  # a list of the adapters' parameters (ip_adapter_source.IPAdapterModel.params), replicated
    pixels: Array = array("rows", "ip_adapters", 3, "ip_size", "ip_size", dtype=jnp.float32)  # clip_vision.preprocess
    scales: Array = array("rows", "ip_adapters", dtype=jnp.float32)


@struct.dataclass
class BeginInputs:
    prompts: Prompts = nested(Prompts)
    start: Start = nested(Start)
    scalars: RowScalars = nested(RowScalars)
    images: ImageInputs | None = given(optional=True)  # an imaged begin's (ProgramKind.imaged)


@struct.dataclass
class TextEmbeddings:
    """begin's text encoding, n rows per image: 2 guided ([uncond0, cond0, uncond1, ...]), 1 guidance-free."""

    context: Array  # (n * rows, 77, D): the penultimate layers' states
    pooled: Array  # (n * rows, P)
    # every cross-attention's keys and values of `context` (unet.text_keys_values: {..."attn2": {"k", "v"}},
    # each (n * rows, 77, inner)), computed once in begin because the text is the same at every step; None: the
    # step projects the context itself (Program(light_step=False))
    keys_values: Any = None


@struct.dataclass
class SamplerState:
    """What one chunk of steps hands the next (begin makes it, advance carries it, finish decodes it)."""

    x: Array  # (rows, C, h, w) the sample, in sigma space
    d: Array  # the last denoised estimate (DPM++'s second order reads it)
    noise: Array  # the starting noise (inpainting re-noises the kept image with it)
    init: Array  # image latents
    mask: Array  # (rows, 1, h, w)
    seeds: Array  # (rows,)
    masked: Array | None = None  # the masked image's latents: an inpainting UNet's extra input, else absent


@struct.dataclass
class ControlInputs:
    """The rows' ControlNets (controlnet.py): every ControlNet the engine serves, in its order, with each row's
    control image and its conditioning scale at each step (zero outside the row's window, and for a ControlNet
    the row does not use), so rows with other ControlNets, or none, share a batch."""

    weights: Any = given()  # a list of the ControlNets' parameters, replicated
    images: Array = array("rows", "controlnets", 3, "height", "width", dtype=jnp.float32)  # [0, 1], channels first
    scales: Array = array("rows", "controlnets", MAX_STEPS, dtype=jnp.float32)  # by the row's own step index


@struct.dataclass
class AdvanceInputs:
    text: TextEmbeddings = given()
    scalars: RowScalars = nested(RowScalars)
    # the unconditional and the conditional row's size conditioning (the refiner's differ by the aesthetic score)
    time_ids: Array = array("rows", 2, "time_ids", dtype=jnp.float32)
    tables: Array = array("rows", len(TABLES), MAX_STEPS, dtype=jnp.float32)  # schedule.TABLES, stacked in order
    controls: ControlInputs | None = given(optional=True)  # a controlled advance's (ProgramKind.controlled)


@struct.dataclass
class AdapterInputs:
    """The rows' LoRA adapters (lora.py): each row's `per_row` (slot, scale) pairs into the bank (slot 0: none)."""

    bank: Any = given()  # lora.Bank.tree: every slot's factors, replicated
    slots: Array = array("rows", "per_row", dtype=jnp.int32)
    scales: Array = array("rows", "per_row", dtype=jnp.float32)


@struct.dataclass
class EncodeInputs:
    images: Array = array("rows", 3, "height", "width", dtype=jnp.float32)  # in [-1, 1], channels first
