"""The engine: rows in, pixels out. It knows nothing of jobs, queues or storage.

    engine = Engine(model.load("tiny"), sizes=[(1024, 1024)], batch_rows=4)
    engine.compile()                              # every configured shape, at start
    out = engine.generate([Row("a cat", seed=1)], height=1024, width=1024)
    out.images  # (1, 1024, 1024, 3) uint8

What recompiles: only a new (batch_rows, height, width), a new model, dtype or device set. Prompts, seeds,
guidance, steps, schedulers, spacings, image-to-image strengths, init images and masks and size conditioning are
inputs of the executables of a shape (program.py: the text encoders and starting sample, the denoising steps,
the decode, and the VAE encoder for batches with init images). Each shape has a guided pair (begin, advance:
two UNet rows per image) and a guidance-free pair (one row per image), picked per batch: a batch whose every
row has guidance <= 1 runs the guidance-free pair and does half the UNet work. LoRA adapters (Adapters, lora.py)
are inputs too: an engine with an adapter bank has an adapter-taking begin/advance beside the plain ones, run by
batches in which any row names an adapter; which adapters, how many and at what scale compiles nothing.

Progress: `Pending.progress()` yields the steps done as each chunk of `progress_every_steps` finishes.
"""

from __future__ import annotations

import collections
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
from worker.engine import cache, compile_log, lora, program, schedule
from worker.engine.model import Model
from worker.engine.schedule import MAX_STEPS, Scheduler

log = logging.getLogger(__name__)
MAX_TOKENS = 77  # both SDXL tokenizers' model_max_length
MAX_SEED = 2**32 - 1
# The compiled parts of a shape (see `executable`); a served engine compiles SERVED_KINDS at start.
KINDS = ("begin", "advance", "begin-free", "advance-free", "encode", "finish-uint8", "finish-float32")
SERVED_KINDS = ("begin", "advance", "begin-free", "advance-free", "encode", "finish-uint8")
# the parts that take LoRA adapters: an engine with an adapter bank has a second, adapter-taking pair of each
LORA_KINDS = ("begin", "advance", "begin-free", "advance-free")


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
    strength: float | None = None  # None: diffusers' defaults, 0.3 image-to-image, 0.9999 inpainting
    # The refiner (an Engine built with one): the base runs the steps down to this share of the noise (diffusers'
    # denoising_end), the refiner the rest (denoising_start), with its aesthetic-score conditioning.
    refiner_switch: float | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # LoRA adapters, (name, scale) each: names the engine's Adapters resolve (never paths), applied per row.
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    def effective_strength(self) -> float | None:
        if self.image is None:
            return None
        if self.strength is not None:
            return self.strength
        return 0.9999 if self.mask is not None else 0.3


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
    steps: int = 0  # the batch's step count: its longest row's
    marks: list[tuple[int, Any]] = field(default_factory=list)  # (steps done, a scalar ready when they are)
    adapters: list[list[lora.Adapter]] = field(default_factory=list)

    def progress(self) -> Iterator[int]:
        """Steps done, as each chunk of steps finishes on the device (blocks between them)."""
        for done, mark in self.marks:
            mark.block_until_ready()
            yield done

    def fetch(self) -> Output:
        images = np.asarray(self.images)[: self.rows]  # blocks until the device is done
        finite = [bool(f) for f in np.asarray(self.finite)[: self.rows]]
        return Output(images, self.truncated, finite, self.adapters[: self.rows])


