"""The engine port: the real engine and the stand-in both satisfy it; the served engines by model name."""

from collections.abc import Sequence

import numpy as np

from worker.engine.batch_inputs import Row
from worker.engine.standin import StandInEngine
from worker.loop.batch import BatchKey
from worker.loop.engine_port import EnginePort, Engines, ModelInfo, PendingBatch


def test_the_stand_in_and_its_pending_batch_satisfy_the_port():
    engine = StandInEngine([(64, 64)], 2, 0.0)
    assert isinstance(engine, EnginePort) and isinstance(engine.model, ModelInfo)
    pending = engine.dispatch([Row("x", steps=3)], 64, 64)
    assert isinstance(pending, PendingBatch)
    assert list(pending.progress()) == [1, 2, 3] and pending.fetch().images.shape == (1, 64, 64, 3)


def test_the_real_engine_satisfies_the_port(tiny_dir):
    import jax

    from common.jobs import RenderConditions
    from worker.engine import model
    from worker.engine.engine import Engine

    engine = Engine(model.load_folder(tiny_dir, model.LoadOptions(np.float32)), [(64, 64)], batch_rows=1)
    assert isinstance(engine, EnginePort) and isinstance(engine.model, ModelInfo)
    # what decides its images' bytes, as each image records it (data set manifests and cards carry it)
    conditions = RenderConditions(**engine.conditions)
    assert (conditions.dtype, conditions.batch_rows, conditions.platform) == ("float32", 1, "cpu")
    assert conditions.jax == jax.__version__ and conditions.attention == engine.attention


class NoDispatch:
    """Everything the port names but dispatch."""

    def __init__(self) -> None:
        real = StandInEngine([(64, 64)], 1, 0.0)
        self.model, self.models, self.sizes, self.batch_rows, self.mesh = (
            real.model,
            real.models,
            real.sizes,
            real.batch_rows,
            real.mesh,
        )


def test_an_engine_without_dispatch_is_not_one():
    assert not isinstance(NoDispatch(), EnginePort)


class Recording(StandInEngine):
    def __init__(self, name: str):
        super().__init__([(64, 64), (64, 96)], 2, 0.0)
        self.name, self.calls = name, []

    def dispatch(self, rows: Sequence[Row], height: int, width: int, **kw: object):
        self.calls.append((len(rows), height, width))
        return super().dispatch(rows, height, width)


def test_engines_pick_the_jobs_model_and_the_first_by_default():
    first, second = Recording("first"), Recording("second")
    engines = Engines({"first": first, "second": second})
    assert engines.default is first and engines.of(None) is first and engines.of("") is first
    assert engines.of("second") is second
    assert engines.holds(None) and engines.holds("second") and not engines.holds("third")
    engines.dispatch(BatchKey(64, 96, True, False, "second"), [Row("x")])
    assert second.calls == [(1, 64, 96)] and first.calls == []
    alone = Engines(first)  # one engine: named by its model
    assert [name for name, _ in alone.items()] == [first.model.name]
