"""The engine on the tiny model, float32, on this CPU: parity with PyTorch diffusers, batch invariance,
no recompiles, padding, and bad input."""

import math

import numpy as np
import pytest

from worker.engine import compile_log
from worker.engine.engine import Engine, EngineInputError, Row
from worker.engine.schedule import Scheduler

PARITY_TOL = 1e-4
SCHEDULERS = ("euler", "ddim", "dpmpp_2m_karras")
NEGATIVES = {"text": "blurry, low quality", "absent": None, "empty": ""}


def _misses(engine, reference, rows, want):
    """Max abs pixel difference of each row (run together in one batch, same latents) from `want`."""
    meta = reference["meta"]
    latents = np.repeat(reference["latents"], len(rows), axis=0)
    out = engine.generate(rows, meta["height"], meta["width"], latents=latents, output="float32")
    return [float(np.abs(image - want[0]).max()) for image in out.images]


def _row(reference, scheduler, negative):
    meta = reference["meta"]
    return Row(
        meta["prompt"], negative, guidance_scale=meta["guidance_scale"], steps=meta["steps"], scheduler=scheduler
    )


@pytest.fixture(scope="module")
def single_file_engine(tiny_single_file, tiny_dir):
    """The same weights read from the single file (configs and tokenizers from the tiny folder, as diffusers'
    from_single_file(config=...) did for the reference)."""
    from worker.engine import model

    return Engine(
        model.load_single_file(tiny_single_file, model.LoadOptions(np.float32, config_dir=tiny_dir)),
        [(64, 96)],
        batch_rows=4,
    )


@pytest.mark.parametrize("negative", list(NEGATIVES))
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("loader", ["folder", "single_file"])
def test_parity_with_pytorch_diffusers(engine32, single_file_engine, reference, loader, scheduler, negative):
    """diffusers' StableDiffusionXLPipeline (from_pretrained / from_single_file) on the same weights and latents,
    float32. In the same batch, the test's swaps: each other scheduler, and the negative prompt swapped (text ->
    absent, absent <-> ""), must miss the reference by far."""
    engine = engine32 if loader == "folder" else single_file_engine
    want = reference[f"{loader}/{scheduler}/{negative}/image"]
    others = [s for s in SCHEDULERS if s != scheduler]
    swapped = {"text": "absent", "absent": "empty", "empty": "absent"}[negative]
    rows = [_row(reference, scheduler, NEGATIVES[negative])]
    rows += [_row(reference, other, NEGATIVES[negative]) for other in others]
    rows.append(_row(reference, scheduler, NEGATIVES[swapped]))
    same, *swaps = _misses(engine, reference, rows, want)
    assert same < PARITY_TOL
    assert min(swaps) > 10 * PARITY_TOL, swaps


def test_absent_negative_prompt_without_force_zeros_is_the_empty_string(tiny_dir, tmp_path, reference):
    """model_index.json's force_zeros_for_empty_prompt: false (the refiner, many fine-tunes): an absent negative
    prompt encodes "" instead of zero embeddings."""
    import json
    import shutil

    from worker.engine import model

    folder = tmp_path / "no-zeros"
    shutil.copytree(tiny_dir, folder)
    index = json.loads((folder / "model_index.json").read_text()) | {"force_zeros_for_empty_prompt": False}
    (folder / "model_index.json").write_text(json.dumps(index))
    engine = Engine(model.load_folder(folder, model.LoadOptions(np.float32)), [(64, 96)], batch_rows=1)
    assert (
        _misses(engine, reference, [_row(reference, "euler", None)], reference["no_zeros/euler/absent/image"])[0]
        < PARITY_TOL
    )
    # the same absent prompt on the force-zeros model is zero embeddings: far from it
    assert (
        _misses(engine, reference, [_row(reference, "euler", None)], reference["folder/euler/absent/image"])[0] > 1e-3
    )


