"""Which attention kernel the UNet and VAE trace with: diffusers' own einsum form, or
`jax.nn.dot_product_attention` (implementation "xla", or "cudnn": flash attention on NVIDIA GPUs, bf16/fp16).

diffusers' Flax attention modules have no such switch, so their __call__ is replaced by one that reads a
context variable set while an Engine traces its program (`with implementation(name): ...`). Outside that
context they behave exactly as diffusers wrote them.

cuDNN attention is built on custom_partitioning, which defeats JAX's persistent compile cache under
multi-device auto-sharding (../shared/reference/facts.md); use it on one device, or expect cold starts.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
from diffusers.models import attention_flax, vae_flax

IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def resolve(name: str, platform: str, device_count: int) -> str:
    """`auto` -> cudnn on one NVIDIA GPU (SDXL at 1024x1024 on an H200: 2.41 s for 4 images against 3.37 s
    with the einsum form, and its serialized executable loads on a warm start), einsum elsewhere: TPUs and
    CPUs have no cuDNN, and over several GPUs cuDNN's custom_partitioning defeats the compile cache under
    auto-sharding (facts.md; not measured here). Any other name as given."""
    if name == "auto":
        return "cudnn" if platform == "gpu" and device_count == 1 else "einsum"
    return name


_current: contextvars.ContextVar[str] = contextvars.ContextVar("attention", default="einsum")
_unet_call = attention_flax.FlaxAttention.__call__
_vae_call = vae_flax.FlaxAttentionBlock.__call__


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


# cuDNN's fused attention takes head dims up to 128 (256 on Hopper and later). The UNet's heads are 64
# wide; the VAE's single 512-wide head is not, and falls back to XLA's kernel instead of failing the trace.
CUDNN_MAX_HEAD_DIM = 128


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """(B, T, N, H) layout, as jax.nn.dot_product_attention wants it."""
    name = _current.get()
    if name == "cudnn" and q.shape[-1] > CUDNN_MAX_HEAD_DIM:
        name = "xla"
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=name)


def _unet_attention(self: Any, hidden_states: jax.Array, context: jax.Array | None = None, deterministic=True):
    if _current.get() == "einsum":
        return _unet_call(self, hidden_states, context, deterministic)
    context = hidden_states if context is None else context
    b = hidden_states.shape[0]
    split = lambda x: x.reshape(b, -1, self.heads, self.dim_head)  # noqa: E731
    out = _attend(split(self.query(hidden_states)), split(self.key(context)), split(self.value(context)), self.scale)
    out = self.proj_attn(out.reshape(b, -1, self.heads * self.dim_head))
    return self.dropout_layer(out, deterministic=deterministic)


def _vae_attention(self: Any, hidden_states: jax.Array) -> jax.Array:
    if _current.get() == "einsum":
        return _vae_call(self, hidden_states)
    residual = hidden_states
    batch, height, width, channels = hidden_states.shape
    x = self.group_norm(hidden_states).reshape(batch, height * width, channels)
    split = lambda t: t.reshape(batch, height * width, self.num_heads, -1)  # noqa: E731
    head_dim = channels // self.num_heads
    out = _attend(split(self.query(x)), split(self.key(x)), split(self.value(x)), 1 / math.sqrt(head_dim))
    out = self.proj_attn(out.reshape(batch, height * width, channels)).reshape(batch, height, width, channels)
    return out + residual


attention_flax.FlaxAttention.__call__ = _unet_attention
vae_flax.FlaxAttentionBlock.__call__ = _vae_attention