@dataclass(frozen=True)
class Adapters:
    """LoRA adapters an engine serves: `path_of(name)` is the file for a name (KeyError: no such adapter; the
    caller owns the folder, requests carry names); `rank`, the bank's rank (higher ranks are refused); `slots`,
    adapters resident on the devices at once; `per_row`, adapters one row may combine."""

    path_of: Any  # Callable[[str], Path]
    rank: int = 32
    slots: int = 8
    per_row: int = 2


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
        if refiner is not None and (not refiner.refiner or refiner.latent_channels != model.latent_channels):
            raise EngineInputError("refiner", "is not an SDXL refiner (one text encoder, 5 time ids) for this model")
        if model.refiner:
            raise EngineInputError("model", "is a refiner: serve a base model, with this one as its refiner")
        self.progress_every_steps = progress_every_steps
        self.attention = attention
        self.model = model
        self.models = {"base": model} | ({"refiner": refiner} if refiner is not None else {})
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
        self.refiner_params = jax.device_put(refiner.wait(), self.replicated) if refiner is not None else None
        self.adapters = adapters
        self.bank: lora.Bank | None = None
        if adapters is not None:
            found = lora.targets(model)
            known = lora.names(model, list(found))
            self.bank = lora.Bank(
                found,
                lambda name: self._read_adapter(name, found, known),
                adapters.rank,
                adapters.slots,
                adapters.per_row,
                model.dtype,
                self.replicated,
            )
        self.weights_wait_s = 0.0  # how long compile() waited for the weights to be read and placed
        self.place_s = 0.0  # how long copying them to the devices took (overlapping the programs)
        self._executables: dict[tuple[str, str, int, int, int], Any] = {}
        self._programs: dict[tuple[str, str, bool], program.Program] = {}
        self._zeros: dict[tuple[str, int, int], Any] = {}  # placeholder inputs (no image, no mask) per shape
        self._step_numbers: dict[int, Any] = {}  # step index -> a replicated int32 on the devices
        self._noise: dict[tuple[int, int, int], Any] = {}
        self._schedules: dict[tuple[str, str, int, str | None, int, float | None], schedule.Schedule] = {}
        self.compile_s: dict[str, float] = {}
        # Serialized executables (see _aot_path): a warm start skips tracing, lowering and compiling.
        self.aot_dir = Path(aot_dir) if aot_dir else None
        # each file sealed with this key, checked before it is unpickled (worker/engine/cache.py)
        self.aot_key = (aot_key or cache.signing_key()) if self.aot_dir else None
        compile_log.install()  # tells a real compile from a persistent-cache hit (_load_or_compile)
        self.aot_loaded = 0
        self.dispatched: collections.Counter[str] = collections.Counter()  # batches run, by program kind
        self._tokens = functools.lru_cache(maxsize=8192)(self._tokenize_one)

    # ------------------------------------------------------------------ compiling

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.model.vae_scale_factor
        return (self.model.latent_channels, height // f, width // f)

    def _abstract_args(
        self, kind: str, rows: int, height: int, width: int, which: str = "base", adapted: bool = False
    ) -> list[Any]:
        """The arguments of one part of the program (program.Program), as shapes with their shardings."""
        r, s = self.rows_sharding, self.replicated
        spec = jax.ShapeDtypeStruct
        m = self.models[which]
        params = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype, sharding=s), m.params)
        latents = spec((rows, *self._latent_shape(height, width)), jnp.float32, sharding=r)
        mask = spec((rows, 1, *self._latent_shape(height, width)[1:]), jnp.float32, sharding=r)
        scalars = spec((rows, len(program.SCALARS)), jnp.float32, sharding=r)
        part, _, variant = kind.partition("-")
        adapters = None
        if adapted:
            assert self.bank is not None and which == "base"
            k = self.bank.per_row
            adapters = {
                "bank": lora.spec(self.bank),
                "slots": spec((rows, k), jnp.int32, sharding=r),
                "scales": spec((rows, k), jnp.float32, sharding=r),
            }
        begin = [
            params,
            adapters,
            spec((rows, 2, MAX_TOKENS), jnp.int32, sharding=r),  # ids
            spec((rows, 2, MAX_TOKENS), jnp.int32, sharding=r),  # neg_ids
            spec((rows,), jnp.bool_, sharding=r),  # neg_zero
            latents,
            latents,
            mask,
            latents,  # noise, init, mask, masked
            spec((rows,), jnp.uint32, sharding=r),  # seeds
            scalars,
        ]
        if part == "begin":
            return begin
        if part == "encode":
            return [params, spec((rows, 3, height, width), jnp.float32, sharding=r)]
        state, context, pooled = jax.eval_shape(self._program("uint8", variant != "free", which).begin, *begin)
        state = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype, sharding=r), state)
        if part == "finish":
            return [params, state, scalars]
        return [
            params,
            adapters,
            state,
            spec(context.shape, context.dtype, sharding=r),
            spec(pooled.shape, pooled.dtype, sharding=r),
            scalars,
            spec((rows, 2, m.unet.time_ids), jnp.float32, sharding=r),  # time_ids
            spec((rows, len(program.TABLES), MAX_STEPS), jnp.float32, sharding=r),
            spec((), jnp.int32, sharding=s),
            spec((), jnp.int32, sharding=s),  # start, stop
        ]

    def _program(self, output: str, guided: bool = True, which: str = "base") -> program.Program:
        key = (which, output, guided)
        if key not in self._programs:
            self._programs[key] = program.build(self.models[which], output, self.attend, guided)
        return self._programs[key]

    def _aot_path(self, kind: str, height: int, width: int, which: str = "base", adapted: bool = False) -> Path | None:
        """Where this program's serialized executable lives. The name covers everything the executable
        depends on except what the folder already does (chip kind, device count, JAX version, cache.key):
        the engine's own source, library versions, model configs and dtype, shape, attention."""
        if self.aot_dir is None:
            return None
        import flax

        digest = hashlib.sha256()
        for source in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(source.read_bytes())
        m = self.models[which]
        identity = (
            flax.__version__,
            m.configs.identity(),
            np.dtype(m.dtype).name,
            np.dtype(m.dtype_of("vae")).name,
            self.attention,
            [str(d) for d in self.mesh.devices.flat],
            (self.bank.rank, self.bank.slots, self.bank.per_row) if adapted and self.bank is not None else None,
        )
        digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
        name = (kind if which == "base" else f"{which}-{kind}") + ("-lora" if adapted else "")
        return self.aot_dir / f"{name}-{self.batch_rows}x{height}x{width}-{digest.hexdigest()[:20]}.bin"

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

    def executable(
        self, height: int, width: int, kind: str = "advance", which: str = "base", adapted: bool = False
    ) -> Any:
        """The compiled part of the program for (batch_rows, height, width), compiled on first use. kind: begin,
        advance (guided), begin-free, advance-free (guidance-free), encode, finish-uint8 or finish-float32.
        adapted: begin/advance taking the adapter bank (LORA_KINDS; an engine with adapters has both: a batch
        without any adapter runs the plain pair and pays nothing for them)."""
        if kind not in KINDS:
            raise ValueError(f"kind: one of {KINDS}, got {kind!r}")
        if adapted and (kind not in LORA_KINDS or self.bank is None or which != "base"):
            raise ValueError(f"no adapter variant of {which} {kind}")
        key = (which, kind, self.batch_rows, height, width, adapted)
        if key not in self._executables:
            # Recompiles: a new key above, or a new model/dtype/device set/attention (a new Engine). Nothing else.
            r, s = self.rows_sharding, self.replicated
            part, _, variant = kind.partition("-")
            output = variant if part == "finish" else "uint8"
            outs = {"begin": (r, r, r), "advance": (r, s), "finish": (r, r), "encode": r}[part]
            jitted = jax.jit(getattr(self._program(output, variant != "free", which), part), out_shardings=outs)
            t0 = time.perf_counter()

            def lower() -> Any:
                return jitted.lower(*self._abstract_args(kind, self.batch_rows, height, width, which, adapted))

            loaded_before = self.aot_loaded
            self._executables[key] = self._load_or_compile(self._aot_path(kind, height, width, which, adapted), lower)
            name = f"{self.batch_rows}x{height}x{width}/{kind if which == 'base' else f'{which}-{kind}'}"
            name += "-lora" if adapted else ""
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
            for kind in SERVED_KINDS:
                self.executable(h, w, kind)
            if "refiner" in self.models:  # its own text encoder, steps and decode (no image input)
                for kind in SERVED_KINDS:
                    if kind != "encode":
                        self.executable(h, w, kind, "refiner")
        if self.bank is not None:
            for h, w in self.sizes:
                for kind in LORA_KINDS:
                    self.executable(h, w, kind, adapted=True)
            self.bank.warm()  # the slot write, compiled now: loading an adapter later compiles nothing
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
        if row.timestep_spacing is not None and row.timestep_spacing not in set(schedule.Spacing):
            raise EngineInputError(
                "timestep_spacing", f"{row.timestep_spacing!r}: one of {[s.value for s in schedule.Spacing]}"
            )
        if not 1 <= row.steps <= MAX_STEPS:
            raise EngineInputError("steps", f"must be between 1 and {MAX_STEPS}, got {row.steps}")
        if not math.isfinite(row.guidance_scale):
            raise EngineInputError("guidance_scale", f"must be a finite number, got {row.guidance_scale}")
        if not 0 <= row.seed <= MAX_SEED:
            raise EngineInputError("seed", f"must be between 0 and {MAX_SEED}, got {row.seed}")
        if row.loras:
            if self.bank is None:
                raise EngineInputError("loras", "this engine serves no LoRA adapters")
            if len(row.loras) > self.bank.per_row:
                raise EngineInputError("loras", f"{len(row.loras)} adapters; at most {self.bank.per_row} per image")
            for name, scale in row.loras:
                if not math.isfinite(scale):
                    raise EngineInputError("loras", f"adapter {name!r}: scale must be a finite number, got {scale}")
        if row.refiner_switch is not None:
            if "refiner" not in self.models:
                raise EngineInputError("refiner_switch", "this engine has no refiner")
            if not 0 < row.refiner_switch < 1:
                raise EngineInputError("refiner_switch", f"must be between 0 and 1, got {row.refiner_switch}")
            if row.image is not None:
                raise EngineInputError("refiner_switch", "the refiner does not take an init image here")
            for name in ("aesthetic_score", "negative_aesthetic_score"):
                if not math.isfinite(getattr(row, name)):
                    raise EngineInputError(name, f"must be a finite number, got {getattr(row, name)}")
        if row.image is None:
            for name in ("mask", "strength"):
                if getattr(row, name) is not None:
                    raise EngineInputError(name, "needs an init image")
            return
        if row.image.shape != (height, width, 3) or row.image.dtype != np.uint8:
            raise EngineInputError(
                "image",
                f"must be ({height}, {width}, 3) uint8 (the output size), got {row.image.shape} {row.image.dtype}",
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

    def _schedule(self, row: Row, which: str = "base") -> schedule.Schedule:
        """The row's tables on the base model or (its share of the steps) on the refiner."""
        strength = row.effective_strength()
        skipped = 0
        if strength is not None and not (row.mask is not None and strength == 1):
            skipped = schedule.skipped_steps(row.steps, strength)
        key = (which, row.scheduler, row.steps, row.timestep_spacing, skipped, row.refiner_switch)
        if key not in self._schedules:  # a few hundred microseconds each; cached for the hot path
            noise = self.models[which].noise
            start, stop = skipped, None
            if row.refiner_switch is not None:
                # each model splits its own run's timesteps at the switch (diffusers' denoising_end on the base,
                # denoising_start on the refiner, each from its own scheduler config)
                ts = schedule.timesteps(noise, row.scheduler, row.steps, row.timestep_spacing)
                split = schedule.switch_step(ts, row.refiner_switch, noise.num_train_timesteps)
                start, stop = (split, None) if which == "refiner" else (0, split)
            try:
                made = schedule.build(noise, row.scheduler, row.steps, row.timestep_spacing, start, stop)
            except ValueError as e:  # a scheduler this model's config cannot run (LCM past its grid, ...)
                field_name, _, message = str(e).partition(": ")
                if row.refiner_switch is not None and field_name == "strength":
                    field_name = "refiner_switch"
                raise EngineInputError(field_name if message else "scheduler", message or str(e)) from None
            self._schedules[key] = made
        return self._schedules[key]

    def _tokenize_one(self, text: str, which: str = "base") -> tuple[tuple[tuple[int, ...], ...], bool]:
        """(ids for both tokenizers, was it cut). Cached in __init__: negative prompts and padded rows repeat
        in nearly every batch, and each text takes three tokenizer passes. The refiner has the second
        tokenizer alone: its ids stand in both places (the first is not read)."""
        m = self.models[which]
        first = m.tokenizer or m.tokenizer_2
        pair = tuple(
            tuple(tok(text, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids)
            for tok in (first, m.tokenizer_2)
        )
        return pair, len(first(text).input_ids) > MAX_TOKENS

    def _tokenize(self, texts: list[str], which: str = "base") -> tuple[np.ndarray, list[bool]]:
        done = [self._tokens(text, which) for text in texts]
        return np.asarray([ids for ids, _ in done], dtype=np.int32), [cut for _, cut in done]

    def _refiner_inputs(self, padded: list[Row], height: int, width: int) -> dict[str, Any]:
        """The refiner's own inputs for a batch: its text encoding, tables from the switch on, and its time ids
        (original size, crop, aesthetic score; the unconditional row with the negative score)."""
        ids, _ = self._tokenize([r.prompt for r in padded], "refiner")
        neg_ids, _ = self._tokenize([r.negative_prompt or "" for r in padded], "refiner")
        scheds = [self._schedule(r, "refiner") for r in padded]
        zeros = self.models["refiner"].force_zeros_for_empty_prompt
        time_ids = []
        for r in padded:
            size = [*(r.original_size or (height, width)), *r.crop_top_left]
            time_ids.append([[*size, r.negative_aesthetic_score], [*size, r.aesthetic_score]])
        return {
            "ids": ids,
            "neg_ids": neg_ids,
            "neg_zero": np.array([r.negative_prompt is None and zeros for r in padded]),
            # the sample goes on from the base's: init weight 1, no noise added (diffusers' denoising_start)
            "scalars": np.array(
                [[r.guidance_scale, 0.0, s.out_scale, 1.0] for r, s in zip(padded, scheds, strict=True)],
                dtype=np.float32,
            ),
            "time_ids": np.array(time_ids, dtype=np.float32),
            "tables": np.stack([np.stack([s.tables[n] for n in program.TABLES]) for s in scheds]).astype(np.float32),
            "steps": max(s.steps for s in scheds),
        }

    def _host_inputs(self, rows: Sequence[Row], height: int, width: int) -> tuple[dict[str, Any], list[bool]]:
        if not 1 <= len(rows) <= self.batch_rows:
            raise EngineInputError("rows", f"between 1 and {self.batch_rows} rows per call, got {len(rows)}")
        for row in rows:
            self.validate(row, height, width)
        # Pad short batches with copies of the last row; their outputs are sliced off in Pending.fetch.
        padded = list(rows) + [rows[-1]] * (self.batch_rows - len(rows))
        ids, cut_pos = self._tokenize([r.prompt for r in padded])
        neg_ids, cut_neg = self._tokenize([r.negative_prompt or "" for r in padded])
        scheds = [self._schedule(r) for r in padded]
        tables = np.stack([np.stack([s.tables[name] for name in program.TABLES]) for s in scheds]).astype(np.float32)
        scalars = []
        for r, s in zip(padded, scheds, strict=True):
            # diffusers' inpainting at strength 1 starts from pure noise; every other image start adds noise to it
            from_image = r.image is not None and not (r.mask is not None and r.effective_strength() == 1)
            scalars.append([r.guidance_scale, s.image_scale if from_image else s.init_scale, s.out_scale, from_image])
        # the same size conditioning for the unconditional and the conditional row (diffusers' default)
        time_ids = np.array(
            [
                [[*(r.original_size or (height, width)), *r.crop_top_left, *(r.target_size or (height, width))]] * 2
                for r in padded
            ],
            dtype=np.float32,
        )
        zeros = self.model.force_zeros_for_empty_prompt
        inputs = {
            "ids": ids,
            "neg_ids": neg_ids,
            "neg_zero": np.array([r.negative_prompt is None and zeros for r in padded]),
            "scalars": np.array(scalars, dtype=np.float32),
            "time_ids": time_ids,
            "tables": tables,
            "seeds": np.array([r.seed for r in padded], np.uint32),
            "steps": max(s.steps for s in scheds),
            "guided": any(r.guided for r in padded),
        }
        if any(r.image is not None for r in padded):
            # diffusers' preprocessing: [0, 255] -> [0, 1] -> [-1, 1]; rows without an image encode zeros (unused)
            images = np.zeros((len(padded), 3, height, width), np.float32)
            for i, r in enumerate(padded):
                if r.image is not None:
                    images[i] = (r.image.astype(np.float32) / 255.0 * 2 - 1).transpose(2, 0, 1)
            inputs["images"] = images
        if any(r.mask is not None for r in padded):
            f = self.model.vae_scale_factor
            masks = np.ones((len(padded), 1, height // f, width // f), np.float32)
            for i, r in enumerate(padded):
                if r.mask is not None:
                    # binarized at half scale, then nearest-neighbour down to the latents (diffusers' inpainting)
                    masks[i, 0] = (r.mask[::f, ::f].astype(np.float32) / 255.0 >= 0.5).astype(np.float32)
            inputs["masks"] = masks
        if self.model.inpainting:
            # An inpainting UNet sees the image with the mask's area blanked (0 in [-1, 1]) through the VAE. A row
            # without a mask is generated everywhere (all of it blanked), as is a row without an image.
            masked = np.zeros((len(padded), 3, height, width), np.float32)
            for i, r in enumerate(padded):
                if r.image is not None and r.mask is not None:
                    keep = (r.mask.astype(np.float32) / 255.0 < 0.5)[None]
                    masked[i] = inputs["images"][i] * keep
            inputs["masked_images"] = masked
        refined = {r.refiner_switch is not None for r in padded}
        if refined == {True, False}:
            raise EngineInputError("refiner_switch", "rows with and without the refiner cannot share a batch")
        if refined == {True}:
            inputs["refiner"] = self._refiner_inputs(padded, height, width)
        inputs["adapters"] = []
        if self.bank is not None and any(r.loras for r in padded):
            try:
                chosen = self.bank.choose([r.loras for r in padded])
                inputs["slots"], inputs["scales"], inputs["adapters"], inputs["bank"] = chosen
            except lora.AdapterError as e:
                raise EngineInputError("loras", str(e)) from None
        truncated = [a or b for a, b in zip(cut_pos, cut_neg, strict=True)][: len(rows)]
        return inputs, truncated

    # ------------------------------------------------------------------ running

    def _placeholder(self, name: str, height: int, width: int) -> Any:
        """Zero image latents or an all-ones mask on the devices, made once per shape."""
        key = (name, height, width)
        if key not in self._zeros:
            c, h, w = self._latent_shape(height, width)
            value = (
                np.zeros((self.batch_rows, c, h, w), np.float32)
                if name == "init"
                else np.ones((self.batch_rows, 1, h, w), np.float32)
            )
            self._zeros[key] = jax.device_put(value, self.rows_sharding)
        return self._zeros[key]

    def dispatch(
        self,
        rows: Sequence[Row],
        height: int,
        width: int,
        latents: np.ndarray | None = None,
        output: str = "uint8",
        guided: bool | None = None,
    ) -> Pending:
        """Start a batch on the devices and return at once. latents: explicit unit noise per row
        (n, C, h, w) instead of each row's seed (for parity checks with other implementations). guided: None
        picks the program by the rows (guidance-free when no row has guidance > 1); True runs the guided one
        anyway (the same images: benchmarks compare the two on the same rows)."""
        inputs, truncated = self._host_inputs(rows, height, width)
        r = self.rows_sharding
        seeds = jax.device_put(inputs["seeds"], r)
        if latents is None:
            noise = self._noise_executable(height, width)(seeds)
        else:
            latents = np.asarray(latents, np.float32)
            want = (len(rows), *self._latent_shape(height, width))
            if latents.shape != want:
                raise EngineInputError("latents", f"expected shape {want}, got {latents.shape}")
            pad = np.repeat(latents[-1:], self.batch_rows - len(rows), axis=0)
            noise = jax.device_put(np.concatenate([latents, pad]), r)
        ids, neg_ids, neg_zero, scalars, time_ids, tables = (
            jax.device_put(inputs[k], r) for k in ("ids", "neg_ids", "neg_zero", "scalars", "time_ids", "tables")
        )
        self._place()
        adapters = None
        if inputs["adapters"]:  # some row names an adapter: the programs that take the bank
            adapters = {
                "bank": inputs["bank"],
                "slots": jax.device_put(inputs["slots"], r),
                "scales": jax.device_put(inputs["scales"], r),
            }
        run = functools.partial(self.executable, height, width)
        # Every call below is queued on the devices at once and returns at once: the chunks run back to back.
        if "images" in inputs:
            init = run("encode")(self.params, jax.device_put(inputs["images"], r))
        else:
            init = self._placeholder("init", height, width)
        mask = jax.device_put(inputs["masks"], r) if "masks" in inputs else self._placeholder("mask", height, width)
        if "masked_images" in inputs:
            masked = run("encode")(self.params, jax.device_put(inputs["masked_images"], r))
        else:
            masked = self._placeholder("init", height, width)
        if guided is False and inputs["guided"]:
            raise EngineInputError("guidance_scale", "a row has guidance > 1: the guidance-free program cannot run it")
        suffix = "" if (inputs["guided"] if guided is None else guided) else "-free"
        self.dispatched["advance" + suffix] += 1
        if "images" in inputs:
            self.dispatched["encode"] += 1
        if adapters is not None:
            self.dispatched["lora"] += 1
        state, context, pooled = run("begin" + suffix, adapted=adapters is not None)(
            self.params, adapters, ids, neg_ids, neg_zero, noise, init, mask, masked, seeds, scalars
        )
        steps = int(inputs["steps"])
        marks = []
        for start in range(0, steps, self.progress_every_steps):
            stop = min(start + self.progress_every_steps, steps)
            state, mark = run("advance" + suffix, adapted=adapters is not None)(
                self.params,
                adapters,
                state,
                context,
                pooled,
                scalars,
                time_ids,
                tables,
                self._step(start),
                self._step(stop),
            )
            marks.append((stop, mark))
        if "refiner" in inputs:
            state, steps = self._refine(inputs, state, noise, mask, masked, seeds, height, width, suffix, steps, marks)
            images, finite = run(f"finish-{output}", "refiner")(
                self.refiner_params, state, jax.device_put(inputs["refiner"]["scalars"], r)
            )
        else:
            images, finite = run(f"finish-{output}")(self.params, state, scalars)
        return Pending(images, finite, len(rows), truncated, steps, marks, inputs["adapters"])

    def _refine(
        self,
        inputs: dict[str, Any],
        base: dict[str, Any],
        noise: Any,
        mask: Any,
        masked: Any,
        seeds: Any,
        height: int,
        width: int,
        suffix: str,
        done: int,
        marks: list[tuple[int, Any]],
    ) -> tuple[dict[str, Any], int]:
        """The refiner's steps on the base's sample, queued behind the base's; returns (state, steps done)."""
        r = self.rows_sharding
        ref = {k: jax.device_put(v, r) if isinstance(v, np.ndarray) else v for k, v in inputs["refiner"].items()}
        run = functools.partial(self.executable, height, width, which="refiner")
        state, context, pooled = run("begin" + suffix)(
            self.refiner_params,
            None,
            ref["ids"],
            ref["neg_ids"],
            ref["neg_zero"],
            noise,
            base["x"],
            mask,
            masked,
            seeds,
            ref["scalars"],
        )
        steps = int(ref["steps"])
        for start in range(0, steps, self.progress_every_steps):
            stop = min(start + self.progress_every_steps, steps)
            state, mark = run("advance" + suffix)(
                self.refiner_params,
                None,
                state,
                context,
                pooled,
                ref["scalars"],
                ref["time_ids"],
                ref["tables"],
                self._step(start),
                self._step(stop),
            )
            marks.append((done + stop, mark))
        return state, done + steps

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

    def _step(self, index: int) -> Any:
        """A step index on the devices (replicated), made once: not a host-to-device copy per chunk."""
        if index not in self._step_numbers:
            self._step_numbers[index] = jax.device_put(np.int32(index), self.replicated)
        return self._step_numbers[index]

    def generate(self, rows: Sequence[Row], height: int, width: int, **kwargs: Any) -> Output:
        return self.dispatch(rows, height, width, **kwargs).fetch()
