"""A batch's inputs, made on the host: rows checked, padded, tokenized and turned into per-row tables and
numbers (arguments.py's classes, holding numpy arrays). No device is touched here: the engine places what
this makes and runs it.

Rows are what a caller asks for (Row); an EngineInputError names the field at fault. Short batches are padded
with copies of the last row (their outputs are dropped when fetched).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import struct

from common.vocabulary import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_STRENGTH,
    MAX_SEED,
    MAX_STEPS,
    MAX_TOKENS,
    REFINER_AESTHETIC_SCORE,
    REFINER_NEGATIVE_AESTHETIC_SCORE,
    Scheduler,
    Spacing,
)
from worker.engine import control_inputs, image_prompts, schedule
from worker.engine.arguments import Prompts, RowScalars
from worker.engine.control_inputs import Control
from worker.engine.image_prompts import ImagePrompt
from worker.engine.program_kind import Role
from worker.engine.schedule import TABLES

Tokens = tuple[tuple[tuple[int, ...], ...], bool]  # (ids from both tokenizers, was the text cut)


class EngineInputError(ValueError):
    """Bad input for the engine; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Row:
    """One image to make. Sizes in pixels; None means SDXL's default (the output size, no crop)."""

    prompt: str
    # None: no negative prompt; zero embeddings on a model with force_zeros_for_empty_prompt (SDXL base), the
    # empty string's otherwise. "" is the empty string, encoded, whatever the model says (as in diffusers).
    negative_prompt: str | None = None
    seed: int = 0
    guidance_scale: float = 5.0  # <= 1 turns classifier-free guidance off, as in diffusers
    steps: int = 20
    scheduler: str = Scheduler.euler
    original_size: tuple[int, int] | None = None  # (height, width) conditioning
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    timestep_spacing: str | None = None  # leading, linspace or trailing; None: the model's scheduler config
    # Image-to-image: (H, W, 3) uint8 at the output size; `strength` of the steps run (the rest skipped).
    image: np.ndarray | None = None
    # Inpainting (with `image`): (H, W) uint8, >= 128 where to generate, < 128 where the image is kept.
    mask: np.ndarray | None = None
    strength: float | None = None  # None: diffusers' defaults (DEFAULT_STRENGTH, DEFAULT_INPAINT_STRENGTH)
    # The refiner (an Engine built with one): the base runs the steps down to this share of the noise (diffusers'
    # denoising_end), the refiner the rest (denoising_start), with its aesthetic-score conditioning.
    refiner_switch: float | None = None
    aesthetic_score: float = REFINER_AESTHETIC_SCORE
    negative_aesthetic_score: float = REFINER_NEGATIVE_AESTHETIC_SCORE
    # LoRA adapters, (name, scale) each: names the engine's Adapters resolve (never paths), applied per row.
    loras: tuple[tuple[str, float], ...] = ()
    # ControlNets (control_inputs.Control: a served name, a control image, scale and step window), several at once
    controlnets: tuple[Control, ...] = ()
    # an IP-Adapter (image_prompts.ImagePrompt: a served name, an image, its scale); None: none (scale 0 in a batch)
    ip_adapter: ImagePrompt | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    def effective_strength(self) -> float | None:
        if self.image is None:
            return None
        if self.strength is not None:
            return self.strength
        return DEFAULT_INPAINT_STRENGTH if self.mask is not None else DEFAULT_STRENGTH


@struct.dataclass
class ModelInputs:
    """One model's per-row inputs for a batch (the base's, or the refiner's for its share of the steps)."""

    prompts: Prompts
    scalars: RowScalars
    time_ids: np.ndarray  # (rows, 2, time ids)
    tables: np.ndarray  # (rows, len(TABLES), MAX_STEPS)
    steps: int = struct.field(pytree_node=False)  # the batch's: its longest row's


