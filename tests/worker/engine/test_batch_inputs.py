"""A batch's host inputs (worker/engine/batch_inputs.py), made without a device: padding, per-row numbers, the
shapes the executables are lowered with, and schedule errors named by the request's field."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from worker.engine.arguments import AdvanceInputs, Dims, Prompts, RowScalars, abstract
from worker.engine.batch_inputs import BatchInputs, EngineInputError, Row
from worker.engine.program_kind import Role
from worker.engine.schedule import TABLES


@pytest.fixture(scope="module")
def inputs(tiny32) -> BatchInputs:
    return BatchInputs({Role.base: tiny32, Role.refiner: tiny32}, [(64, 96)], batch_rows=4, adapters_per_row=2)


def test_a_short_batch_is_padded_with_its_last_row(inputs):
    image = np.full((64, 96, 3), 200, np.uint8)
    rows = [Row("a cat", seed=1, steps=2), Row("a dog " * 20, "grass", seed=2, steps=6, image=image, strength=0.5)]
    batch = inputs.build(rows, 64, 96)
    assert batch.truncated == [False, True]  # the requested rows only
    assert batch.base.steps == 3  # the longest row's: 6 steps at strength 0.5 run 3 (the first runs 2)
    np.testing.assert_array_equal(batch.seeds, [1, 2, 2, 2])
    scalars = batch.base.scalars
    # text-to-image starts from noise alone; image-to-image from the image's latents with noise at its level
    np.testing.assert_array_equal(scalars.init_weight, [0, 1, 1, 1])
    assert scalars.init_scale[0] > scalars.init_scale[1] > 0
    assert batch.images is not None and batch.images.shape == (4, 3, 64, 96) and batch.masks is None
    assert batch.images[0].max() == batch.images[0].min() == 0 and np.allclose(batch.images[1], 200 / 255 * 2 - 1)
    assert batch.refiner is None and batch.guided and batch.loras == [()] * 4


def test_the_host_arrays_have_the_shapes_the_programs_are_lowered_with(inputs, tiny32):
    batch = inputs.build([Row("x", steps=2)], 64, 96)
    f = tiny32.vae_scale_factor
    dims = Dims(4, 64, 96, tiny32.latent_channels, 64 // f, 96 // f, tiny32.unet.time_ids)
    declared = {
        "prompts": abstract(Prompts, dims, None),
        "scalars": abstract(RowScalars, dims, None),
        "advance": abstract(AdvanceInputs, dims, None, text=None),
    }
    made = {"prompts": batch.base.prompts, "scalars": batch.base.scalars, "advance": batch.base}
    for name in ("prompts", "scalars"):
        want = jax.tree_util.tree_map(lambda s: (s.shape, np.dtype(s.dtype)), declared[name])
        got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), made[name])
        assert got == want, name
    for field in ("time_ids", "tables"):
        spec = getattr(declared["advance"], field)
        assert (getattr(batch.base, field).shape, getattr(batch.base, field).dtype) == (spec.shape, spec.dtype)
    assert batch.base.tables.shape[1] == len(TABLES)


def test_rows_with_and_without_the_refiner_do_not_share_a_batch(inputs):
    with pytest.raises(EngineInputError) as err:
        inputs.build([Row("x", refiner_switch=0.8), Row("y")], 64, 96)
    assert err.value.field == "refiner_switch"
    batch = inputs.build([Row("x", refiner_switch=0.8, aesthetic_score=7.0)], 64, 96)
    assert batch.refiner is not None and batch.base.steps + batch.refiner.steps == 20
    np.testing.assert_array_equal(batch.refiner.scalars.init_weight, [1, 1, 1, 1])  # on from the base's sample
    np.testing.assert_array_equal(batch.refiner.time_ids[0, :, -1], [2.5, 7.0])  # negative, positive score


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (Row("x", scheduler="lcm", steps=60), "steps"),  # past LCM's grid: the schedule says so, by field
        (Row("x", steps=1, refiner_switch=0.01), "refiner_switch"),  # leaves the base no step
        (Row("x", seed=2**32), "seed"),
        (Row("x", loras=(("a", 1.0), ("b", 1.0), ("c", 1.0))), "loras"),
    ],
)
def test_bad_rows_name_their_field(inputs, row, field):
    with pytest.raises(EngineInputError) as err:
        inputs.build([row], 64, 96)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
