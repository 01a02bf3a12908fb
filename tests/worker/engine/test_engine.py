"""The engine on the tiny model, float32, on this CPU: parity with PyTorch diffusers, batch invariance,
no recompiles, padding, and bad input."""

import math

import numpy as np
import pytest

from worker.engine import compile_log
from worker.engine.engine import EngineInputError, Row
from worker.engine.schedule import Scheduler

PARITY_TOL = 1e-4


def _reference_row(case, scheduler):
    return Row(
        case["prompt"],
        case["negative_prompt"],
        guidance_scale=case["guidance_scale"],
        steps=case["steps"],
        scheduler=scheduler,
    )


def _run_case(engine, reference, case, scheduler):
    row = _reference_row(case, scheduler)
    latents = reference[f"{case['name']}/latents"]
    out = engine.generate([row], case["height"], case["width"], latents=latents, output="float32")
    return np.abs(out.images - reference[f"{case['name']}/image"]).max()


@pytest.mark.parametrize("name", ["euler_wide", "euler_noneg", "ddim_wide", "dpmpp_wide"])
def test_parity_with_pytorch_diffusers(engine32, reference, name):
    case = next(c for c in reference["meta"] if c["name"] == name)
    assert _run_case(engine32, reference, case, case["scheduler"]) < PARITY_TOL
    # The test must be able to fail: every other scheduler in its place misses the reference.
    for other in Scheduler:
        if other != case["scheduler"]:
            assert _run_case(engine32, reference, case, other) > 10 * PARITY_TOL, other


def test_batch_invariance_with_other_jobs_and_padding(engine32):
    job = Row("a lighthouse at dusk", "fog", seed=7, guidance_scale=6.0, steps=5, scheduler="dpmpp_2m_karras")
    alone = engine32.generate([job], 64, 64)
    others = [
        Row("a red car", seed=1, steps=3),
        job,
        Row("", seed=99, guidance_scale=1.0, steps=9, scheduler="ddim"),
    ]  # 3 rows in a 4-row batch: one padded row
    mixed = engine32.generate(others, 64, 64)
    assert mixed.images.shape == (3, 64, 64, 3)  # the padded row never comes back
    diff = np.abs(alone.images[0].astype(int) - mixed.images[1].astype(int)).max()
    assert diff <= 1
    assert not np.array_equal(mixed.images[0], mixed.images[1])  # different jobs, different images


def test_seed_decides_the_image(engine32):
    a, b, c = engine32.generate(
        [Row("x", seed=1, steps=2), Row("x", seed=2, steps=2), Row("x", seed=1, steps=2)], 64, 64
    ).images
    assert np.array_equal(a, c) and not np.array_equal(a, b)


def test_no_recompiles_for_new_prompts_seeds_steps_guidance_schedulers(engine32):
    engine32.generate([Row("warm up", steps=2)], 64, 64)  # compiles (or reuses) the uint8 program
    counter = compile_log.install()
    before = compile_log.snapshot().requests
    for i, sched in enumerate(Scheduler):
        engine32.generate(
            [Row(f"prompt {i}", f"neg {i}", seed=100 + i, guidance_scale=2.0 + i, steps=2 + i, scheduler=sched)],
            64,
            64,
        )
    assert counter.requests == before


def test_truncation_is_reported(engine32):
    long = "a very long prompt " * 10  # one token per character in the tiny vocabulary
    out = engine32.generate([Row("short", steps=1), Row(long, steps=1), Row("ok", long, steps=1)], 64, 64)
    assert out.truncated == [False, True, True]


@pytest.mark.parametrize(
    "row,size,field",
    [
        (Row("x", scheduler="heun"), (64, 64), "scheduler"),
        (Row("x"), (128, 128), "size"),
        (Row("x", steps=0), (64, 64), "steps"),
        (Row("x", steps=151), (64, 64), "steps"),
        (Row("x", guidance_scale=math.nan), (64, 64), "guidance_scale"),
        (Row("x", guidance_scale=math.inf), (64, 64), "guidance_scale"),
        (Row("x", seed=-1), (64, 64), "seed"),
    ],
)
def test_bad_input_names_the_field(engine32, row, size, field):
    with pytest.raises(EngineInputError) as err:
        engine32.generate([row], *size)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_too_many_rows(engine32):
    with pytest.raises(EngineInputError, match="rows: between 1 and 4"):
        engine32.generate([Row("x")] * 5, 64, 64)


def test_batch_rows_must_fit_the_devices(tiny32):
    from worker.engine.engine import Engine

    with pytest.raises(EngineInputError, match="batch_rows"):
        Engine(tiny32, [(64, 64)], batch_rows=0)
    with pytest.raises(EngineInputError, match="multiples of 32"):
        Engine(tiny32, [(64, 72)], batch_rows=1)


def test_dot_product_attention_matches_pytorch_too(tiny32, reference):
    """The xla implementation of jax.nn.dot_product_attention (the cudnn one needs an NVIDIA GPU)."""
    from worker.engine.engine import Engine

    engine = Engine(tiny32, [(64, 96)], batch_rows=1, attention="xla")
    case = next(c for c in reference["meta"] if c["name"] == "euler_wide")
    assert _run_case(engine, reference, case, "euler") < PARITY_TOL


def test_unknown_attention_is_refused(tiny32):
    from worker.engine.engine import Engine

    with pytest.raises(EngineInputError, match="attention"):
        Engine(tiny32, [(64, 64)], batch_rows=1, attention="flash")
