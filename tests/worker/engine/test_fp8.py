"""FP8 serving (fp8.py, SDXL_QUANTIZE=fp8), emulated on this CPU: its rounding is FP8's, its speed is not.

The error bounds are the tiny model's (random weights, float32 compute beside the e4m3 matmuls), measured
2026-12-06 with a margin: UNet, one call, 18.3% RMS of the float32 output; the whole image (4 Euler steps)
9.9%. A bfloat16 UNet is 2.9% off on the same call. The lower bounds catch FP8 silently off, the upper ones
FP8 badly wrong; the mid model's figures against bf16 and float32 are in docs/benchmarks.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worker.engine import convert, fp8, model, program_weights
from worker.engine.engine import Engine, Row
from worker.engine.layers import Linear
from worker.engine.model_source import Quantize


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


def test_each_output_channel_has_its_own_scale():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32) * np.logspace(-3, 3, 8, dtype=np.float32)
    q, scale = fp8.quantize_weight(jnp.asarray(w))
    assert q.dtype == fp8.E4M3 and scale.shape == (8,)
    np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(axis=0), fp8.E4M3_MAX)  # each column's amax
    back = np.asarray(q, np.float32) * np.asarray(scale)
    assert (np.abs(back - w) <= 2**-4 * np.abs(w).max(axis=0)).all()  # 3 mantissa bits, per column


def test_a_rows_activation_scale_is_its_own():
    """A row's result does not depend on the other rows of its batch (per-row scales): the engine's promise that
    a job gives the same image in any batch holds in FP8."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 64)).astype(np.float32)
    w, scale = fp8.quantize_weight(jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32) / 8))

    def matmul(x):
        amax = jnp.max(jnp.abs(x), axis=(1, 2), keepdims=True)
        return fp8.matmul(jnp.asarray(x), w, scale, amax, jnp.float32)

    loud = x.copy()
    loud[1] *= 1000
    np.testing.assert_array_equal(np.asarray(matmul(x))[0], np.asarray(matmul(loud))[0])


def test_one_matmul_is_as_close_as_fp8_allows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64, 320)).astype(np.float32)
    w = (rng.standard_normal((320, 640)) / np.sqrt(320)).astype(np.float32)
    q, scale = fp8.quantize_weight(jnp.asarray(w))
    y = fp8.matmul(jnp.asarray(x), q, scale, jnp.max(jnp.abs(x), axis=(1, 2), keepdims=True), jnp.float32)
    assert 0.01 < rel_rms(y, x @ w) < 0.06  # measured 3.7%; bfloat16 operands: 0.29%


@pytest.fixture(scope="module")
def tiny_fp8(tiny_dir) -> model.Model:
    """The tiny model served in FP8 over float32 arithmetic (the float32 model's weights, quantized)."""
    return model.load_folder(tiny_dir, model.LoadOptions(np.float32, quantize=Quantize.fp8), name="tiny")


def _unet_call(m: model.Model) -> np.ndarray:
    rng = np.random.default_rng(3)
    cfg = m.unet
    args = (
        rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        np.full((2,), 500.0, np.float32),
        rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32),
        rng.standard_normal((2, cfg.pooled_width)).astype(np.float32),
        np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1)),
    )
    form = program_weights.form(m, light_step=True)
    unet = m.configs.module("unet", m.dtype, form=form)
    params = program_weights.prepare(m.params, form)["unet"]
    return np.asarray(jax.jit(unet.apply)({"params": params}, *args))


def test_the_unets_fp8_error_is_bounded(tiny32, tiny_fp8):
    assert 0.08 < rel_rms(_unet_call(tiny_fp8), _unet_call(tiny32)) < 0.30  # measured 18.3%


def test_an_fp8_engine_holds_e4m3_weights_and_its_images_stay_close(engine32, tiny_fp8):
    rows = [Row("a cat", seed=1, steps=4), Row("a dog", "grass", seed=2, steps=4)]
    engine = Engine(tiny_fp8, [(64, 64)], batch_rows=engine32.batch_rows)
    leaves = convert.flatten(engine.params["unet"])
    assert any(leaf.dtype == fp8.E4M3 for path, leaf in leaves.items() if path[-1] == "kernel")
    assert not any(leaf.dtype == fp8.E4M3 for leaf in jax.tree_util.tree_leaves(engine32.params))
    got = engine.generate(rows, 64, 64, output="float32").images
    want = engine32.generate(rows, 64, 64, output="float32").images
    assert 0.03 < rel_rms(got, want) < 0.20  # measured 9.9%


def test_calibration_reads_each_fp8_layers_input_and_a_fixed_amax_replaces_the_rows():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 16)).astype(np.float32)
    x[1] *= 10  # the loud row: a calibrated amax of the batch's largest |x| is its own
    w, scale = fp8.quantize_weight(jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32)))
    params = {"kernel": w, "kernel_scale": scale, "bias": jnp.zeros(4)}
    linear = Linear(4, fp8=True)
    _, seen = linear.apply({"params": params}, x, mutable=[fp8.AMAX])
    assert float(seen[fp8.AMAX]["input"]) == pytest.approx(np.abs(x).max())
    dynamic = np.asarray(linear.apply({"params": params}, x))
    fixed = np.asarray(linear.apply({"params": params | {"input_amax": jnp.float32(np.abs(x).max())}}, x))
    np.testing.assert_allclose(fixed[1], dynamic[1], rtol=1e-6)
    # the quiet row, quantized on the loud one's scale: 10x coarser steps
    assert np.abs(fixed[0] - dynamic[0]).max() > 1e-3 * np.abs(dynamic[0]).max()


def test_adapters_add_their_term_to_an_fp8_layer_in_the_models_dtype():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 16)).astype(np.float32)
    w, scale = fp8.quantize_weight(jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32)))
    params = {"kernel": w, "kernel_scale": scale, "bias": jnp.zeros(4)}
    down = np.concatenate([np.zeros((1, 2, 16)), rng.standard_normal((1, 2, 16))]).astype(np.float32)  # slot 0: none
    up = np.concatenate([np.zeros((1, 4, 2)), rng.standard_normal((1, 4, 2))]).astype(np.float32)
    choice = {"slots": np.array([[1], [0]], np.int32), "scales": np.array([[0.5], [1.0]], np.float32)}
    lora = {"down": down, "up": up, **choice}
    linear = Linear(4, fp8=True)
    adapted = np.asarray(linear.apply({"params": params, "lora": lora}, x))
    plain = np.asarray(linear.apply({"params": params}, x))
    np.testing.assert_allclose(adapted[0] - plain[0], 0.5 * x[0] @ down[1].T @ up[1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(adapted[1], plain[1])  # slot 0
