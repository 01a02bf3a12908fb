"""FP8 (e4m3fn) matmuls for the UNet's linear layers and 1x1 convolutions (SDXL_QUANTIZE=fp8).

Weights are quantized once, when an engine places them (program_weights.py): per output channel, each
column's largest |w| maps to e4m3's largest finite value, 448, and its float32 scale is kept beside it.
Activations are quantized at every call, per row (each image's activation tensor has its own scale, from
its own largest |x|): a per-batch scale would make a row's image depend on the other rows of its batch, and
the engine promises a job the same image in any batch. "Calibrated" scales (one fixed amax per layer from a
calibration batch, a parameter `input_amax` that input_amax() reads when present) were measured beside these
dynamic ones on the mid model (bench/fp8.py, docs/benchmarks.md): dynamic was the closer by RMS, 11.7% against
12.2% of the UNet's output on one call and 5.4% against 5.8% of the whole image (the largest pixel difference
about equal), and it needs no calibration data, which a prompt, a size, a step or an adapter unlike the
calibration batch would leave behind. Its cost is one reduction over each quantized activation (a read of it
that a GPU does at memory speed), not measured here for want of a GPU with FP8; the calibrated form would
save that read.

The form is the one XLA's GPU compiler rewrites into a cuBLASLt FP8 GEMM (`__cublas$lt$matmul$f8`): the dot's
operands are e4m3fn tensors converted up (to bf16 or f32), optionally multiplied by a broadcast scalar, and the
scales that are not scalars (per row, per channel) multiply the dot's output. openxla/xla tests exactly these
patterns in xla/service/gpu/transforms/gemm_rewriter_fp8_test.cc (vendored in tensorflow/tensorflow under
third_party/xla): `UnscaledABUnscaledDWithConvertF8` (dot(convert(x_f8), convert(y_f8)) -> the f8 custom call
with unit scales), `ScaledABUnscaledDF8` (convert, multiply by broadcast(scalar), dot) and
`ScaledABUnscaledDVectorBiasThenApproxGeluActivationF8` (the same with bf16 operands). Off a GPU with FP8
(this CPU, or an A100) the same program runs the dot in the compute dtype on the e4m3 values: the rounding is
FP8's, only the speed is not, which is how the tests measure its error here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # e4m3fn's largest finite value (it has no infinity: a larger value would convert to NaN)
# the smallest amax a scale is taken from: an all-zero row (batch padding) quantizes to zeros, not NaN
TINY_AMAX = 1e-12
AMAX = "fp8_amax"  # the collection each FP8 layer sows its input's amax into when it is mutable (calibration)


def to_e4m3(x: jax.Array) -> jax.Array:
    """float32 values already scaled into e4m3's range -> e4m3fn (clipped: rounding may step past 448)."""
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_weight(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A kernel (..., in, out) -> (e4m3fn kernel, float32 scale (out,)): per output channel, its largest |w|
    at 448; kernel ~= e4m3 * scale."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
    scale = jnp.where(amax > 0, amax, 1.0) / E4M3_MAX
    return to_e4m3(w / scale), scale


def input_amax(module: nn.Module, x: jax.Array) -> jax.Array:
    """An FP8 layer's activation amax: per row (B, 1, ..., 1), or the layer's calibrated scalar `input_amax`
    when its parameters hold one. Sown into the AMAX collection when that is mutable (calibration)."""
    if module.has_variable("params", "input_amax"):
        return module.get_variable("params", "input_amax")
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)), keepdims=True)
    if module.is_mutable_collection(AMAX):
        module.sow(AMAX, "input", jnp.max(amax), reduce_fn=jnp.maximum, init_fn=lambda: jnp.float32(0))
    return amax


def matmul(x: jax.Array, kernel: jax.Array, kernel_scale: jax.Array, amax: jax.Array, dtype: Any) -> jax.Array:
    """x (B, ..., in) @ kernel (in, out) e4m3fn with per-channel `kernel_scale` (out,); `amax` per row
    (B, 1, ..., 1) or a scalar. Returns (B, ..., out) in `dtype`."""
    x_scale = jnp.maximum(amax, TINY_AMAX) / E4M3_MAX
    x8 = to_e4m3(x.astype(jnp.float32) / x_scale)
    # The rewriter's pattern: the dot of two f8 tensors converted up; what is not a scalar scale comes after it.
    y = jax.lax.dot_general(x8.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    return (y.astype(jnp.float32) * x_scale * kernel_scale).astype(dtype)
