"""Building blocks shared by the UNet and the VAE: ResNet blocks, resampling, the attention projections,
the transformer block, and the sinusoidal timestep embedding.

Flax linen, NHWC inside. Submodule names are PyTorch diffusers' attribute names, with a list's index joined
by "_" (`resnets.0` -> `resnets_0`), so a checkpoint's key names its parameter by one rule
(worker/engine/convert.py) and nothing is renamed by hand.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from worker.engine import fp8

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


@dataclass(frozen=True)
class Projections:
    """How the program's UNet computes its projections; worker/engine/program_weights.py lays the weights out
    to match, from the checkpoint's layout, which the loaders, the weight cache and the adapter bank keep.

    fused: a self-attention's q, k and v as one matmul (`to_qkv`, kernel (in, 3 * inner)), a cross-attention's
    k and v as one (`to_kv`): one pass over the activation instead of three (or two).
    fp8: the transformers' linear layers and the ResNets' 1x1 convolutions in FP8 (fp8.py). A cross-attention's
    k and v stay in the model's dtype: they project the text, once per batch (unet.text_keys_values)."""

    fused: bool = False
    fp8: bool = False


class Linear(nn.Module):
    """nn.Dense's parameters and arithmetic (kernel (in, out), optional bias), plus LoRA adapters applied per
    row: when the "lora" collection holds this layer's factors, each row adds sum_k scale_k * up_k(down_k(x)).

    The collection (worker/engine/lora.py builds it) holds the adapter bank, the same for every batch:
    down (slots, rank, in), up (slots, out, rank), and the batch's choice of it: slots (rows, K) int32 and
    scales (rows, K) float32. Slot 0 is all zeros (no adapter), and an adapter of a lower rank is zero-padded,
    so rows of one batch may each use other adapters, or none, and the shapes never change: adapters are
    inputs of the compiled program, not part of it.

    features as a tuple: projections of one input fused into one matmul (kernel (in, sum), output
    concatenated); their adapters stay each its projection's (down and up are tuples, one per part), so the
    result is the unfused layers' side by side. fp8: an e4m3fn kernel with per-output-channel `kernel_scale`
    (fp8.py); adapters add their term in `dtype`."""

    features: int | tuple[int, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fused = isinstance(self.features, tuple)
        width = sum(self.features) if isinstance(self.features, tuple) else self.features
        shape = (x.shape[-1], width)
        x = x.astype(self.dtype)
        if self.fp8:
            kernel = self.param("kernel", nn.initializers.zeros_init(), shape, fp8.E4M3)
            scale = self.param("kernel_scale", nn.initializers.ones_init(), (width,), jnp.float32)
            y = fp8.matmul(x, kernel, scale, fp8.input_amax(self, x), self.dtype)
        else:
            kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32).astype(self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (width,), jnp.float32).astype(self.dtype)
        if not self.has_variable("lora", "down"):
            return y
        slots, scales = self.get_variable("lora", "slots"), self.get_variable("lora", "scales")
        downs, ups = self.get_variable("lora", "down"), self.get_variable("lora", "up")
        if not fused:
            return y + self._adapted(x, downs, ups, slots, scales)
        terms = [self._adapted(x, d, u, slots, scales) for d, u in zip(downs, ups, strict=True)]
        return y + jnp.concatenate(terms, axis=-1)

    def _adapted(self, x: jax.Array, down: Any, up: Any, slots: jax.Array, scales: jax.Array) -> jax.Array:
        """The rows' adapter term: down (slots, rank, in) and up (slots, out, rank) picked per row by `slots`."""
        down = down[slots].astype(self.dtype)  # (rows, K, rank, in)
        up = up[slots].astype(self.dtype)  # (rows, K, out, rank)
        h = jnp.einsum("n...i,nkri->n...kr", x, down)
        h = h * scales.astype(self.dtype).reshape(scales.shape[0], *(1,) * (x.ndim - 2), scales.shape[1], 1)
        return jnp.einsum("n...kr,nkor->n...o", h, up)


class Pointwise(nn.Module):
    """A 1x1 convolution (NHWC, kernel (1, 1, in, out) as nn.Conv keeps it, bias) in FP8: a matmul over the
    channels, which is what a 1x1 convolution is, written as the dot XLA's GPU compiler rewrites (fp8.py)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.zeros_init(), (1, 1, x.shape[-1], self.features), fp8.E4M3)
        scale = self.param("kernel_scale", nn.initializers.ones_init(), (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        y = fp8.matmul(x, kernel[0, 0], scale, fp8.input_amax(self, x), self.dtype)
        return y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)


class TimestepEmbedding(nn.Module):
    """linear_1, SiLU, linear_2."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


