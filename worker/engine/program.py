"""The compiled SDXL program, in three parts: text encoders and starting noise (`begin`), denoising steps
(`advance`, any run of consecutive steps) and the VAE decode (`finish`).

Every per-job value is a per-row input (prompt ids, seed noise, guidance, size conditioning, the sampler
tables from schedule.py, steps), so unrelated jobs share one call and one compiled executable per part.

Why three parts and not one jit: a running job reports its step (live progress). The engine dispatches
`advance` once per chunk of steps (SDXL_PROGRESS_EVERY_STEPS) and learns that a chunk is done when its small
output is ready, without stopping the device: every call is queued at once (JAX dispatch is asynchronous).
A host callback inside one fused loop would say the same, but an executable holding a Python callback can
be neither serialized nor kept in JAX's persistent cache, and the warm start needs both. What splitting
costs (a dispatch per chunk, no fusion across chunks) is measured in bench/progress.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from worker.engine.layers import Attend
from worker.engine.model import Model

# Per-row sampler tables, stacked on axis 1 of `tables` (rows, len(TABLES), MAX_STEPS).
TABLES = ("timesteps", "sigmas", "c_in", "a", "b", "c")
# Per-row scalars, stacked on axis 1 of `scalars` (rows, len(SCALARS)).
SCALARS = ("guidance", "init_scale", "out_scale")


def _encode(model: Model, params: dict[str, Any], ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids (n, 2, 77) -> context (n, 77, d1 + d2), pooled (n, p): SDXL's penultimate-layer embeddings."""
    te1 = model.configs.module("text_encoder", model.dtype)
    te2 = model.configs.module("text_encoder_2", model.dtype)
    context1, _ = te1.apply({"params": params["text_encoder"]}, ids[:, 0])
    context2, pooled = te2.apply({"params": params["text_encoder_2"]}, ids[:, 1])
    return jnp.concatenate([context1, context2], axis=-1), pooled


def _pair(x: jax.Array) -> jax.Array:
    """(n, ...) -> (2n, ...) as [x0, x0, x1, x1, ...]: doubling rows in place keeps each row's copy on the
    device that holds the row, where concatenating [x; x] would move half the batch between devices."""
    return jnp.repeat(x, 2, axis=0)


@dataclass(frozen=True)
class Program:
    """The three traced functions (see the module's docstring); jit them with `jax.jit`."""

    begin: Any  # (params, ids, neg_ids, neg_zero, noise, scalars) -> (x, d, context, pooled)
    # (params, x, d, context, pooled, scalars, time_ids, tables, start, stop) -> (x, d, stop): steps start..stop-1
    advance: Any
    finish: Any  # (params, x, scalars) -> (image, finite)


def build(model: Model, output: str, attend: Attend) -> Program:
    """output: 'uint8' (NHWC bytes, for serving) or 'float32' (for parity checks). attend: the attention
    kernel (attention.make)."""
    dtype = model.dtype
    unet = model.configs.module("unet", dtype, attend)
    vae = model.configs.module("vae", model.dtype_of("vae"), attend)
    vae_cfg = model.vae

    def begin(params, ids, neg_ids, neg_zero, noise, scalars):
        # ids, neg_ids (B, 2, 77) int32; neg_zero (B,) bool; noise (B, C, h, w) f32 unit normal; scalars (B, 3)
        b = ids.shape[0]
        both = jnp.stack([neg_ids, ids], axis=1).reshape(2 * b, *ids.shape[1:])  # [neg0, pos0, neg1, ...]
        context, pooled = _encode(model, params, both)
        # A row without a negative prompt, on a model with force_zeros_for_empty_prompt: zero embeddings for
        # the unconditional half, as diffusers does (an empty-string negative prompt is encoded instead).
        keep = jnp.stack([~neg_zero, jnp.ones_like(neg_zero)], axis=1).reshape(2 * b).astype(context.dtype)
        x = noise * scalars[:, 1, None, None, None]  # init_scale
        return x, jnp.zeros_like(x), context * keep[:, None, None], pooled * keep[:, None]

    def advance(params, x, d_prev, context, pooled, scalars, time_ids, tables, start, stop):
        # x, d_prev (B, C, h, w) f32: the sample in sigma space and the last denoised estimate; context
        # (2B, 77, D), pooled (2B, P); time_ids (B, 6); tables (B, 6, MAX_STEPS); start, stop () int32.
        b = x.shape[0]
        pair_ids = _pair(time_ids)
        guidance = scalars[:, 0, None, None, None]
        timesteps, sigmas, c_in, ca, cb, cc = (tables[:, i] for i in range(len(TABLES)))

        def step(i, carry):
            x, d_prev = carry
            col = lambda t: t[:, i, None, None, None]  # noqa: E731  (B, 1, 1, 1)
            model_in = (x * col(c_in)).astype(dtype)
            eps = unet.apply(
                {"params": params["unet"]}, _pair(model_in), _pair(timesteps[:, i]), context, pooled, pair_ids
            ).astype(jnp.float32)
            eps = eps.reshape(b, 2, *eps.shape[1:])
            uncond, text = eps[:, 0], eps[:, 1]
            # diffusers skips guidance at scale <= 1; doing the same keeps results identical to it.
            eps = jnp.where(guidance > 1, uncond + guidance * (text - uncond), text)
            d = x - col(sigmas) * eps
            return col(ca) * x + col(cb) * d + col(cc) * d_prev, d

        # Traced bounds: any chunk of steps, and any number of steps, runs on this one executable.
        x, d = jax.lax.fori_loop(start, stop, step, (x, d_prev))
        return x, d, stop  # `stop` is ready when the chunk is: the engine waits on it for progress

    def finish(params, x, scalars):
        latents = x * scalars[:, 2, None, None, None]  # out_scale
        if vae_cfg.latents_mean is not None and vae_cfg.latents_std is not None:
            # diffusers' SDXL pipeline: latents * std / scaling_factor + mean, per channel
            mean = jnp.asarray(vae_cfg.latents_mean, jnp.float32)[None, :, None, None]
            std = jnp.asarray(vae_cfg.latents_std, jnp.float32)[None, :, None, None]
            latents = latents * std / vae_cfg.scaling_factor + mean
        else:
            latents = latents / vae_cfg.scaling_factor
        image = vae.apply({"params": params["vae"]}, latents, method="decode")
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)  # (B, H, W, 3)
        finite = jnp.isfinite(image).all(axis=(1, 2, 3))
        if output == "uint8":
            # Bytes leave the device, not float32: 4x less to copy to the host.
            image = jnp.round(image * 255).astype(jnp.uint8)
        return image, finite

    return Program(begin, advance, finish)


def noise_fn(shape: tuple[int, ...]) -> Any:
    """seeds (B,) uint32 -> unit normal noise (B, *shape), each row from its own key alone."""

    def noise(seeds):
        return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32))(seeds)

    return noise


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(rows split over the data axis, replicated)."""
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
