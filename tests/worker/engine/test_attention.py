"""The attention switch: which kernel jax.nn.dot_product_attention gets. (Whole-engine parity for the xla
implementation is in test_engine.py; cuDNN itself needs an NVIDIA GPU and runs in bench/accelerator.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from worker.engine import attention


def _qkv(head_dim: int) -> list[jax.Array]:
    rng = np.random.default_rng(0)
    return [jax.numpy.asarray(rng.standard_normal((1, 16, 1, head_dim)), jax.numpy.float32) for _ in range(3)]


def test_a_head_too_wide_for_cudnn_is_attended_with_xla():
    """The SDXL VAE's one 512-wide head: cuDNN refuses it, so the cudnn setting must not fail the trace."""
    q, k, v = _qkv(512)
    with attention.implementation("xla"):
        expected = attention._attend(q, k, v, 0.1)
    with attention.implementation("cudnn"):
        got = attention._attend(q, k, v, 0.1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_a_narrow_head_still_asks_for_cudnn():
    """The UNet's 64-wide heads go to cuDNN, not to a quiet fallback: float32 inputs are refused by cuDNN
    (bf16/fp16 only) and a CPU has no cuDNN, so the request fails on any machine."""
    q, k, v = _qkv(64)
    with attention.implementation("cudnn"), pytest.raises(Exception):  # noqa: B017
        attention._attend(q, k, v, 0.1)


def test_auto_is_cudnn_on_one_nvidia_gpu_only():
    assert attention.resolve("auto", "gpu", 1) == "cudnn"
    assert attention.resolve("auto", "gpu", 8) == "einsum"  # the compile cache caveat: not measured there
    assert attention.resolve("auto", "tpu", 4) == "einsum"
    assert attention.resolve("auto", "cpu", 1) == "einsum"
    assert attention.resolve("xla", "gpu", 1) == "xla"  # a name given is kept


def test_an_engine_built_with_auto_on_this_cpu_traces_einsum(tiny32):
    from worker.engine.engine import Engine

    assert Engine(tiny32, [(64, 64)], batch_rows=1, attention="auto").attention == "einsum"
