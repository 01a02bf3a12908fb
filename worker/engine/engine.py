"""The engine: rows in, pixels out. It knows nothing of jobs, queues or storage.

    engine = Engine(model.load("tiny"), sizes=[(1024, 1024)], batch_rows=4)
    engine.compile()                              # every configured shape, at start
    out = engine.generate([Row("a cat", seed=1)], height=1024, width=1024)
    out.images  # (1, 1024, 1024, 3) uint8

What recompiles: only a new (batch_rows, height, width), a new model, dtype or device set. Prompts, seeds,
guidance, steps, schedulers and size conditioning are inputs of the executables of a shape (program.py: one
each for the text encoders, the denoising steps and the decode).

Progress: `Pending.progress()` yields the steps done as each chunk of `progress_every_steps` finishes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from worker.engine import attention as attention_impl
from worker.engine import cache, compile_log, program, schedule
from worker.engine.model import Model
from worker.engine.schedule import MAX_STEPS, Scheduler

log = logging.getLogger(__name__)
MAX_TOKENS = 77  # both SDXL tokenizers' model_max_length
MAX_SEED = 2**32 - 1


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


@dataclass
class Output:
    images: np.ndarray  # (n, H, W, 3) uint8, or float32 in [0, 1] for output="float32"
    truncated: list[bool]  # per row: prompt or negative prompt was cut to 77 tokens
    finite: list[bool]  # per row: False when the model produced NaN/inf (the image is not usable)


@dataclass
class Pending:
    """A dispatched batch: device arrays still being computed (JAX dispatch is asynchronous)."""

    images: Any
    finite: Any
    rows: int
    truncated: list[bool]
    steps: int = 0  # the batch's step count: its longest row's
    marks: list[tuple[int, Any]] = field(default_factory=list)  # (steps done, a scalar ready when they are)

    def progress(self) -> Iterator[int]:
        """Steps done, as each chunk of steps finishes on the device (blocks between them)."""
        for done, mark in self.marks:
            mark.block_until_ready()
            yield done

    def fetch(self) -> Output:
        images = np.asarray(self.images)[: self.rows]  # blocks until the device is done
        return Output(images, self.truncated, [bool(f) for f in np.asarray(self.finite)[: self.rows]])


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
    ):
        if model.weights_dropped:
            raise EngineInputError("model", "its host weights were dropped once placed (drop_host_weights); reload it")
        devices = list(devices or jax.local_devices())
        if batch_rows < 1 or batch_rows % len(devices):
            raise EngineInputError(
                "batch_rows", f"must be a positive multiple of the device count {len(devices)}, got {batch_rows}"
            )
        factor = model.vae_scale_factor * 2 ** (len(model.unet.block_out_channels) - 1)
        for h, w in sizes:
            if h % factor or w % factor:
                raise EngineInputError("sizes", f"{h}x{w}: height and width must be multiples of {factor}")
        attention = attention_impl.resolve(attention, devices[0].platform, len(devices))
        if attention not in attention_impl.IMPLEMENTATIONS:
            raise EngineInputError("attention", f"auto or one of {attention_impl.IMPLEMENTATIONS}, got {attention!r}")
        if progress_every_steps < 1:
            raise EngineInputError("progress_every_steps", f"must be at least 1, got {progress_every_steps}")
        self.progress_every_steps = progress_every_steps
        self.attention = attention
        self.model = model
        self.sizes = [tuple(s) for s in sizes]
        self.batch_rows = batch_rows
        self.mesh = Mesh(np.array(devices), ("data",))
        # Pallas kernels run interpreted off their own platform (a CPU test of splash), compiled on it.
        self.attend = attention_impl.make(attention, self.mesh, interpret=devices[0].platform != "tpu")
        self.rows_sharding, self.replicated = program.shardings(self.mesh)
        # Weights go to every device once, replicated: P() over the data axis. A model still reading its
        # weights (model.load(background=True)) is placed by a thread as soon as they are read, while the
        # programs compile or load; compile() waits for it at the end.
        self.params = None
        self._placing: Future[tuple[Any, float]] | None = None
        if model.pending:
            pool = ThreadPoolExecutor(1, thread_name_prefix="place-weights")
            self._placing = pool.submit(self._read_and_place)
            pool.shutdown(wait=False)  # its one thread ends with the placement
        else:
            self.params = jax.device_put(model.params, self.replicated)
        self.weights_wait_s = 0.0  # how long compile() waited for the weights to be read and placed
        self.place_s = 0.0  # how long copying them to the devices took (overlapping the programs)
        self._executables: dict[tuple[str, int, int, int, str], Any] = {}
        self._programs: dict[str, program.Program] = {}
        self._step_numbers: dict[int, Any] = {}  # step index -> a replicated int32 on the devices
        self._noise: dict[tuple[int, int, int], Any] = {}
        self._schedules: dict[tuple[str, int], schedule.Schedule] = {}
        self.compile_s: dict[str, float] = {}
        # Serialized executables (see _aot_path): a warm start skips tracing, lowering and compiling.
        self.aot_dir = Path(aot_dir) if aot_dir else None
        # each file sealed with this key, checked before it is unpickled (worker/engine/cache.py)
        self.aot_key = (aot_key or cache.signing_key()) if self.aot_dir else None
        compile_log.install()  # tells a real compile from a persistent-cache hit (_load_or_compile)
        self.aot_loaded = 0
        self._tokens = functools.lru_cache(maxsize=4096)(self._tokenize_one)

    # ------------------------------------------------------------------ compiling

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.model.vae_scale_factor
        return (self.model.latent_channels, height // f, width // f)

    def _abstract_args(self, part: str, rows: int, height: int, width: int) -> list[Any]:
        """The arguments of one part of the program (program.Program), as shapes with their shardings."""
        r, s = self.rows_sharding, self.replicated
        spec = jax.ShapeDtypeStruct
        params = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype, sharding=s), self.model.params)
        latents = spec((rows, *self._latent_shape(height, width)), jnp.float32, sharding=r)
        scalars = spec((rows, len(program.SCALARS)), jnp.float32, sharding=r)
        begin = [
            params,
            spec((rows, 2, MAX_TOKENS), jnp.int32, sharding=r),  # ids
            spec((rows, 2, MAX_TOKENS), jnp.int32, sharding=r),  # neg_ids
            spec((rows,), jnp.bool_, sharding=r),  # neg_zero
            latents,  # noise
            scalars,
        ]
        if part == "begin":
            return begin
        if part == "finish":
            return [params, latents, scalars]
        _, _, context, pooled = jax.eval_shape(self._program("uint8").begin, *begin)
        return [
            params, latents, latents,  # x, d
            spec(context.shape, context.dtype, sharding=r), spec(pooled.shape, pooled.dtype, sharding=r),
            scalars,
            spec((rows, 6), jnp.float32, sharding=r),  # time_ids
            spec((rows, len(program.TABLES), MAX_STEPS), jnp.float32, sharding=r),
            spec((), jnp.int32, sharding=s), spec((), jnp.int32, sharding=s),  # start, stop
        ]  # fmt: skip

    def _program(self, output: str) -> program.Program:
        if output not in self._programs:
            self._programs[output] = program.build(self.model, output, self.attend)
        return self._programs[output]

    def _aot_path(self, kind: str, height: int, width: int) -> Path | None:
        """Where this program's serialized executable lives. The name covers everything the executable
        depends on except what the folder already does (chip kind, device count, JAX version, cache.key):
        the engine's own source, library versions, model configs and dtype, shape, attention."""
        if self.aot_dir is None:
            return None
        import flax

        digest = hashlib.sha256()
        for source in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(source.read_bytes())
        m = self.model
        identity = (
            flax.__version__, m.configs.identity(), np.dtype(m.dtype).name, np.dtype(m.dtype_of("vae")).name,
            self.attention, [str(d) for d in self.mesh.devices.flat],
        )  # fmt: skip
        digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
        return self.aot_dir / f"{kind}-{self.batch_rows}x{height}x{width}-{digest.hexdigest()[:20]}.bin"

    def _load_or_compile(self, path: Path | None, lower: Any) -> Any:
        from jax.experimental import serialize_executable

        if path is not None and path.exists():
            assert self.aot_key is not None
            try:
                payload = cache.unseal(path.read_bytes(), self.aot_key)
                if payload is None:
                    path.unlink(missing_ok=True)  # checked at every start otherwise; the compile below rewrites it
                    raise ValueError("not sealed with this deployment's key (SDXL_CACHE_SIGNING_KEY): not unpickled")
                blob, in_tree, out_tree = pickle.loads(payload)
                loaded = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
                self.aot_loaded += 1
                return loaded
            except Exception:  # stale, unreadable or foreign: compile as if it were not there
                log.warning("could not load %s; compiling instead", path, exc_info=True)
        hits_before = compile_log.snapshot().cache_hits
        compiled = lower().compile()
        if path is not None and compile_log.snapshot().cache_hits > hits_before:
            # JAX's persistent cache served it: such an executable does not serialize whole (on the CPU, the
            # loaded file then fails at dispatch: "Function ... not found"), so only a real compile is kept.
            log.info("%s came from JAX's cache; not serialized (the next real compile writes it)", path.name)
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            assert self.aot_key is not None
            tmp.write_bytes(cache.seal(pickle.dumps(serialize_executable.serialize(compiled)), self.aot_key))
            os.replace(tmp, path)
        return compiled

    def executable(self, height: int, width: int, output: str = "uint8", part: str = "advance") -> Any:
        """The compiled `part` of the program (begin, advance or finish; only finish depends on `output`)
        for (batch_rows, height, width); compiled on first use."""
        output = output if part == "finish" else "uint8"
        key = (part, self.batch_rows, height, width, output)
        if key not in self._executables:
            # Recompiles: a new key above, or a new model/dtype/device set/attention (a new Engine). Nothing else.
            r, s = self.rows_sharding, self.replicated
            outs = {"begin": (r, r, r, r), "advance": (r, r, s), "finish": (r, r)}[part]
            jitted = jax.jit(getattr(self._program(output), part), out_shardings=outs)
            t0 = time.perf_counter()

            def lower() -> Any:
                return jitted.lower(*self._abstract_args(part, self.batch_rows, height, width))

            loaded_before = self.aot_loaded
            kind = f"finish-{output}" if part == "finish" else part
            self._executables[key] = self._load_or_compile(self._aot_path(kind, height, width), lower)
            name = f"{self.batch_rows}x{height}x{width}/{kind}"
            self.compile_s[name] = time.perf_counter() - t0
            how = "loaded the serialized executable" if self.aot_loaded > loaded_before else "traced and compiled"
            log.info("%s %s in %.2f s", how, name, self.compile_s[name])
        return self._executables[key]

    def _noise_executable(self, height: int, width: int) -> Any:
        key = (self.batch_rows, height, width)
        if key not in self._noise:
            # Recompiles on a new (batch_rows, height, width) only; seeds are inputs.
            fn = jax.jit(program.noise_fn(self._latent_shape(height, width)), out_shardings=self.rows_sharding)
            arg = jax.ShapeDtypeStruct((self.batch_rows,), jnp.uint32, sharding=self.rows_sharding)
            self._noise[key] = self._load_or_compile(self._aot_path("noise", height, width), lambda: fn.lower(arg))
        return self._noise[key]

    def compile(self) -> dict[str, float]:
        """Compile every configured size, then place the weights if they were still being read; returns
        seconds per program (a warm persistent cache makes it short)."""
        for h, w in self.sizes:
            self._noise_executable(h, w)
            for part in ("begin", "advance", "finish"):
                self.executable(h, w, part=part)
        self._place()
        return dict(self.compile_s)

    def _read_and_place(self) -> tuple[Any, float]:
        params = self.model.wait()  # a failed read raises here, and from compile()
        t0 = time.perf_counter()
        # Ready means on the devices: wait for the copies (mapped weights may still be coming off the disk).
        placed = jax.block_until_ready(jax.device_put(params, self.replicated))
        return placed, time.perf_counter() - t0

    def _place(self) -> None:
        if self._placing is not None:
            t0 = time.perf_counter()
            self.params, self.place_s = self._placing.result()
            self.weights_wait_s = time.perf_counter() - t0
            self._placing = None

    # ------------------------------------------------------------------ inputs

    def validate(self, row: Row, height: int, width: int) -> None:
        if (height, width) not in self.sizes:
            served = ", ".join(f"{w}x{h}" for h, w in self.sizes)
            raise EngineInputError("size", f"{width}x{height} is not served; served sizes (width x height): {served}")
        if row.scheduler not in set(Scheduler):
            raise EngineInputError(
                "scheduler", f"{row.scheduler!r} is unknown; use one of {[s.value for s in Scheduler]}"
            )
        if not 1 <= row.steps <= MAX_STEPS:
            raise EngineInputError("steps", f"must be between 1 and {MAX_STEPS}, got {row.steps}")
        if not math.isfinite(row.guidance_scale):
            raise EngineInputError("guidance_scale", f"must be a finite number, got {row.guidance_scale}")
        if not 0 <= row.seed <= MAX_SEED:
            raise EngineInputError("seed", f"must be between 0 and {MAX_SEED}, got {row.seed}")

    def _schedule(self, scheduler: str, steps: int) -> schedule.Schedule:
        key = (scheduler, steps)
        if key not in self._schedules:  # a few hundred microseconds each; cached for the hot path
            self._schedules[key] = schedule.build(self.model.noise, Scheduler(scheduler), steps)
        return self._schedules[key]

    def _tokenize_one(self, text: str) -> tuple[tuple[tuple[int, ...], ...], bool]:
        """(ids for both tokenizers, was it cut). Cached in __init__: negative prompts and padded rows repeat
        in nearly every batch, and each text takes three tokenizer passes."""
        pair = tuple(
            tuple(tok(text, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids)
            for tok in (self.model.tokenizer, self.model.tokenizer_2)
        )
        return pair, len(self.model.tokenizer(text).input_ids) > MAX_TOKENS

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        done = [self._tokens(text) for text in texts]
        return np.asarray([ids for ids, _ in done], dtype=np.int32), [cut for _, cut in done]

    def _host_inputs(self, rows: Sequence[Row], height: int, width: int) -> tuple[list[np.ndarray], list[bool]]:
        if not 1 <= len(rows) <= self.batch_rows:
            raise EngineInputError("rows", f"between 1 and {self.batch_rows} rows per call, got {len(rows)}")
        for row in rows:
            self.validate(row, height, width)
        # Pad short batches with copies of the last row; their outputs are sliced off in Pending.fetch.
        padded = list(rows) + [rows[-1]] * (self.batch_rows - len(rows))
        ids, cut_pos = self._tokenize([r.prompt for r in padded])
        neg_ids, cut_neg = self._tokenize([r.negative_prompt or "" for r in padded])
        scheds = [self._schedule(r.scheduler, r.steps) for r in padded]
        tables = np.stack([np.stack([getattr(s, name) for name in program.TABLES]) for s in scheds]).astype(np.float32)
        scalars = np.array(
            [[r.guidance_scale, s.init_scale, s.out_scale] for r, s in zip(padded, scheds, strict=True)],
            dtype=np.float32,
        )
        time_ids = np.array(
            [
                [*(r.original_size or (height, width)), *r.crop_top_left, *(r.target_size or (height, width))]
                for r in padded
            ],
            dtype=np.float32,
        )
        zeros = self.model.force_zeros_for_empty_prompt
        neg_zero = np.array([r.negative_prompt is None and zeros for r in padded])
        num_steps = np.int32(max(r.steps for r in padded))
        truncated = [a or b for a, b in zip(cut_pos, cut_neg, strict=True)][: len(rows)]
        return [ids, neg_ids, neg_zero, scalars, time_ids, tables, num_steps], truncated

    # ------------------------------------------------------------------ running

    def dispatch(
        self,
        rows: Sequence[Row],
        height: int,
        width: int,
        latents: np.ndarray | None = None,
        output: str = "uint8",
    ) -> Pending:
        """Start a batch on the devices and return at once. latents: explicit unit noise per row
        (n, C, h, w) instead of each row's seed (for parity checks with other implementations)."""
        (ids, neg_ids, neg_zero, scalars, time_ids, tables, num_steps), truncated = self._host_inputs(
            rows, height, width
        )
        r = self.rows_sharding
        if latents is None:
            seeds = np.array([row.seed for row in rows] + [rows[-1].seed] * (self.batch_rows - len(rows)), np.uint32)
            noise = self._noise_executable(height, width)(jax.device_put(seeds, r))
        else:
            latents = np.asarray(latents, np.float32)
            want = (len(rows), *self._latent_shape(height, width))
            if latents.shape != want:
                raise EngineInputError("latents", f"expected shape {want}, got {latents.shape}")
            pad = np.repeat(latents[-1:], self.batch_rows - len(rows), axis=0)
            noise = jax.device_put(np.concatenate([latents, pad]), r)
        ids, neg_ids, neg_zero, scalars, time_ids, tables = (
            jax.device_put(a, r) for a in (ids, neg_ids, neg_zero, scalars, time_ids, tables)
        )
        self._place()
        run = functools.partial(self.executable, height, width)
        # Every call below is queued on the devices at once and returns at once: the chunks run back to back.
        x, d, context, pooled = run(part="begin")(self.params, ids, neg_ids, neg_zero, noise, scalars)
        steps = int(num_steps)
        marks = []
        for start in range(0, steps, self.progress_every_steps):
            stop = min(start + self.progress_every_steps, steps)
            x, d, mark = run(part="advance")(
                self.params, x, d, context, pooled, scalars, time_ids, tables, self._step(start), self._step(stop)
            )
            marks.append((stop, mark))
        images, finite = run(output, part="finish")(self.params, x, scalars)
        return Pending(images, finite, len(rows), truncated, steps, marks)

    def _step(self, index: int) -> Any:
        """A step index on the devices (replicated), made once: not a host-to-device copy per chunk."""
        if index not in self._step_numbers:
            self._step_numbers[index] = jax.device_put(np.int32(index), self.replicated)
        return self._step_numbers[index]

    def generate(self, rows: Sequence[Row], height: int, width: int, **kwargs: Any) -> Output:
        return self.dispatch(rows, height, width, **kwargs).fetch()
