"""Building blocks shared by the UNet and the VAE: ResNet blocks, resampling, the attention projections,
the transformer block, and the sinusoidal timestep embedding.

Flax linen, NHWC inside. Submodule names are PyTorch diffusers' attribute names, with a list's index joined
by "_" (`resnets.0` -> `resnets_0`), so a checkpoint's key names its parameter by one rule
(worker/engine/convert.py) and nothing is renamed by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# attend(q, k, v, heads) -> out: q (B, T, heads*D), k and v (B, S, heads*D), out (B, T, heads*D).
# Which kernel computes it is the engine's choice (worker/engine/attention.py), handed to each module.
Attend = Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


def gelu(x: jax.Array) -> jax.Array:
    # The exact (erf) form, as PyTorch's default: flax's `nn.gelu` defaults to the tanh approximation, which
    # moves every UNet output by about 5e-4.
    return jax.nn.gelu(x, approximate=False)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float) -> jax.Array:
    """diffusers' get_timestep_embedding: t (B,) float -> (B, dim) float32, [sin, cos] or [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class Linear(nn.Module):
    """nn.Dense's parameters and arithmetic (kernel (in, out), optional bias), plus LoRA adapters applied per
    row: when the "lora" collection holds this layer's factors, each row adds sum_k scale_k * up_k(down_k(x)).

    The collection (worker/engine/lora.py builds it) holds the adapter bank, the same for every batch:
    down (slots, rank, in), up (slots, out, rank), and the batch's choice of it: slots (rows, K) int32 and
    scales (rows, K) float32. Slot 0 is all zeros (no adapter), and an adapter of a lower rank is zero-padded,
    so rows of one batch may each use other adapters, or none, and the shapes never change: adapters are
    inputs of the compiled program, not part of it."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)
        if not self.has_variable("lora", "down"):
            return y
        slots, scales = self.get_variable("lora", "slots"), self.get_variable("lora", "scales")
        down = self.get_variable("lora", "down")[slots].astype(self.dtype)  # (rows, K, rank, in)
        up = self.get_variable("lora", "up")[slots].astype(self.dtype)  # (rows, K, out, rank)
        h = jnp.einsum("n...i,nkri->n...kr", x, down)
        h = h * scales.astype(self.dtype).reshape(scales.shape[0], *(1,) * (x.ndim - 2), scales.shape[1], 1)
        return y + jnp.einsum("n...kr,nkor->n...o", h, up)


class TimestepEmbedding(nn.Module):
    """linear_1, SiLU, linear_2."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


def conv(features: int, size: int, name: str, dtype: Any, stride: int = 1, padding: Any = "same") -> nn.Conv:
    if padding == "same":
        padding = ((size // 2, size // 2),) * 2
    return nn.Conv(features, (size, size), (stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: norm1, SiLU, conv1, (+ time_emb_proj(SiLU(temb))), norm2, SiLU, conv2, plus the
    input (through conv_shortcut, a 1x1 conv, when the width changes)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(h))
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
        h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype, padding="VALID")(x)
        return x + h


class Downsample(nn.Module):
    """A stride-2 3x3 conv. The UNet pads 1 on every side; the VAE's encoder pads only bottom and right."""

    channels: int
    asymmetric: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric else ((1, 1), (1, 1))
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=padding)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", self.dtype)(x)


class Attention(nn.Module):
    """diffusers' Attention: to_q, to_k, to_v (bias as the checkpoint has it), to_out.0. `context`: the
    sequence attended to (cross-attention); None attends to x itself."""

    heads: int
    attend: Attend
    qkv_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = x.shape[-1]
        context = x if context is None else context
        q = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
        v = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
        out = self.attend(q, k, v, self.heads)
        return Linear(inner, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj to twice the width, then value * gelu(gate)."""

    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(Linear(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * gelu(gate)


class FeedForward(nn.Module):
    """net.0 (GEGLU), net.2 (Linear); net.1 is PyTorch's dropout."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = GEGLU(4 * self.dim, dtype=self.dtype, name="net_0")(x)
        return Linear(self.dim, dtype=self.dtype, name="net_2")(x)


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention on the text, feed-forward, each
    after its LayerNorm and added to the stream."""

    heads: int
    attend: Attend
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.heads, self.attend, dtype=self.dtype, name="attn1")(norm("norm1")(x))
        x = x + Attention(self.heads, self.attend, dtype=self.dtype, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(x.shape[-1], dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel (continuous input): GroupNorm, proj_in, `depth` transformer blocks,
    proj_out, plus the input. proj_in/out are Linear (use_linear_projection, SDXL) or 1x1 convs."""

    heads: int
    depth: int
    attend: Attend
    linear_projection: bool = True
    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        residual = x
        x = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.linear_projection:
            x = Linear(c, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv(c, 1, "proj_in", self.dtype, padding="VALID")(x).reshape(b, h * w, c)
        for i in range(self.depth):
            x = TransformerBlock(self.heads, self.attend, dtype=self.dtype, name=f"transformer_blocks_{i}")(x, context)
        if self.linear_projection:
            x = Linear(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, "proj_out", self.dtype, padding="VALID")(x.reshape(b, h, w, c))
        return x + residual