def conv(
    features: int, size: int, name: str, dtype: Any, stride: int = 1, padding: Any = "same", fp8: bool = False
) -> nn.Module:
    """nn.Conv with PyTorch's padding; fp8: a 1x1 convolution in FP8 (Pointwise)."""
    if fp8:
        assert size == 1 and stride == 1, "only 1x1 convolutions run in FP8"
        return Pointwise(features, dtype, name=name)
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
    fp8: bool = False  # conv_shortcut in FP8 (the 3x3 convolutions stay in dtype)

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(h))
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
        h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype, padding="VALID", fp8=self.fp8)(x)
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
    sequence attended to (cross-attention); None attends to x itself. form: Projections (fused: to_qkv, or
    to_q and to_kv). A cross-attention whose keys and values are in the "text" collection (k, v: computed
    once per batch, unet.text_keys_values) takes them from there and does not project the context; IP-Adapters'
    keys and values there too (`ip_k`, `ip_v`) add their attention to the text's."""

    heads: int
    attend: Attend
    qkv_bias: bool = False
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner, form = x.shape[-1], self.form
        linear = functools.partial(Linear, use_bias=self.qkv_bias, dtype=self.dtype)
        if context is None and form.fused:
            q, k, v = jnp.split(linear((inner,) * 3, fp8=form.fp8, name="to_qkv")(x), 3, axis=-1)
        else:
            q = linear(inner, fp8=form.fp8, name="to_q")(x)
            if context is None:
                k, v = (linear(inner, fp8=form.fp8, name=n)(x) for n in ("to_k", "to_v"))
            elif self.has_variable("text", "k"):
                k, v = self.get_variable("text", "k"), self.get_variable("text", "v")
            else:
                k, v = keys_values(linear, inner, form, context)
        out = self.attend(q, k, v, self.heads)
        if context is not None and self.has_variable("text", "ip_k"):
            # IP-Adapters' image tokens (ip_adapter.py): each served adapter's own attention, its values already
            # times each row's scale (zero for a row without it)
            ip_k, ip_v = self.get_variable("text", "ip_k"), self.get_variable("text", "ip_v")
            for a in range(ip_k.shape[0]):
                out = out + self.attend(q, ip_k[a].astype(self.dtype), ip_v[a].astype(self.dtype), self.heads)
        return Linear(inner, dtype=self.dtype, fp8=form.fp8, name="to_out_0")(out)


def keys_values(linear: Callable[..., Linear], inner: int, form: Projections, context: jax.Array) -> tuple[Any, Any]:
    """A cross-attention's keys and values of the text `context`: to_k and to_v, or to_kv fused; in the model's
    dtype whatever the form (they are computed once per batch). linear: Linear with the layer's bias and dtype,
    made inside the attention's module (Attention, or TextKeysValues on the same parameters)."""
    if form.fused:
        k, v = jnp.split(linear((inner, inner), name="to_kv")(context), 2, axis=-1)
        return k, v
    return linear(inner, name="to_k")(context), linear(inner, name="to_v")(context)


class TextKeysValues(nn.Module):
    """A cross-attention's keys and values alone, applied to its Attention's parameters (and adapters): the
    same layers as Attention's, run apart from the steps (unet.text_keys_values)."""

    inner: int
    qkv_bias: bool = False
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        linear = functools.partial(Linear, use_bias=self.qkv_bias, dtype=self.dtype)
        return keys_values(linear, self.inner, self.form, context)


class GEGLU(nn.Module):
    """proj to twice the width, then value * gelu(gate)."""

    inner: int
    dtype: Any = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(Linear(2 * self.inner, dtype=self.dtype, fp8=self.fp8, name="proj")(x), 2, axis=-1)
        return value * gelu(gate)


class FeedForward(nn.Module):
    """net.0 (GEGLU), net.2 (Linear); net.1 is PyTorch's dropout."""

    dim: int
    dtype: Any = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = GEGLU(4 * self.dim, dtype=self.dtype, fp8=self.fp8, name="net_0")(x)
        return Linear(self.dim, dtype=self.dtype, fp8=self.fp8, name="net_2")(x)


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention on the text, feed-forward, each
    after its LayerNorm and added to the stream."""

    heads: int
    attend: Attend
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        attention = functools.partial(Attention, self.heads, self.attend, dtype=self.dtype, form=self.form)
        x = x + attention(name="attn1")(norm("norm1")(x))
        x = x + attention(name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(x.shape[-1], dtype=self.dtype, fp8=self.form.fp8, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel (continuous input): GroupNorm, proj_in, `depth` transformer blocks,
    proj_out, plus the input. proj_in/out are Linear (use_linear_projection, SDXL) or 1x1 convs."""

    heads: int
    depth: int
    attend: Attend
    linear_projection: bool = True
    groups: int = 32
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        residual, dtype, q8 = x, self.dtype, self.form.fp8
        x = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=dtype, name="norm")(x)
        if self.linear_projection:
            x = Linear(c, dtype=dtype, fp8=q8, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv(c, 1, "proj_in", dtype, padding="VALID", fp8=q8)(x).reshape(b, h * w, c)
        for i in range(self.depth):
            block = TransformerBlock(self.heads, self.attend, dtype, self.form, name=f"transformer_blocks_{i}")
            x = block(x, context)
        if self.linear_projection:
            x = Linear(c, dtype=dtype, fp8=q8, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, "proj_out", dtype, padding="VALID", fp8=q8)(x.reshape(b, h, w, c))
        return x + residual