def test_a_vae_with_latent_statistics_is_decoded_as_diffusers_does(tiny32, reference):
    """latents_mean/std in the VAE's config: latents * std / scaling_factor + mean before the decode. The same
    weights without them (the tiny model as it is) must miss the reference."""
    import dataclasses

    stats = next(c for c in reference["meta"]["cases"] if c["name"] == "latents_stats")["vae"]
    vae = dataclasses.replace(tiny32.vae, **{k: tuple(v) for k, v in stats.items()})
    with_stats = dataclasses.replace(tiny32, configs=dataclasses.replace(tiny32.configs, vae=vae))
    row = [_row(reference, "euler", "blurry")]
    want = reference["latents_stats/image"]
    assert _misses(Engine(with_stats, [(64, 96)], batch_rows=1), reference, row, want)[0] < PARITY_TOL
    assert _misses(Engine(tiny32, [(64, 96)], batch_rows=1), reference, row, want)[0] > 10 * PARITY_TOL


def test_ddim_linspace_rounds_its_timesteps_as_diffusers(tiny32, reference):
    import dataclasses

    linspace = dataclasses.replace(tiny32, noise=dataclasses.replace(tiny32.noise, timestep_spacing="linspace"))
    engine = Engine(linspace, [(64, 96)], batch_rows=2)
    rows = [_row(reference, "ddim", "blurry"), _row(reference, "euler", "blurry")]
    same, other = _misses(engine, reference, rows, reference["ddim_linspace/image"])
    assert same < PARITY_TOL and other > 10 * PARITY_TOL


def test_vae_encoder_matches_pytorch(tiny32, reference):
    import jax

    mean, logvar = jax.jit(
        lambda params, image: tiny32.configs.module("vae", np.float32).apply({"params": params}, image, method="encode")
    )(tiny32.params["vae"], reference["vae_encode/image"])
    assert np.abs(np.asarray(mean) - reference["vae_encode/mean"]).max() < PARITY_TOL
    assert np.abs(np.asarray(logvar) - reference["vae_encode/logvar"]).max() < PARITY_TOL


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


def test_progress_reports_each_chunk_of_steps_and_the_chunks_change_nothing(engine32, tiny32):
    rows = [Row("a lighthouse", "fog", seed=7, steps=7), Row("a boat", seed=8, steps=4)]
    pending = engine32.dispatch(rows, 64, 64)
    assert pending.steps == 7 and list(pending.progress()) == [1, 2, 3, 4, 5, 6, 7]
    by_step = pending.fetch().images
    chunked = Engine(tiny32, [(64, 64)], batch_rows=4, progress_every_steps=3)
    pending = chunked.dispatch(rows, 64, 64)
    assert list(pending.progress()) == [3, 6, 7]
    # each chunk's denoised estimate, for previews: the rows' latents (not the padding's), none between chunks
    early, late = pending.estimate(3), pending.estimate(6)
    assert early.shape == (2, 4, 8, 8) and early.dtype == np.float32 and pending.estimate(4) is None
    assert np.isfinite(late).all() and not np.array_equal(early, late)
    # the same steps, whatever the chunks: the same pixels (a chunk boundary that skipped or repeated a step,
    # or lost the sampler's previous estimate, would change them)
    np.testing.assert_array_equal(pending.fetch().images, by_step)
    whole = Engine(tiny32, [(64, 64)], batch_rows=4, progress_every_steps=1000)
    np.testing.assert_array_equal(whole.generate(rows, 64, 64).images, by_step)


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

    with pytest.raises(EngineInputError, match="batch_rows"):
        Engine(tiny32, [(64, 64)], batch_rows=0)
    with pytest.raises(EngineInputError, match="multiples of 32"):
        Engine(tiny32, [(64, 72)], batch_rows=1)


@pytest.mark.parametrize("attention", ["split_head", "xla"])
def test_other_attention_kernels_match_pytorch_too(tiny32, reference, attention):
    """split_head (diffusers' Flax split_head_dim layout) and the xla implementation of
    jax.nn.dot_product_attention (cudnn needs an NVIDIA GPU; splash, a TPU, is compared with einsum in interpret
    mode in test_attention.py)."""

    engine = Engine(tiny32, [(64, 96)], batch_rows=1, attention=attention)
    row = _row(reference, "euler", NEGATIVES["text"])
    assert _misses(engine, reference, [row], reference["folder/euler/text/image"])[0] < PARITY_TOL


def test_unknown_attention_is_refused(tiny32):

    with pytest.raises(EngineInputError, match="attention"):
        Engine(tiny32, [(64, 64)], batch_rows=1, attention="flash")
