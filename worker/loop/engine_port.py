"""What the device loop needs of an engine, and nothing more: the port. The real engine (worker/engine/engine.py)
and the stand-in (worker/engine/standin.py) both satisfy it (tests/worker/loop/test_engine_port.py checks
both); the loop's stages name no engine class. `Engines` is the set a worker serves, one per model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from worker.engine.batch_inputs import Row
from worker.engine.program_kind import Role
from worker.loop.batch import BatchKey


@runtime_checkable
class ModelInfo(Protocol):
    """A served model as the loop reports it (heartbeat, PNG parameters, image records)."""

    @property
    def name(self) -> str: ...
    @property
    def weights_hash(self) -> str: ...  # sha256 of the weights as served
    @property
    def nbytes(self) -> int: ...  # the weights' bytes on each device


class AdapterInfo(Protocol):
    """A LoRA adapter a row used, as its image records it."""

    @property
    def name(self) -> str: ...
    @property
    def sha256(self) -> str: ...  # its file's: a name may later point at another file


class BatchOutput(Protocol):
    """A finished batch, copied off the device: per row, its pixels and what the engine says of them."""

    @property
    def images(self) -> np.ndarray: ...  # (rows, H, W, 3) uint8
    @property
    def truncated(self) -> list[bool]: ...  # the prompt or negative prompt was cut to 77 tokens
    @property
    def finite(self) -> list[bool]: ...  # False: the model produced NaN or inf for the row
    @property
    def adapters(self) -> Sequence[Sequence[AdapterInfo]]: ...  # the adapters each row used ([]: none at all)


@runtime_checkable
class PendingBatch(Protocol):
    """A dispatched batch still running on the device (JAX dispatch is asynchronous)."""

    @property
    def steps(self) -> int: ...  # the batch's step count: its longest row's

    def progress(self) -> Iterator[int]: ...  # steps done, as the device gets through them (blocks between)

    def cancel(self) -> bool: ...  # drop its steps not yet enqueued (True: the batch stops, with no images)

    # row `row`'s denoised estimate after `done` steps (a value progress yielded) drawn as RGB (H, W, 3) uint8, at
    # most 256 px on its long side (the engine's preview decoder: worker/engine/previews.py); None where there is
    # none. Previews (worker/loop/preview.py) encode it
    def preview(self, done: int, row: int) -> np.ndarray | None: ...

    def fetch(self) -> BatchOutput: ...  # waits for the device; raises if the program failed there


class DeviceSet(Protocol):
    @property
    def devices(self) -> np.ndarray: ...  # the devices a batch is spread over


@runtime_checkable
class EnginePort(Protocol):
    @property
    def model(self) -> ModelInfo: ...
    @property
    def models(self) -> Mapping[Role, ModelInfo]: ...  # the base, and the refiner where one is served
    @property
    def sizes(self) -> list[tuple[int, int]]: ...  # (height, width) compiled at start
    @property
    def batch_rows(self) -> int: ...  # every batch is padded to this many rows
    @property
    def conditions(self) -> Mapping[str, str | int]: ...  # what decides the bytes besides rows and weights
    @property
    def mesh(self) -> DeviceSet: ...

    def dispatch(self, rows: Sequence[Row], height: int, width: int) -> PendingBatch: ...


class Engines:
    """The engines a worker serves, by model name, in order: the first is what a job without `model` gets."""

    def __init__(self, engines: EnginePort | Mapping[str, EnginePort]):
        # one engine: named by its model
        self.by_name = dict(engines) if isinstance(engines, Mapping) else {engines.model.name: engines}
        self.default = next(iter(self.by_name.values()))

    def holds(self, model: str | None) -> bool:
        """Whether a job's `model` runs here (None: the default)."""
        return model is None or model in self.by_name

    def of(self, model: str | None) -> EnginePort:
        """The engine of a job's `model` (None or "": the default)."""
        return self.by_name[model] if model else self.default

    def dispatch(self, key: BatchKey, rows: Sequence[Row]) -> PendingBatch:
        """Start a batch on its model's engine; returns at once."""
        return self.of(key.model).dispatch(rows, key.height, key.width)

    def items(self) -> Iterator[tuple[str, EnginePort]]:
        return iter(self.by_name.items())