@dataclass
class HostBatch:
    """Everything a batch needs from the host, padded to the engine's batch_rows."""

    base: ModelInputs
    refiner: ModelInputs | None  # every row goes on to the refiner, or none does
    seeds: np.ndarray  # (rows,) uint32
    images: np.ndarray | None  # (rows, 3, H, W) in [-1, 1] for the VAE encoder; None: no row has an image
    masks: np.ndarray | None  # (rows, 1, h, w): 1 generate, 0 keep; None: no row has a mask
    masked_images: np.ndarray | None  # (rows, 3, H, W) the images with the mask's area blanked (inpainting UNet)
    guided: bool  # some row has guidance > 1
    truncated: list[bool]  # per requested row: its prompt or negative prompt was cut to MAX_TOKENS
    loras: list[tuple[tuple[str, float], ...]]  # per row
    # (images (rows, ControlNets, 3, H, W), scales (rows, ControlNets, MAX_STEPS)): control_inputs.tables; None: no
    # row names a ControlNet
    controls: tuple[np.ndarray, np.ndarray] | None = None
    # (pixels (rows, IP-Adapters, 3, S, S), scales (rows, IP-Adapters)): image_prompts.tables; None: no row has one
    image_prompts: tuple[np.ndarray, np.ndarray] | None = None


