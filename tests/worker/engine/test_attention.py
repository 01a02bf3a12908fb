"""Attention kernels as a module option (worker/engine/attention.py). Whole-engine parity with PyTorch for
split_head and xla is in test_engine.py; cuDNN needs an NVIDIA GPU (bench/accelerator.py); splash, a TPU
kernel, runs here in Pallas' interpret mode at tiny sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worker.engine import attention


def _qkv(t: int, s: int, heads: int, head_dim: int, batch: int = 2) -> list[jax.Array]:
    rng = np.random.default_rng(0)
    shapes = [(batch, t, heads * head_dim), (batch, s, heads * head_dim), (batch, s, heads * head_dim)]
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


def _naive(q, k, v, heads):
    b, t, inner = q.shape
    d = inner // heads
    out = np.zeros((b, t, inner), np.float64)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(0, 2, 1) / np.sqrt(d)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, sl] = (w / w.sum(-1, keepdims=True)) @ v[:, :, sl]
    return out


@pytest.mark.parametrize("name", ["einsum", "split_head", "xla"])
@pytest.mark.parametrize("t,s,heads,d", [(96, 96, 4, 16), (96, 77, 2, 64), (24, 24, 1, 512)])
def test_kernels_compute_attention(name, t, s, heads, d):
    q, k, v = _qkv(t, s, heads, d)
    got = attention.make(name)(q, k, v, heads)
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, heads), atol=2e-5)


@pytest.mark.parametrize("t,s,heads,d", [(128, 77, 2, 64), (48, 48, 1, 32), (200, 200, 3, 16)])
def test_splash_in_interpret_mode_matches_einsum(t, s, heads, d):
    """Padding to 128-long blocks and 128 lanes, and masking the padded keys, change nothing."""
    q, k, v = _qkv(t, s, heads, d)
    got = attention.splash(q, k, v, heads, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(attention.einsum(q, k, v, heads)), atol=2e-6)


def test_splash_under_shard_map_over_the_engine_mesh(tiny32, reference):
    """The whole tiny engine with splash (shard_map over the mesh, interpreted on this CPU) against PyTorch."""
    from worker.engine.engine import Engine, Row

    engine = Engine(tiny32, [(64, 96)], batch_rows=1, attention="splash")
    meta = reference["meta"]
    row = Row(meta["prompt"], "blurry, low quality", guidance_scale=meta["guidance_scale"], steps=meta["steps"])
    out = engine.generate([row], 64, 96, latents=reference["latents"], output="float32")
    assert np.abs(out.images - reference["folder/euler/text/image"]).max() < 1e-4


def test_a_head_too_wide_for_cudnn_is_attended_with_xla():
    """The SDXL VAE's one 512-wide head: cuDNN refuses it, so the cudnn setting must not fail the trace."""
    q, k, v = _qkv(16, 16, 1, 512, batch=1)
    expected = attention.dot_product(q, k, v, 1, "xla")
    np.testing.assert_array_equal(np.asarray(attention.dot_product(q, k, v, 1, "cudnn")), np.asarray(expected))


def test_a_narrow_head_still_asks_for_cudnn():
    """The UNet's 64-wide heads go to cuDNN, not to a quiet fallback: float32 inputs are refused by cuDNN
    (bf16/fp16 only) and a CPU has no cuDNN, so the request fails on any machine."""
    q, k, v = _qkv(16, 16, 1, 64, batch=1)
    with pytest.raises(Exception):  # noqa: B017
        attention.dot_product(q, k, v, 1, "cudnn")


def test_auto_is_splash_on_tpus_cudnn_on_one_nvidia_gpu_einsum_elsewhere():
    assert attention.resolve("auto", "tpu", 4) == "splash"
    assert attention.resolve("auto", "gpu", 1) == "cudnn"
    assert attention.resolve("auto", "gpu", 8) == "einsum"  # the compile cache caveat: not measured there
    assert attention.resolve("auto", "cpu", 1) == "einsum"
    assert attention.resolve("xla", "gpu", 1) == "xla"  # a name given is kept


def test_an_engine_built_with_auto_on_this_cpu_traces_einsum(tiny32):
    from worker.engine.engine import Engine

    assert Engine(tiny32, [(64, 64)], batch_rows=1, attention="auto").attention == "einsum"


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="attention must be"):
        attention.make("flash")
