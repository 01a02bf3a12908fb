"""The engine: rows in, pixels out. It knows nothing of jobs, queues or storage.

    engine = Engine(model.load("tiny"), sizes=[(1024, 1024)], batch_rows=4)
    engine.compile()                              # the served programs of every configured size, at start
    out = engine.generate([Row("a cat", seed=1)], height=1024, width=1024)
    out.images  # (1, 1024, 1024, 3) uint8

Three parts: batch_inputs.py makes a batch's inputs on the host (checks, padding, tokens, schedules, tables);
executables.py compiles the program's parts (program.py) per shape and keeps them; the Engine here holds the
weights and the adapter bank on the devices and dispatches a batch: [encode the init images] -> begin ->
advance, once per chunk of steps -> [the refiner's begin and advance] -> finish, fed to the devices in order with
at most `chunks_ahead` chunks in flight (feed.py), so that a canceled batch (Pending.cancel) stops within them.

What recompiles: only a new (batch_rows, height, width), a new model, dtype or device set. Prompts, seeds,
guidance, steps, schedulers, spacings, image-to-image strengths, init images and masks and size conditioning
are inputs. Each shape has a guided pair (begin, advance: two UNet rows per image) and a guidance-free pair
(one row per image), picked per batch: a batch whose every row has guidance <= 1 runs the guidance-free pair
and does half the UNet work. LoRA adapters (Adapters, lora.py) are inputs too: an engine with an adapter bank
has an adapter-taking begin/advance beside the plain ones, run by batches in which any row names an adapter;
which adapters, how many and at what scale compiles nothing.

The step (program.py): by default the lighter one, whose cross-attention keys and values are computed once per
batch and whose projections are fused (program_weights.py lays the weights out so when they are placed);
`light_step=False` is the step as it was, for bench/engine.py's before/after. A model served in FP8
(LoadOptions(quantize=Quantize.fp8)) has its UNet's linear layers quantized when they are placed.

Progress: `Pending.progress()` yields the steps done as each chunk of `progress_every_steps` finishes, and
`Pending.estimate(done)` copies the rows' denoised estimate after that chunk off the devices; `Pending.preview(done,
row)` draws one row of it as RGB (previews.py: TAESD on the devices when the engine serves a preview decoder, else
the fixed map on the host; the finisher asks every few steps, and a batch nobody asks costs nothing but keeping one
latent per chunk).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from worker.engine import attention as attention_impl
from worker.engine import (
    convert,
    executables,
    feed,
    lora,
    placement,
    previews,
    program,
    program_weights,
    render_conditions,
)
from worker.engine.arguments import (
    AdapterInputs,
    AdvanceInputs,
    BeginInputs,
    ControlInputs,
    EncodeInputs,
    ImageInputs,
    SamplerState,
    Start,
)
from worker.engine.batch_inputs import BatchInputs, EngineInputError, HostBatch, ModelInputs, Row
from worker.engine.control_inputs import Control
from worker.engine.controlnet_source import ControlModel
from worker.engine.device_constants import DeviceConstants
from worker.engine.image_prompts import ImagePrompt
from worker.engine.ip_adapter_source import IPAdapterModel
from worker.engine.model import Model
from worker.engine.program_kind import Part, Pixels, ProgramKind, Programs, Role
from worker.engine.taesd import PreviewDecoder

__all__ = [
    "Adapters",
    "Control",
    "ControlModel",
    "Engine",
    "EngineInputError",
    "IPAdapterModel",
    "ImagePrompt",
    "Output",
    "Pending",
    "Programs",
    "Row",
]
ADVANCE = ProgramKind(Part.advance)  # the UNet's steps: most of a batch's time and memory (bench/accelerator.py)


@dataclass
class Output:
    images: np.ndarray  # (n, H, W, 3) uint8, or float32 in [0, 1] for output="float32"
    truncated: list[bool]  # per row: prompt or negative prompt was cut to 77 tokens
    finite: list[bool]  # per row: False when the model produced NaN/inf (the image is not usable)
    adapters: list[list[lora.Adapter]] = field(default_factory=list)  # per row: the adapters it used (hashes)


@dataclass
class Pending:
    """A dispatched batch, fed to the devices chunk by chunk (feed.py): its device arrays still being computed."""

    ticket: feed.Ticket
    rows: int
    truncated: list[bool]
    steps: int = 0  # the batch's step count: its longest row's (the base's and the refiner's)
    adapters: list[list[lora.Adapter]] = field(default_factory=list)
    # steps done -> the rows' denoised estimate then, on the devices ((batch_rows, C, h, w): SamplerState.d)
    estimates: dict[int, Any] = field(default_factory=dict)
    draw: Callable[[Any, int], np.ndarray] | None = None  # (estimate, row) -> (H, W, 3) uint8: previews.Previews

    def progress(self) -> Iterator[int]:
        """Steps done, as each chunk of steps finishes on the device (blocks between them); ends early when the
        batch is canceled or fails (fetch says which)."""
        index = 0
        while (mark := self.ticket.mark(index)) is not None:
            done, ready = mark
            try:
                ready.block_until_ready()
            except Exception:  # the program failed on the device: fetch raises it
                return
            yield done
            index += 1

    def cancel(self) -> bool:
        """Drop the chunks not yet enqueued (every row's result is unwanted): True when some were, and the batch
        has no images (fetch raises feed.Canceled); False when it had been fed whole."""
        return self.ticket.cancel()

    def estimate(self, done: int) -> np.ndarray | None:
        """The rows' denoised estimate (rows, C, h, w) float32 once `done` steps ran (blocks until they have);
        None when no chunk ended there. Latents are small (128x128x4 per 1024 px row): a cheap copy."""
        found = self.estimates.get(done)
        return None if found is None else np.asarray(found, np.float32)[: self.rows]

    def preview(self, done: int, row: int) -> np.ndarray | None:
        """Row `row`'s estimate once `done` steps ran, drawn as RGB (H, W, 3) uint8 (previews.py: TAESD's at most
        256 px on its long side, the fixed map's at the latents' size; blocks until the steps have run); None when
        no chunk ended there."""
        found = self.estimates.get(done)
        return None if found is None or self.draw is None or not 0 <= row < self.rows else self.draw(found, row)

    def fetch(self) -> Output:
        images, finite = self.ticket.wait()  # raises feed.Canceled, or what enqueueing raised
        images = np.asarray(images)[: self.rows]  # blocks until the device is done
        finite = [bool(f) for f in np.asarray(finite)[: self.rows]]
        return Output(images, self.truncated, finite, self.adapters[: self.rows])


@dataclass(frozen=True)
class Adapters:
    """LoRA adapters an engine serves: `path_of(name)` is the file for a name (KeyError: no such adapter; the
    caller owns the folder, requests carry names); `rank`, the bank's rank (higher ranks are refused); `slots`,
    adapters resident on the devices at once; `per_row`, adapters one row may combine."""

    path_of: Callable[[str], Path]
    rank: int = 32
    slots: int = 8
    per_row: int = 2


def _check(
    model: Model, refiner: Model | None, sizes: Sequence[tuple[int, int]], batch_rows: int, devices: int
) -> None:
    if model.weights_dropped:
        raise EngineInputError("model", "its host weights were dropped once placed (drop_host_weights); reload it")
    if model.refiner:
        raise EngineInputError("model", "is a refiner: serve a base model, with this one as its refiner")
    if refiner is not None and (not refiner.refiner or refiner.latent_channels != model.latent_channels):
        raise EngineInputError("refiner", "is not an SDXL refiner (one text encoder, 5 time ids) for this model")
    if batch_rows < 1 or batch_rows % devices:
        raise EngineInputError(
            "batch_rows", f"must be a positive multiple of the device count {devices}, got {batch_rows}"
        )
    factor = model.vae_scale_factor * 2 ** (len(model.unet.block_out_channels) - 1)
    for h, w in sizes:
        if h % factor or w % factor:
            raise EngineInputError("sizes", f"{h}x{w}: height and width must be multiples of {factor}")


class Engine:
    def __init__(
        self,
        model: Model,
        sizes: Sequence[tuple[int, int]],
        batch_rows: int,
        devices: Sequence[Any] | None = None,
        attention: str = "einsum",
        aot_dir: str | Path | None = None,
        aot_key: bytes | None = None,
        progress_every_steps: int = 1,
        refiner: Model | None = None,
        adapters: Adapters | None = None,
        light_step: bool = True,
        controlnets: Sequence[ControlModel] = (),
        chunks_ahead: int = 2,
        ip_adapters: Sequence[IPAdapterModel] = (),
        preview_decoder: PreviewDecoder | None = None,  # TAESD (taesd.load) for previews; None: the fixed map
    ):
        devices = list(devices or jax.local_devices())
        _check(model, refiner, sizes, batch_rows, len(devices))
        attention = attention_impl.resolve(attention, devices[0].platform, len(devices))
        if attention not in attention_impl.IMPLEMENTATIONS:
            raise EngineInputError("attention", f"auto or one of {attention_impl.IMPLEMENTATIONS}, got {attention!r}")
        if progress_every_steps < 1:
            raise EngineInputError("progress_every_steps", f"must be at least 1, got {progress_every_steps}")
        self.progress_every_steps, self.attention, self.model = progress_every_steps, attention, model
        self.light_step = light_step
        self.models = {Role.base: model} | ({Role.refiner: refiner} if refiner is not None else {})
        self.sizes = [tuple(s) for s in sizes]
        self.batch_rows = batch_rows
        self.mesh = Mesh(np.array(devices), ("data",))
        self.rows_sharding, self.replicated = program.shardings(self.mesh)
        # Weights go to every device once, replicated: P() over the data axis, a group of tensors at a time
        # (placement.py). A model not read yet (LoadOptions(background=True)) is streamed onto the devices by a
        # thread, read and placed a group at a time, while the programs compile or load; compile() waits for it.
        self.params: Any = None
        self._placing: Future[tuple[Any, float]] | None = None
        if model.unread is not None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="place-weights")
            self._placing = pool.submit(self._read_and_place)
            pool.shutdown(wait=False)  # its one thread ends with the placement
        else:
            self.params = self.place(model.params)
        self.refiner_params = self.place(refiner.wait(), Role.refiner) if refiner is not None else None
        self.adapters = adapters
        self.bank = self._bank(adapters) if adapters is not None else None
        self.weights_wait_s = 0.0  # how long compile() waited for the weights to be read and placed
        self.place_s = 0.0  # how long copying them to the devices took (overlapping the programs)
        # Pallas kernels run interpreted off their own platform (a CPU test of splash), compiled on it.
        attend = attention_impl.make(attention, self.mesh, interpret=devices[0].platform != "tpu")
        # Serialized executables, each sealed with aot_key (cache.py): a warm start skips tracing and compiling.
        store = executables.store(aot_dir, aot_key)
        self.executables = executables.Executables(
            self.models,
            self.mesh,
            batch_rows,
            attention,
            attend,
            store,
            self.bank,
            light_step,
            controlnets,
            ip_adapters,
            preview_decoder.config if preview_decoder is not None else None,
        )
        # ControlNets (controlnet.py) on every device, in their order: a controlled advance runs each on every row
        self.controlnets = [c.name for c in controlnets]
        self.control_weights = [jax.device_put(c.params, self.replicated) for c in controlnets]
        per_row = adapters.per_row if adapters else None
        # IP-Adapters (ip_adapter.py) likewise: an imaged begin makes each one's keys and values for every row
        self.ip_adapters = [a.name for a in ip_adapters]
        self.image_weights = [jax.device_put(a.params, self.replicated) for a in ip_adapters]
        ip_size = self.executables.ip_size
        self.inputs = BatchInputs(
            self.models, self.sizes, batch_rows, per_row, self.controlnets, self.ip_adapters, ip_size
        )
        # batches run: "advance" (guided) or "advance-free", and of those, "encode" (init images), "lora", "control",
        # "ip_adapter"; chunks: step chunks enqueued on the devices (a canceled batch's remaining ones are not)
        self.dispatched: collections.Counter[str] = collections.Counter()
        self.chunks = 0
        self.feed = feed.Feed(chunks_ahead)
        self.constants = DeviceConstants(self.executables, batch_rows, self.rows_sharding, self.replicated)
        self.previews = previews.Previews(preview_decoder, self.executables, self.replicated)

    def _bank(self, adapters: Adapters) -> lora.Bank:
        found = lora.targets(self.model)
        known = lora.names(self.model, list(found))
        read = lambda name: self._read_adapter(name, found, known)  # noqa: E731
        dtype, per_row = self.model.dtype, adapters.per_row
        return lora.Bank(found, read, adapters.rank, adapters.slots, per_row, dtype, self.replicated)

    @property
    def conditions(self) -> dict[str, str | int]:
        """What decides a row's output bytes besides the row and the weights (render_conditions.py)."""
        return render_conditions.of(self.model, self.mesh, self.attention, self.batch_rows)

    # ------------------------------------------------------------------ compiling

    @property
    def compile_s(self) -> dict[str, float]:
        """Seconds each program took to compile or load, by "{rows}x{height}x{width}/{kind}"."""
        return self.executables.compile_s

    @property
    def aot_loaded(self) -> int:
        """Executables read back whole from the sealed cache this process."""
        return self.executables.loaded

    def compile(self, programs: Programs = Programs.SERVED) -> dict[str, float]:
        """Compile `programs` for every configured size (the others compile on first use), then place the weights
        if they were still being read; returns seconds per program (a warm cache makes it short)."""
        self.executables.compile(self.sizes, programs)
        if self.bank is not None and Programs.adapters in programs:
            self.bank.warm()  # the slot write, compiled now: loading an adapter later compiles nothing
        self._place()
        return dict(self.compile_s)

    def executable(self, height: int, width: int, kind: ProgramKind = ADVANCE) -> Any:
        """The compiled part `kind` for (batch_rows, height, width), compiled on first use."""
        return self.executables.get(kind, height, width)

    def place(self, params: Any, role: Role = Role.base) -> Any:
        """A model's weights (the checkpoint's layout, on the host) on the devices, replicated over the data
        axis, in the form its programs take (program_weights.prepare: fused projections, FP8 kernels)."""
        return self.place_groups(placement.groups_of(params), role)

    def place_groups(self, groups: Iterable[tuple[str, convert.FlatTree]], role: Role = Role.base) -> Any:
        """place() from (component, group) pairs, such as Model.stream() yields: each group is on the devices,
        in the program's form, before the next is asked for, and not held here after."""
        projections = program_weights.form(self.models[role], self.light_step)
        return placement.place(groups, self.replicated, projections)

    def _read_and_place(self) -> tuple[Any, float]:
        t0 = time.perf_counter()
        # Ready means on the devices: each group is copied before the next is read (a failed read raises here,
        # and from compile()).
        placed = self.place_groups(self.model.stream())
        return placed, time.perf_counter() - t0 - self.model.weights_s

    def _place(self) -> None:
        if self._placing is not None:
            t0 = time.perf_counter()
            self.params, self.place_s = self._placing.result()
            self.weights_wait_s = time.perf_counter() - t0
            self._placing = None

    # ------------------------------------------------------------------ running

    def validate(self, row: Row, height: int, width: int) -> None:
        self.inputs.validate(row, height, width)

    def dispatch(
        self,
        rows: Sequence[Row],
        height: int,
        width: int,
        latents: np.ndarray | None = None,
        output: str = Pixels.uint8,
        guided: bool | None = None,
    ) -> Pending:
        """Start a batch on the devices and return at once. latents: explicit unit noise per row
        (n, C, h, w) instead of each row's seed (for parity checks with other implementations). guided: None
        picks the program by the rows (guidance-free when no row has guidance > 1); True runs the guided one
        anyway (the same images: benchmarks compare the two on the same rows)."""
        batch = self.inputs.build(rows, height, width)
        if guided is False and batch.guided:
            raise EngineInputError("guidance_scale", "a row has guidance > 1: the guidance-free program cannot run it")
        guided = batch.guided if guided is None else guided
        adapters, used = self._adapters(batch)
        seeds = jax.device_put(batch.seeds, self.rows_sharding)
        noise = self._noise(seeds, latents, len(rows), height, width)
        self._place()
        start = self._start(batch, noise, seeds, height, width)
        parts = {"encode": batch.images, "lora": adapters, "control": batch.controls, "ip_adapter": batch.image_prompts}
        self.dispatched.update([name for name, part in parts.items() if part is not None])
        self.dispatched["advance" if guided else "advance-free"] += 1
        put = lambda pair: [jax.device_put(x, self.rows_sharding) for x in pair]  # noqa: E731
        controls = None if batch.controls is None else ControlInputs(self.control_weights, *put(batch.controls))
        images = None if batch.image_prompts is None else ImageInputs(self.image_weights, *put(batch.image_prompts))
        steps = batch.base.steps + (batch.refiner.steps if batch.refiner is not None else 0)
        estimates: dict[int, Any] = {}  # steps done -> the rows' denoised estimate (previews), kept as they run
        calls = self._calls(batch, adapters, start, guided, (height, width), output, (controls, images), estimates)
        draw = lambda estimate, row: self.previews.draw(estimate, row, (height, width))  # noqa: E731
        return Pending(self.feed.submit(calls), len(rows), batch.truncated, steps, used, estimates, draw)

    def _calls(
        self,
        batch: HostBatch,
        adapters: AdapterInputs | None,
        start: Start,
        guided: bool,
        size: tuple[int, int],
        output: str,
        conditioning: tuple[ControlInputs | None, ImageInputs | None],
        estimates: dict[int, Any],
    ) -> feed.Calls:
        """The batch's device calls, for the feed: begin, advance per chunk (yielding its mark) -> [the refiner's
        begin and advance on the base's sample] -> finish. Returns (images, finite) on the devices."""
        base = self._sample(Role.base, adapters, batch.base, start, guided, size, 0, estimates, *conditioning)
        state, scalars = yield from base
        params, role = self.params, Role.base
        if batch.refiner is not None:  # the refiner's steps on the base's sample, queued behind the base's
            start = start.replace(init=state.x)
            refined = self._sample(Role.refiner, None, batch.refiner, start, guided, size, batch.base.steps, estimates)
            state, scalars = yield from refined
            params, role = self.refiner_params, Role.refiner
        finish = self.executable(*size, ProgramKind(Part.finish, output=Pixels(output), model=role))
        return finish(params, state, scalars)

    def _sample(
        self,
        role: Role,
        adapters: AdapterInputs | None,
        inputs: ModelInputs,
        start: Start,
        guided: bool,
        size: tuple[int, int],
        done: int,
        estimates: dict[int, Any],
        controls: ControlInputs | None = None,
        images: ImageInputs | None = None,
    ) -> Generator[feed.Mark, None, tuple[SamplerState, Any]]:
        """begin, then advance once per chunk of progress_every_steps, on one model, yielding each chunk's mark
        (steps done counting on from `done`) and keeping its denoised estimate in `estimates`. Returns (the last
        state, the rows' scalars)."""
        params = self.params if role is Role.base else self.refiner_params
        kind = ProgramKind(Part.begin, guided, model=role, adapted=adapters is not None, imaged=images is not None)
        begin = self.executable(*size, kind)
        advance = self.executable(*size, replace(kind, part=Part.advance, controlled=controls is not None))
        placed: ModelInputs = jax.device_put(inputs, self.rows_sharding)
        state, text = begin(params, adapters, BeginInputs(placed.prompts, start, placed.scalars, images))
        rest = AdvanceInputs(text, placed.scalars, placed.time_ids, placed.tables, controls)
        for first in range(0, inputs.steps, self.progress_every_steps):
            stop = min(first + self.progress_every_steps, inputs.steps)
            state, mark = advance(params, adapters, state, rest, self.constants.step(first), self.constants.step(stop))
            self.chunks += 1
            estimates[done + stop] = state.d  # a reference, not a copy: nothing moves unless asked for
            yield done + stop, mark
        return state, placed.scalars

    def _noise(self, seeds: Any, latents: np.ndarray | None, rows: int, height: int, width: int) -> Any:
        """Each row's starting noise: from its seed, or `latents` (padded like the rows)."""
        if latents is None:
            return self.executable(height, width, ProgramKind(Part.noise))(seeds)
        latents = np.asarray(latents, np.float32)
        want = (rows, *self.executables.dims(height, width).latents[1:])
        if latents.shape != want:
            raise EngineInputError("latents", f"expected shape {want}, got {latents.shape}")
        pad = np.repeat(latents[-1:], self.batch_rows - rows, axis=0)
        return jax.device_put(np.concatenate([latents, pad]), self.rows_sharding)

    def _start(self, batch: HostBatch, noise: Any, seeds: Any, height: int, width: int) -> Start:
        """Where sampling starts: the noise, the init images' latents (encoded on the devices), the masks."""

        def latents_of(images: np.ndarray | None) -> Any:
            if images is None:
                return self.constants.placeholder("init", height, width)
            encode = self.executable(height, width, ProgramKind(Part.encode))
            return encode(self.params, EncodeInputs(jax.device_put(images, self.rows_sharding)))

        init = latents_of(batch.images)
        mask = self.constants.placeholder("mask", height, width)
        if batch.masks is not None:
            mask = jax.device_put(batch.masks, self.rows_sharding)
        return Start(noise=noise, init=init, mask=mask, masked=latents_of(batch.masked_images), seeds=seeds)

    def _adapters(self, batch: HostBatch) -> tuple[AdapterInputs | None, list[list[lora.Adapter]]]:
        """The rows' adapter slots and scales on the devices (adapters written into the bank first), or None
        when no row names one: then the plain programs run, and the batch pays nothing for the bank."""
        if self.bank is None or not any(batch.loras):
            return None, []
        try:
            slots, scales, used, tree = self.bank.choose(batch.loras)
        except lora.AdapterError as e:
            raise EngineInputError("loras", str(e)) from None
        put = lambda x: jax.device_put(x, self.rows_sharding)  # noqa: E731
        return AdapterInputs(bank=tree, slots=put(slots), scales=put(scales)), used

    def _read_adapter(self, name: str, found: dict[lora.Key, lora.Target], known: dict[str, lora.Key]) -> lora.Adapter:
        assert self.adapters is not None
        try:
            path = self.adapters.path_of(name)
        except KeyError:
            raise lora.AdapterError(f"no adapter named {name!r}") from None
        return lora.read(path, name, self.model, found, known)

    def adapter(self, name: str) -> lora.Adapter:
        """An adapter by name, read and placed on the devices (a worker warms its popular ones at start)."""
        if self.bank is None:
            raise EngineInputError("loras", "this engine serves no LoRA adapters")
        try:
            return self.bank.adapter(name)
        except lora.AdapterError as e:
            raise EngineInputError("loras", str(e)) from None

    def generate(self, rows: Sequence[Row], height: int, width: int, **kwargs: Any) -> Output:
        return self.dispatch(rows, height, width, **kwargs).fetch()