class BatchInputs:
    """Makes HostBatch for one engine: its models (by role), served sizes and batch_rows. adapters_per_row: the
    adapters a row may name (None: the engine serves none). Tokens and schedules are cached: negative prompts,
    padded rows and common settings repeat in nearly every batch."""

    def __init__(
        self,
        models: Mapping[Role, Any],
        sizes: Sequence[tuple[int, int]],
        batch_rows: int,
        adapters_per_row: int | None = None,
        controlnets: Sequence[str] = (),
        ip_adapters: Sequence[str] = (),
        ip_size: int = 224,
    ):
        self.models, self.sizes, self.batch_rows = models, [tuple(s) for s in sizes], batch_rows
        self.adapters_per_row = adapters_per_row
        self.controlnets = list(controlnets)  # the served ControlNets' names, in the programs' order
        self.ip_adapters, self.ip_size = list(ip_adapters), ip_size  # the served IP-Adapters' names, their input size
        self._schedules: dict[tuple[Any, ...], schedule.Schedule] = {}
        self._tokens = functools.lru_cache(maxsize=8192)(self._tokenize_one)

    # ------------------------------------------------------------------ checking a row

    def validate(self, row: Row, height: int, width: int) -> None:
        if (height, width) not in self.sizes:
            served = ", ".join(f"{w}x{h}" for h, w in self.sizes)
            raise EngineInputError("size", f"{width}x{height} is not served; served sizes (width x height): {served}")
        _check_sampling(row)
        self._check_loras(row)
        self._check_refiner(row)
        _check_image(row, height, width)
        try:
            control_inputs.check(row.controlnets, self.controlnets, height, width)
        except control_inputs.ControlError as e:
            raise EngineInputError("controlnets", str(e)) from None
        if row.controlnets and row.refiner_switch is not None:
            raise EngineInputError("controlnets", "the refiner takes no ControlNet: leave refiner_switch out")
        try:
            image_prompts.check(row.ip_adapter, self.ip_adapters)
        except image_prompts.ImagePromptError as e:
            raise EngineInputError("ip_adapter", str(e)) from None
        if row.ip_adapter is not None and row.refiner_switch is not None:
            raise EngineInputError("ip_adapter", "the refiner takes no IP-Adapter: leave refiner_switch out")

    def _check_loras(self, row: Row) -> None:
        if not row.loras:
            return
        if self.adapters_per_row is None:
            raise EngineInputError("loras", "this engine serves no LoRA adapters")
        if len(row.loras) > self.adapters_per_row:
            raise EngineInputError("loras", f"{len(row.loras)} adapters; at most {self.adapters_per_row} per image")
        for name, scale in row.loras:
            if not math.isfinite(scale):
                raise EngineInputError("loras", f"adapter {name!r}: scale must be a finite number, got {scale}")

    def _check_refiner(self, row: Row) -> None:
        if row.refiner_switch is None:
            return
        if Role.refiner not in self.models:
            raise EngineInputError("refiner_switch", "this engine has no refiner")
        if not 0 < row.refiner_switch < 1:
            raise EngineInputError("refiner_switch", f"must be between 0 and 1, got {row.refiner_switch}")
        if row.image is not None:
            raise EngineInputError("refiner_switch", "the refiner does not take an init image here")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not math.isfinite(getattr(row, name)):
                raise EngineInputError(name, f"must be a finite number, got {getattr(row, name)}")

    # ------------------------------------------------------------------ a batch

    def build(self, rows: Sequence[Row], height: int, width: int) -> HostBatch:
        if not 1 <= len(rows) <= self.batch_rows:
            raise EngineInputError("rows", f"between 1 and {self.batch_rows} rows per call, got {len(rows)}")
        for row in rows:
            self.validate(row, height, width)
        padded = list(rows) + [rows[-1]] * (self.batch_rows - len(rows))
        base, cut = self._base(padded, height, width)
        refined = {r.refiner_switch is not None for r in padded}
        if refined == {True, False}:
            raise EngineInputError("refiner_switch", "rows with and without the refiner cannot share a batch")
        images, masks, masked = self._images(padded, height, width)
        return HostBatch(
            base=base,
            refiner=self._refiner(padded, height, width) if refined == {True} else None,
            seeds=np.array([r.seed for r in padded], np.uint32),
            images=images,
            masks=masks,
            masked_images=masked,
            guided=any(r.guided for r in padded),
            truncated=cut[: len(rows)],
            loras=[r.loras for r in padded],
            controls=self._controls(padded, height, width),
            image_prompts=self._image_prompts(padded),
        )

    def _image_prompts(self, padded: list[Row]) -> tuple[np.ndarray, np.ndarray] | None:
        if not any(r.ip_adapter is not None for r in padded):
            return None
        return image_prompts.tables([r.ip_adapter for r in padded], self.ip_adapters, self.ip_size)

    def _controls(self, padded: list[Row], height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not any(r.controlnets for r in padded):
            return None
        steps = [self._schedule(r, Role.base).steps for r in padded]
        return control_inputs.tables([r.controlnets for r in padded], steps, self.controlnets, height, width)

    def _base(self, padded: list[Row], height: int, width: int) -> tuple[ModelInputs, list[bool]]:
        prompts, cut = self._prompts(padded, Role.base)
        scheds = [self._schedule(r, Role.base) for r in padded]
        # diffusers' inpainting at strength 1 starts from pure noise; every other image start adds noise to it
        from_image = [r.image is not None and not (r.mask is not None and r.effective_strength() == 1) for r in padded]
        scalars = _scalars(
            padded,
            scheds,
            init_weight=[float(f) for f in from_image],
            init_scale=[s.image_scale if f else s.init_scale for s, f in zip(scheds, from_image, strict=True)],
        )
        # the same size conditioning for the unconditional and the conditional row (diffusers' default)
        ids = [
            [*(r.original_size or (height, width)), *r.crop_top_left, *(r.target_size or (height, width))]
            for r in padded
        ]
        time_ids = np.array([[i, i] for i in ids], np.float32)
        return ModelInputs(prompts, scalars, time_ids, _tables(scheds), max(s.steps for s in scheds)), cut

    def _refiner(self, padded: list[Row], height: int, width: int) -> ModelInputs:
        """The refiner's own inputs: its text encoding, tables from the switch on, and its time ids (original
        size, crop, aesthetic score; the unconditional row with the negative score)."""
        prompts, _ = self._prompts(padded, Role.refiner)
        scheds = [self._schedule(r, Role.refiner) for r in padded]
        # the sample goes on from the base's: init weight 1, no noise added (diffusers' denoising_start)
        scalars = _scalars(padded, scheds, init_weight=[1.0] * len(padded), init_scale=[0.0] * len(padded))
        time_ids = []
        for r in padded:
            size = [*(r.original_size or (height, width)), *r.crop_top_left]
            time_ids.append([[*size, r.negative_aesthetic_score], [*size, r.aesthetic_score]])
        return ModelInputs(
            prompts, scalars, np.array(time_ids, np.float32), _tables(scheds), max(s.steps for s in scheds)
        )

    def _images(self, padded: list[Row], height: int, width: int) -> tuple[np.ndarray | None, ...]:
        """(images, masks, masked images) for the VAE encoder and the blend, or None where no row needs them."""
        images = masks = masked = None
        if any(r.image is not None for r in padded):
            # diffusers' preprocessing: [0, 255] -> [0, 1] -> [-1, 1]; rows without an image encode zeros (unused)
            images = np.zeros((len(padded), 3, height, width), np.float32)
            for i, r in enumerate(padded):
                if r.image is not None:
                    images[i] = (r.image.astype(np.float32) / 255.0 * 2 - 1).transpose(2, 0, 1)
        if any(r.mask is not None for r in padded):
            f = self.models[Role.base].vae_scale_factor
            masks = np.ones((len(padded), 1, height // f, width // f), np.float32)
            for i, r in enumerate(padded):
                if r.mask is not None:
                    # binarized at half scale, then nearest-neighbour down to the latents (diffusers' inpainting)
                    masks[i, 0] = (r.mask[::f, ::f].astype(np.float32) / 255.0 >= 0.5).astype(np.float32)
        if self.models[Role.base].inpainting:
            # An inpainting UNet sees the image with the mask's area blanked (0 in [-1, 1]) through the VAE. A row
            # without a mask is generated everywhere (all of it blanked), as is a row without an image.
            masked = np.zeros((len(padded), 3, height, width), np.float32)
            for i, r in enumerate(padded):
                if r.image is not None and r.mask is not None:
                    assert images is not None
                    masked[i] = images[i] * (r.mask.astype(np.float32) / 255.0 < 0.5)[None]
        return images, masks, masked

    # ------------------------------------------------------------------ tokens and schedules

    def _prompts(self, padded: list[Row], role: Role) -> tuple[Prompts, list[bool]]:
        """Both texts' ids and the rows' zero-embedding flags; per row, whether either text was cut."""
        ids, cut_pos = self._tokenize([r.prompt for r in padded], role)
        neg_ids, cut_neg = self._tokenize([r.negative_prompt or "" for r in padded], role)
        zeros = self.models[role].force_zeros_for_empty_prompt
        neg_zero = np.array([r.negative_prompt is None and zeros for r in padded])
        return Prompts(ids, neg_ids, neg_zero), [a or b for a, b in zip(cut_pos, cut_neg, strict=True)]

    def _tokenize_one(self, text: str, role: Role = Role.base) -> Tokens:
        """(ids for both tokenizers, was it cut): three tokenizer passes, cached (see the class). The refiner has
        the second tokenizer alone: its ids stand in both places (the first is not read)."""
        m = self.models[role]
        first = m.tokenizer or m.tokenizer_2
        pair = tuple(
            tuple(tok(text, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids)
            for tok in (first, m.tokenizer_2)
        )
        return pair, len(first(text).input_ids) > MAX_TOKENS

    def _tokenize(self, texts: list[str], role: Role) -> tuple[np.ndarray, list[bool]]:
        done = [self._tokens(text, role) for text in texts]
        return np.asarray([ids for ids, _ in done], dtype=np.int32), [cut for _, cut in done]

    def _schedule(self, row: Row, role: Role) -> schedule.Schedule:
        """The row's tables on the base model or (its share of the steps) on the refiner; a few hundred
        microseconds each, cached for the hot path."""
        strength = row.effective_strength()
        skipped = 0
        if strength is not None and not (row.mask is not None and strength == 1):
            skipped = schedule.skipped_steps(row.steps, strength)
        key = (role, row.scheduler, row.steps, row.timestep_spacing, skipped, row.refiner_switch)
        if key not in self._schedules:
            try:
                self._schedules[key] = self._build_schedule(row, role, skipped)
            except schedule.ScheduleError as e:  # a scheduler this model's config cannot run (LCM past its grid)
                field = "refiner_switch" if row.refiner_switch is not None and e.field == "strength" else e.field
                raise EngineInputError(field, e.message) from None
        return self._schedules[key]

    def _build_schedule(self, row: Row, role: Role, skipped: int) -> schedule.Schedule:
        noise = self.models[role].noise
        start, stop = skipped, None
        if row.refiner_switch is not None:
            # each model splits its own run's timesteps at the switch (diffusers' denoising_end on the base,
            # denoising_start on the refiner, each from its own scheduler config)
            ts = schedule.timesteps(noise, row.scheduler, row.steps, row.timestep_spacing)
            split = schedule.switch_step(ts, row.refiner_switch, noise.num_train_timesteps)
            start, stop = (split, None) if role is Role.refiner else (0, split)
        return schedule.build(noise, row.scheduler, row.steps, row.timestep_spacing, start, stop)


def _check_sampling(row: Row) -> None:
    if row.scheduler not in set(Scheduler):
        raise EngineInputError("scheduler", f"{row.scheduler!r} is unknown; use one of {[s.value for s in Scheduler]}")
    if row.timestep_spacing is not None and row.timestep_spacing not in set(Spacing):
        raise EngineInputError("timestep_spacing", f"{row.timestep_spacing!r}: one of {[s.value for s in Spacing]}")
    if not 1 <= row.steps <= MAX_STEPS:
        raise EngineInputError("steps", f"must be between 1 and {MAX_STEPS}, got {row.steps}")
    if not math.isfinite(row.guidance_scale):
        raise EngineInputError("guidance_scale", f"must be a finite number, got {row.guidance_scale}")
    if not 0 <= row.seed <= MAX_SEED:
        raise EngineInputError("seed", f"must be between 0 and {MAX_SEED}, got {row.seed}")


def _check_image(row: Row, height: int, width: int) -> None:
    if row.image is None:
        for name in ("mask", "strength"):
            if getattr(row, name) is not None:
                raise EngineInputError(name, "needs an init image")
        return
    if row.image.shape != (height, width, 3) or row.image.dtype != np.uint8:
        raise EngineInputError(
            "image", f"must be ({height}, {width}, 3) uint8 (the output size), got {row.image.shape} {row.image.dtype}"
        )
    if row.mask is not None and row.mask.shape != (height, width):
        raise EngineInputError("mask", f"must be ({height}, {width}) (the output size), got {row.mask.shape}")
    strength = row.effective_strength()
    assert strength is not None
    if not 0 < strength <= 1:
        raise EngineInputError("strength", f"must be in (0, 1], got {strength}")
    if schedule.skipped_steps(row.steps, strength) >= row.steps:
        raise EngineInputError(
            "strength", f"{strength} of {row.steps} steps runs none; raise strength or steps (at least one step)"
        )


def _scalars(
    padded: list[Row], scheds: list[schedule.Schedule], init_weight: list[float], init_scale: list[float]
) -> RowScalars:
    return RowScalars(
        guidance=np.array([r.guidance_scale for r in padded], np.float32),
        init_weight=np.array(init_weight, np.float32),
        init_scale=np.array(init_scale, np.float32),
        out_scale=np.array([s.out_scale for s in scheds], np.float32),
    )


def _tables(scheds: list[schedule.Schedule]) -> np.ndarray:
    """(rows, len(TABLES), MAX_STEPS) float32: each row's sampler tables, stacked in TABLES' order."""
    return np.stack([np.stack([s.tables[name] for name in TABLES]) for s in scheds]).astype(np.float32)
