"""The engine: rows in, pixels out. It knows nothing of jobs, queues or storage.

    engine = Engine(model.load("tiny"), sizes=[(1024, 1024)], batch_rows=4)
    engine.compile()                              # the served programs of every configured size, at start
    out = engine.generate([Row("a cat", seed=1)], height=1024, width=1024)
    out.images  # (1, 1024, 1024, 3) uint8

Three parts: batch_inputs.py makes a batch's inputs on the host (checks, padding, tokens, schedules, tables);
executables.py compiles the program's parts (program.py) per shape and keeps them; the Engine here holds the
weights and the adapter bank on the devices and dispatches a batch: [encode the init images] -> begin ->
advance, once per chunk of steps -> [the refiner's begin and advance] -> finish, every call queued at once.

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
`Pending.estimate(done)` copies the rows' denoised estimate after that chunk off the devices (previews: the
finisher asks for it every few steps; a batch nobody asks costs nothing but keeping one latent per chunk).
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from worker.engine import attention as attention_impl
from worker.engine import executables, lora, program, program_weights
from worker.engine.arguments import (
    AdapterInputs,
    AdvanceInputs,
    BeginInputs,
    ControlInputs,
    EncodeInputs,
    SamplerState,
    Start,
)
from worker.engine.batch_inputs import BatchInputs, EngineInputError, HostBatch, ModelInputs, Row
from worker.engine.control_inputs import Control
from worker.engine.controlnet_source import ControlModel
from worker.engine.layers import Projections
from worker.engine.model import Model
from worker.engine.program_kind import Part, Pixels, ProgramKind, Programs, Role

__all__ = ["Adapters", "Control", "ControlModel", "Engine", "EngineInputError", "Output", "Pending", "Programs", "Row"]
ADVANCE = ProgramKind(Part.advance)  # the UNet's steps: most of a batch's time and memory (bench/accelerator.py)


@dataclass
class Output:
    images: np.ndarray  # (n, H, W, 3) uint8, or float32 in [0, 1] for output="float32"
    truncated: list[bool]  # per row: prompt or negative prompt was cut to 77 tokens
    finite: list[bool]  # per row: False when the model produced NaN/inf (the image is not usable)
    adapters: list[list[lora.Adapter]] = field(default_factory=list)  # per row: the adapters it used (hashes)


@dataclass
class Pending:
    """A dispatched batch: device arrays still being computed (JAX dispatch is asynchronous)."""

    images: Any
    finite: Any
    rows: int
    truncated: list[bool]
    steps: int = 0  # the batch's step count: its longest row's (the base's and the refiner's)
    marks: list[tuple[int, Any]] = field(default_factory=list)  # (steps done, a scalar ready when they are)
    adapters: list[list[lora.Adapter]] = field(default_factory=list)
    # steps done -> the rows' denoised estimate then, on the devices ((batch_rows, C, h, w): SamplerState.d)
    estimates: dict[int, Any] = field(default_factory=dict)

    def progress(self) -> Iterator[int]:
        """Steps done, as each chunk of steps finishes on the device (blocks between them)."""
        for done, mark in self.marks:
            mark.block_until_ready()
            yield done

    def estimate(self, done: int) -> np.ndarray | None:
        """The rows' denoised estimate (rows, C, h, w) float32 once `done` steps ran (blocks until they have);
        None when no chunk ended there. Latents are small (128x128x4 per 1024 px row): a cheap copy."""
        found = self.estimates.get(done)
        return None if found is None else np.asarray(found, np.float32)[: self.rows]

    def fetch(self) -> Output:
        images = np.asarray(self.images)[: self.rows]  # blocks until the device is done
        finite = [bool(f) for f in np.asarray(self.finite)[: self.rows]]
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
        # Weights go to every device once, replicated: P() over the data axis. A model still reading its
        # weights (LoadOptions(background=True)) is placed by a thread as soon as they are read, while the
        # programs compile or load; compile() waits for it at the end.
        self.params: Any = None
        self._placing: Future[tuple[Any, float]] | None = None
        if model.pending:
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
            self.models, self.mesh, batch_rows, attention, attend, store, self.bank, light_step, controlnets
        )
        # ControlNets (controlnet.py) on every device, in their order: a controlled advance runs each on every row
        self.controlnets = [c.name for c in controlnets]
        self.control_weights = [jax.device_put(c.params, self.replicated) for c in controlnets]
        per_row = adapters.per_row if adapters else None
        self.inputs = BatchInputs(self.models, self.sizes, batch_rows, per_row, self.controlnets)
        # batches run: "advance" (guided) or "advance-free", and of those, "encode" (init images), "lora", "control"
        self.dispatched: collections.Counter[str] = collections.Counter()
        self._zeros: dict[tuple[str, int, int], Any] = {}  # placeholder inputs (no image, no mask) per shape
        self._step_numbers: dict[int, Any] = {}  # step index -> a replicated int32 on the devices

    def _bank(self, adapters: Adapters) -> lora.Bank:
        found = lora.targets(self.model)
        known = lora.names(self.model, list(found))
        read = lambda name: self._read_adapter(name, found, known)  # noqa: E731
        dtype, per_row = self.model.dtype, adapters.per_row
        return lora.Bank(found, read, adapters.rank, adapters.slots, per_row, dtype, self.replicated)

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
        placed = jax.device_put(params, self.replicated)
        projections = program_weights.form(self.models[role], self.light_step)
        if projections == Projections():
            return placed
        # Laid out on the devices, once. Off a CPU the checkpoint-layout UNet is donated, so the devices do not
        # hold both forms at once (SDXL's UNet: 5.1 GB in bf16); a CPU's device buffers may alias the host's
        # arrays, and nothing is donated there.
        donate = () if self.mesh.devices.flat[0].platform == "cpu" else (0,)
        prepare = functools.partial(program_weights.prepare, projections=projections)
        unet = jax.jit(lambda u: prepare({"unet": u})["unet"], out_shardings=self.replicated, donate_argnums=donate)
        return {**placed, "unet": unet(placed["unet"])}

    def _read_and_place(self) -> tuple[Any, float]:
        params = self.model.wait()  # a failed read raises here, and from compile()
        t0 = time.perf_counter()
        # Ready means on the devices: wait for the copies (mapped weights may still be coming off the disk).
        placed = jax.block_until_ready(self.place(params))
        return placed, time.perf_counter() - t0

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
        # Every call below is queued on the devices at once and returns at once: the chunks run back to back.
        start = self._start(batch, noise, seeds, height, width)
        self.dispatched["advance" if guided else "advance-free"] += 1
        if batch.images is not None:
            self.dispatched["encode"] += 1
        if adapters is not None:
            self.dispatched["lora"] += 1
        controls = None
        if batch.controls is not None:
            self.dispatched["control"] += 1
            images, scales = (jax.device_put(x, self.rows_sharding) for x in batch.controls)
            controls = ControlInputs(self.control_weights, images, scales)
        marks: list[tuple[int, Any]] = []
        estimates: dict[int, Any] = {}
        size = (height, width)
        state, scalars = self._sample(Role.base, adapters, batch.base, start, guided, size, marks, estimates, controls)
        steps, params, role = batch.base.steps, self.params, Role.base
        if batch.refiner is not None:  # the refiner's steps on the base's sample, queued behind the base's
            start = start.replace(init=state.x)
            state, scalars = self._sample(Role.refiner, None, batch.refiner, start, guided, size, marks, estimates)
            steps, params, role = steps + batch.refiner.steps, self.refiner_params, Role.refiner
        finish = self.executable(height, width, ProgramKind(Part.finish, output=Pixels(output), model=role))
        images, finite = finish(params, state, scalars)
        return Pending(images, finite, len(rows), batch.truncated, steps, marks, used, estimates)

    def _sample(
        self,
        role: Role,
        adapters: AdapterInputs | None,
        inputs: ModelInputs,
        start: Start,
        guided: bool,
        size: tuple[int, int],
        marks: list[tuple[int, Any]],
        estimates: dict[int, Any],
        controls: ControlInputs | None = None,
    ) -> tuple[SamplerState, Any]:
        """begin, then advance once per chunk of progress_every_steps, on one model; a mark per chunk goes on
        `marks`, counting on from the steps already there, and its denoised estimate in `estimates`. Returns
        (the last state, the rows' scalars)."""
        params = self.params if role is Role.base else self.refiner_params
        kind = ProgramKind(Part.begin, guided, model=role, adapted=adapters is not None)
        begin = self.executable(*size, kind)
        advance = self.executable(*size, replace(kind, part=Part.advance, controlled=controls is not None))
        placed: ModelInputs = jax.device_put(inputs, self.rows_sharding)
        state, text = begin(params, adapters, BeginInputs(placed.prompts, start, placed.scalars))
        rest = AdvanceInputs(text, placed.scalars, placed.time_ids, placed.tables, controls)
        done = marks[-1][0] if marks else 0
        for first in range(0, inputs.steps, self.progress_every_steps):
            stop = min(first + self.progress_every_steps, inputs.steps)
            state, mark = advance(params, adapters, state, rest, self._step(first), self._step(stop))
            marks.append((done + stop, mark))
            estimates[done + stop] = state.d  # a reference, not a copy: nothing moves unless asked for
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
                return self._placeholder("init", height, width)
            encode = self.executable(height, width, ProgramKind(Part.encode))
            return encode(self.params, EncodeInputs(jax.device_put(images, self.rows_sharding)))

        init = latents_of(batch.images)
        mask = self._placeholder("mask", height, width)
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

    def _placeholder(self, name: str, height: int, width: int) -> Any:
        """Zero image latents or an all-ones mask on the devices, made once per shape."""
        key = (name, height, width)
        if key not in self._zeros:
            dims = self.executables.dims(height, width)
            value = (
                np.zeros(dims.latents, np.float32)
                if name == "init"
                else np.ones((self.batch_rows, 1, dims.latent_height, dims.latent_width), np.float32)
            )
            self._zeros[key] = jax.device_put(value, self.rows_sharding)
        return self._zeros[key]

    def _step(self, index: int) -> Any:
        """A step index on the devices (replicated), made once: not a host-to-device copy per chunk."""
        if index not in self._step_numbers:
            self._step_numbers[index] = jax.device_put(np.int32(index), self.replicated)
        return self._step_numbers[index]

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
