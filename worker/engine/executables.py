"""The compiled parts of an engine's program (program_kind.ProgramKind), lowered from abstract arguments with
their shardings (arguments.py), compiled or read back from the sealed serialized cache (cache.py), by (kind,
height, width). Knows shapes and shardings, not rows.

What recompiles: only a new (batch_rows, height, width) or kind, a new model, dtype, quantization, device set,
attention kernel or step form (a new Engine). Prompts, seeds, guidance, steps, schedulers, strengths, images and
adapters are inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from worker.engine import cache, code_identity, lora, program, program_weights, taesd
from worker.engine.arguments import (
    AdapterInputs,
    AdvanceInputs,
    BeginInputs,
    ControlInputs,
    Dims,
    EncodeInputs,
    ImageInputs,
    RowScalars,
    abstract,
)
from worker.engine.controlnet_source import ControlModel
from worker.engine.ip_adapter_source import IPAdapterModel
from worker.engine.model import Model
from worker.engine.program_kind import Part, Pixels, ProgramKind, Programs, Role

log = logging.getLogger(__name__)


class Executables:
    """The executables of one engine's models on one mesh, for `batch_rows` rows, compiled on first use (or read
    back from `store`). bank: the LoRA bank the adapted programs read (its shapes, never its contents).
    light_step: program.Program's (the weights they take are program_weights.prepare's for it). controls: the
    ControlNets the controlled advances run (their configs and weights' shapes), in the engine's order. preview:
    the preview decoder's config (TAESD: the `preview` part), or None."""

    def __init__(
        self,
        models: Mapping[Role, Model],
        mesh: Any,
        batch_rows: int,
        attention: str,
        attend: Any,
        store: cache.SealedExecutables | None = None,
        bank: lora.Bank | None = None,
        light_step: bool = True,
        controls: Sequence[ControlModel] = (),
        images: Sequence[IPAdapterModel] = (),
        preview: taesd.TAESDConfig | None = None,
    ):
        self.models, self.mesh, self.batch_rows, self.preview = models, mesh, batch_rows, preview
        if preview is not None and preview.latent_channels != models[Role.base].latent_channels:
            raise ValueError(f"the preview decoder takes {preview.latent_channels} latent channels, not the model's")
        self.controls = list(controls)
        self.images = list(images)  # the IP-Adapters the imaged programs run, in the engine's order
        sizes = {a.config.encoder.image_size for a in self.images}
        if len(sizes) > 1:
            raise ValueError(
                f"IP-Adapters whose image encoders take other sizes ({sorted(sizes)}) cannot be served together"
            )
        self.ip_size = sizes.pop() if sizes else 224
        self.attention, self.attend, self.store, self.bank = attention, attend, store, bank
        self.light_step = light_step
        self.rows_sharding, self.replicated = program.shardings(mesh)
        self.compile_s: dict[str, float] = {}  # "{rows}x{height}x{width}/{kind}" -> seconds to compile or load
        self._compiled: dict[tuple[ProgramKind, int, int], Any] = {}
        self._programs: dict[tuple[Role, Pixels, bool, bool], program.Program] = {}

    @property
    def loaded(self) -> int:
        """Executables read back whole from the store (no tracing, lowering or compiling)."""
        return self.store.loaded if self.store is not None else 0

    def dims(self, height: int, width: int, role: Role = Role.base) -> Dims:
        m = self.models[role]
        f = m.vae_scale_factor
        per_row = self.bank.per_row if self.bank is not None else 1
        return Dims(
            self.batch_rows,
            height,
            width,
            m.latent_channels,
            height // f,
            width // f,
            m.unet.time_ids,
            per_row,
            max(1, len(self.controls)),
            max(1, len(self.images)),
            self.ip_size,
        )

    def program(self, kind: ProgramKind) -> program.Program:
        key = (kind.model, kind.output, kind.guided, kind.controlled, kind.imaged)
        if key not in self._programs:
            model = self.models[kind.model]
            controls = tuple(c.config for c in self.controls) if kind.controlled else ()
            images = tuple(a.config for a in self.images) if kind.imaged else ()
            self._programs[key] = program.Program(
                model, kind.output, self.attend, kind.guided, self.light_step, controls, images
            )
        return self._programs[key]

    def arguments(self, kind: ProgramKind, height: int, width: int) -> tuple[Any, ...]:
        """The part's arguments as shapes with their shardings, from the classes of arguments.py."""
        r, dims = self.rows_sharding, self.dims(height, width, kind.model)
        spec = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
        if kind.part is Part.preview:  # TAESD's weights, the batch's estimates (SamplerState.d), the row drawn
            assert self.preview is not None
            weights = jax.tree_util.tree_map(
                lambda x: spec(x, self.replicated), taesd.TAESDDecoder(self.preview).shapes()
            )
            row = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
            return weights, jax.ShapeDtypeStruct(dims.latents, jnp.float32, sharding=r), row
        model = self.models[kind.model]
        weights = program_weights.shapes(model.params, program_weights.form(model, self.light_step))
        params = jax.tree_util.tree_map(lambda x: spec(x, self.replicated), weights)
        if kind.part is Part.noise:
            return (jax.ShapeDtypeStruct((self.batch_rows,), jnp.uint32, sharding=r),)
        if kind.part is Part.encode:
            return params, abstract(EncodeInputs, dims, r)
        adapters = None
        if kind.adapted:
            assert self.bank is not None
            adapters = abstract(AdapterInputs, dims, r, bank=lora.spec(self.bank))
        images = None
        if kind.imaged:
            weights = [jax.tree_util.tree_map(lambda x: spec(x, self.replicated), a.params) for a in self.images]
            images = abstract(ImageInputs, dims, r, weights=weights)
        begin = abstract(BeginInputs, dims, r, images=images)
        if kind.part is Part.begin:
            return params, adapters, begin
        state, text = jax.eval_shape(self.program(kind).begin, params, adapters, begin)
        state, text = (jax.tree_util.tree_map(lambda x: spec(x, r), tree) for tree in (state, text))
        if kind.part is Part.finish:
            return params, state, abstract(RowScalars, dims, r)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
        controls = None
        if kind.controlled:
            weights = [jax.tree_util.tree_map(lambda x: spec(x, self.replicated), c.params) for c in self.controls]
            controls = abstract(ControlInputs, dims, r, weights=weights)
        return params, adapters, state, abstract(AdvanceInputs, dims, r, text=text, controls=controls), step, step

    def _function(self, kind: ProgramKind, height: int, width: int) -> Any:
        """The jitted function of a part, with its outputs' shardings."""
        r, s = self.rows_sharding, self.replicated
        if kind.part is Part.noise:
            m = self.models[Role.base]
            f = m.vae_scale_factor
            return jax.jit(program.noise((m.latent_channels, height // f, width // f)), out_shardings=r)
        if kind.part is Part.preview:
            config = self.preview
            assert config is not None

            def draw(params: Any, estimates: jax.Array, row: jax.Array) -> jax.Array:  # -> (1, H', W', 3) uint8
                return taesd.preview(config, params, jax.lax.dynamic_slice_in_dim(estimates, row, 1))

            return jax.jit(draw, out_shardings=s)
        outs = {Part.begin: (r, r), Part.advance: (r, s), Part.finish: (r, r), Part.encode: r}[kind.part]
        return jax.jit(getattr(self.program(kind), kind.part.value), out_shardings=outs)

    def file_name(self, kind: ProgramKind, height: int, width: int) -> str:
        """The serialized executable's name: everything it depends on except what the store's folder already
        says (chip kind, device count, JAX version: cache.key): the code that traces it, library versions, the
        model's configs, dtypes and quantization, the shape, the attention kernel, the step's form, the devices and
        the bank's size."""
        m = self.models[kind.model]
        identity = (
            code_identity.digest("worker.engine.executables"),
            flax.__version__,
            m.configs.identity(),
            np.dtype(m.dtype).name,
            np.dtype(m.dtype_of("vae")).name,
            str(m.quantize),
            self.light_step,
            self.attention,
            [str(d) for d in self.mesh.devices.flat],
            (self.bank.rank, self.bank.slots, self.bank.per_row) if kind.adapted and self.bank is not None else None,
            [dataclasses.asdict(c.config) for c in self.controls] if kind.controlled else None,
            [dataclasses.asdict(a.config) for a in self.images] if kind.imaged else None,
            dataclasses.asdict(self.preview) if kind.part is Part.preview and self.preview is not None else None,
        )
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return f"{kind}-{self.batch_rows}x{height}x{width}-{digest[:20]}.bin"

    def get(self, kind: ProgramKind, height: int, width: int) -> Any:
        """The executable of `kind` for (batch_rows, height, width), compiled (or loaded) on first use."""
        if kind.adapted and self.bank is None:
            raise ValueError(f"{kind}: this engine has no adapter bank")
        if kind.controlled and not self.controls:
            raise ValueError(f"{kind}: this engine serves no ControlNets")
        if kind.imaged and not self.images:
            raise ValueError(f"{kind}: this engine serves no IP-Adapters")
        if kind.part is Part.preview and self.preview is None:
            raise ValueError(f"{kind}: this engine serves no preview decoder")
        key = (kind, height, width)
        if key not in self._compiled:
            t0, loaded_before = time.perf_counter(), self.loaded

            def lower() -> Any:
                return self.lower(kind, height, width)

            if self.store is None:
                self._compiled[key] = lower().compile()
            else:
                self._compiled[key] = self.store.load_or_compile(self.file_name(kind, height, width), lower)
            name = f"{self.batch_rows}x{height}x{width}/{kind}"
            self.compile_s[name] = time.perf_counter() - t0
            how = "loaded the serialized executable" if self.loaded > loaded_before else "traced and compiled"
            log.info("%s %s in %.2f s", how, name, self.compile_s[name])
        return self._compiled[key]

    def lower(self, kind: ProgramKind, height: int, width: int) -> jax.stages.Lowered:
        """The part traced and lowered for this mesh (not compiled): what XLA's cost analysis reads."""
        return self._function(kind, height, width).lower(*self.arguments(kind, height, width))

    def export(self, kind: ProgramKind, height: int, width: int, platforms: Sequence[str]) -> jax.export.Exported:
        """The part lowered for `platforms` ("cuda", "tpu", ...) without their devices (jax.export: nothing is
        compiled), over this mesh's device count: what the tests check of the programs a GPU or a TPU would run."""
        fn = self._function(kind, height, width)
        return jax.export.export(fn, platforms=tuple(platforms))(*self.arguments(kind, height, width))

    def compile(self, sizes: Sequence[tuple[int, int]], programs: Programs) -> None:
        """Every kind of `programs` for every size, in order (see Programs.kinds)."""
        kinds = programs.kinds(
            refiner=Role.refiner in self.models,
            adapters=self.bank is not None,
            controls=bool(self.controls),
            images=bool(self.images),
            previews=self.preview is not None,
        )
        for h, w in sizes:
            for kind in kinds:
                self.get(kind, h, w)


def store(aot_dir: str | Path | None, aot_key: bytes | None) -> cache.SealedExecutables | None:
    """The sealed store in `aot_dir`, sealed with `aot_key` (else this host's key: cache.signing_key)."""
    return cache.SealedExecutables(Path(aot_dir), aot_key or cache.signing_key()) if aot_dir else None
