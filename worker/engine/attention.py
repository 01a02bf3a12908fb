"""Attention kernels, chosen per engine and handed to the UNet and VAE modules as a function (`make`).

All compute softmax(q k^T / sqrt(d)) v for q (B, T, N*D), k and v (B, S, N*D) with N heads, and return
(B, T, N*D):

- `einsum`: heads folded into the batch, (B*N, T, D), as diffusers' Flax attention did by default.
- `split_head`: heads kept as their own axis, (B, T, N, D): no transpose of q, k, v into the batch; diffusers'
  Flax attention with `split_head_dim=True`, its faster layout on TPU v5e.
- `xla`, `cudnn`: `jax.nn.dot_product_attention` with that implementation (cudnn: flash attention on
  NVIDIA GPUs, bf16/fp16; head widths over 128 fall back to xla).
- `splash`: the Pallas splash-attention kernel for TPUs (jax.experimental.pallas.ops.tpu), run per device
  under shard_map over the batch axis, so it partitions like every other op and the persistent compile
  cache keeps working on several chips. On a CPU it runs in Pallas' interpret mode (tests only).

`auto` (`resolve`): splash on TPUs, cudnn on one NVIDIA GPU, einsum elsewhere.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from worker.engine.layers import Attend

IMPLEMENTATIONS = ("einsum", "split_head", "xla", "cudnn", "splash")

# cuDNN's fused attention takes head dims up to 128 (256 on Hopper and later). The UNet's heads are 64
# wide; the VAE's single 512-wide head is not, and uses XLA's kernel instead of failing the trace.
CUDNN_MAX_HEAD_DIM = 128
# Splash attention works on blocks of 128 along both sequences; shorter ones are padded and masked.
SPLASH_BLOCK = 128


def resolve(name: str, platform: str, device_count: int) -> str:
    """`auto` -> splash on TPUs, cudnn on one NVIDIA GPU (SDXL at 1024x1024 on an H200: 2.41 s for 4 images
    against 3.37 s with einsum), einsum elsewhere. Over several GPUs cuDNN's custom_partitioning defeats
    the compile cache under auto-sharding (facts.md), so auto keeps einsum there. Any other name as given."""
    if name != "auto":
        return name
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform == "gpu" and device_count == 1 else "einsum"


def _softmax(scores: jax.Array, dtype: Any) -> jax.Array:
    # float32 softmax whatever the compute dtype: bf16 exponentials of SDXL's 4096-long rows lose the tail
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def einsum(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    b, t, inner = q.shape
    d = inner // heads
    fold = lambda x: x.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, -1, d)  # noqa: E731
    scores = jnp.einsum("xtd,xsd->xts", fold(q), fold(k)) / math.sqrt(d)
    out = jnp.einsum("xts,xsd->xtd", _softmax(scores, q.dtype), fold(v))
    return out.reshape(b, heads, t, d).transpose(0, 2, 1, 3).reshape(b, t, inner)


def split_head(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    b, t, inner = q.shape
    d = inner // heads
    split = lambda x: x.reshape(b, -1, heads, d)  # noqa: E731
    scores = jnp.einsum("btnd,bsnd->bnts", split(q), split(k)) / math.sqrt(d)
    return jnp.einsum("bnts,bsnd->btnd", _softmax(scores, q.dtype), split(v)).reshape(b, t, inner)


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, implementation: str) -> jax.Array:
    b, t, inner = q.shape
    d = inner // heads
    if implementation == "cudnn" and d > CUDNN_MAX_HEAD_DIM:
        implementation = "xla"
    split = lambda x: x.reshape(b, -1, heads, d)  # noqa: E731
    out = jax.nn.dot_product_attention(
        split(q), split(k), split(v), scale=1 / math.sqrt(d), implementation=implementation
    )
    return out.reshape(b, t, inner)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, interpret: bool = False) -> jax.Array:
    """One device's rows. Sequences are padded to SPLASH_BLOCK and the padded keys masked out; the head
    width is padded to 128 lanes (zeros change neither q.k nor the kept part of the output)."""
    import numpy as np
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, inner = q.shape
    s = k.shape[1]
    d = inner // heads
    split = lambda x: x.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)  # noqa: E731  (B, N, T, D)
    qh = _pad_to(_pad_to(split(q) / math.sqrt(d), 2, SPLASH_BLOCK), 3, 128)
    kh = _pad_to(_pad_to(split(k), 2, SPLASH_BLOCK), 3, 128)
    vh = _pad_to(_pad_to(split(v), 2, SPLASH_BLOCK), 3, 128)
    t_pad, s_pad = qh.shape[2], kh.shape[2]
    keep = np.zeros((t_pad, s_pad), bool)
    keep[:, :s] = True  # padded query rows attend to real keys too (their output is dropped)
    mask = masks.MultiHeadMask([masks.NumpyMask(keep)] * heads)
    block = min(SPLASH_BLOCK, t_pad, s_pad)
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    attend = kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    out = jax.vmap(attend)(qh.astype(q.dtype), kh.astype(q.dtype), vh.astype(q.dtype))  # (B, N, T_pad, 128k)
    return out[:, :, :t, :d].transpose(0, 2, 1, 3).reshape(b, t, inner)


def make(name: str, mesh: Mesh | None = None, interpret: bool = False) -> Attend:
    """The attention function for an engine. splash needs the engine's mesh: each device runs the kernel on
    its own rows (shard_map), which is how a Pallas call partitions."""
    if name == "einsum":
        return einsum
    if name == "split_head":
        return split_head
    if name in ("xla", "cudnn"):
        return functools.partial(dot_product, implementation=name)
    if name == "splash":
        one_device = functools.partial(splash, interpret=interpret)
        if mesh is None:
            return one_device

        def sharded(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
            fn = jax.shard_map(
                lambda q, k, v: one_device(q, k, v, heads),
                mesh=mesh,
                in_specs=(P("data"), P("data"), P("data")),
                out_specs=P("data"),
                check_vma=False,
            )
            return fn(q, k, v)

        return sharded
    raise ValueError(f"attention must be auto or one of {IMPLEMENTATIONS}, got {name!r}")
