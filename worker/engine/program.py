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

from worker.engine import lora, schedule
from worker.engine.layers import Attend
from worker.engine.model import Model

# Per-row sampler tables, stacked on axis 1 of `tables` (rows, len(TABLES), MAX_STEPS): see schedule.py.
TABLES = schedule.TABLES
# Per-row scalars, stacked on axis 1 of `scalars` (rows, len(SCALARS)). The starting sample is
# init_weight * image latents + init_scale * noise (a pure-noise start has init_weight 0).
SCALARS = ("guidance", "init_scale", "out_scale", "init_weight")


def step_noise(seed: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The unit noise an ancestral or LCM step `step` (0-based, of the row's own steps) adds to a row: from the
    row's seed alone, so a row's image does not depend on its batch (the starting noise is key(seed) itself)."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), step + 1), shape, jnp.float32)


def _variables(params: dict[str, Any], adapters: dict[str, Any] | None, part: str, paired: bool) -> dict[str, Any]:
    """A component's Flax variables: its weights, and the rows' LoRA adapters when the engine has a bank
    (worker/engine/lora.py). paired: the component runs two rows per image (guidance), which share adapters."""
    out = {"params": params[part]}
    if adapters is not None and part in adapters["bank"]:
        slots, scales = adapters["slots"], adapters["scales"]
        if paired:
            slots, scales = _pair(slots), _pair(scales)
        out["lora"] = lora.variables(adapters["bank"][part], slots, scales)
    return out


def _encode(
    model: Model, params: dict[str, Any], ids: jax.Array, adapters: dict[str, Any] | None = None, paired: bool = False
) -> tuple[jax.Array, jax.Array]:
    """ids (n, 2, 77) -> context (n, 77, d1 + d2), pooled (n, p): SDXL's penultimate-layer embeddings. The
    refiner has the second text encoder alone: context (n, 77, d2)."""
    te2 = model.configs.module("text_encoder_2", model.dtype)
    context2, pooled = te2.apply(_variables(params, adapters, "text_encoder_2", paired), ids[:, 1])
    if model.refiner:
        return context2, pooled
    te1 = model.configs.module("text_encoder", model.dtype)
    context1, _ = te1.apply(_variables(params, adapters, "text_encoder", paired), ids[:, 0])
    return jnp.concatenate([context1, context2], axis=-1), pooled


def _pair(x: jax.Array) -> jax.Array:
    """(n, ...) -> (2n, ...) as [x0, x0, x1, x1, ...]: doubling rows in place keeps each row's copy on the
    device that holds the row, where concatenating [x; x] would move half the batch between devices."""
    return jnp.repeat(x, 2, axis=0)


@dataclass(frozen=True)
class Program:
    """The traced functions (see the module's docstring); jit them with `jax.jit`. `state` is a dict of per-row
    arrays: x (the sample in sigma space), d (the last denoised estimate), noise (the starting noise), init (image
    latents, zeros without an image), mask (B, 1, h, w: 1 = generate, 0 = keep the image), masked (the masked
    image's latents, for an inpainting UNet; zeros otherwise), seeds."""

    # (params, adapters, ids, neg_ids, neg_zero, noise, init, mask, masked, seeds, scalars) -> (state, context,
    # pooled). adapters: None, or {"bank": the LoRA bank's tree, "slots": (B, K) int32, "scales": (B, K) float32}
    begin: Any
    # (params, adapters, state, context, pooled, scalars, time_ids, tables, start, stop) -> (state, stop): steps
    # start..stop-1
    advance: Any
    finish: Any  # (params, state, scalars) -> (image, finite)
    encode: Any  # (params, image (B, 3, H, W) in [-1, 1]) -> image latents (B, C, h, w), as the UNet sees them


def build(model: Model, output: str, attend: Attend, guided: bool = True) -> Program:
    """output: 'uint8' (NHWC bytes, for serving) or 'float32' (for parity checks). attend: the attention
    kernel (attention.make). guided: two UNet rows per image (unconditional and conditional, classifier-free
    guidance); False: one, for batches whose every row has guidance <= 1 (Turbo, Lightning, LCM), half the
    UNet work."""
    dtype = model.dtype
    unet = model.configs.module("unet", dtype, attend)
    vae = model.configs.module("vae", model.dtype_of("vae"), attend)
    vae_cfg = model.vae
    stats = vae_cfg.latents_mean is not None and vae_cfg.latents_std is not None
    # An inpainting UNet sees the mask and the masked image's latents as extra input channels, and is not
    # blended (diffusers blends only for a base UNet).
    inpainting = model.inpainting

    def encode(params, image):
        mean, _ = vae.apply({"params": params["vae"]}, image, method="encode")
        # The distribution's mode, not a sample: diffusers samples with its own generator, which no seed here
        # reproduces; SDXL's VAE log-variance is so small that the two differ far below a pixel level.
        latents = mean.astype(jnp.float32)
        if stats:
            m = jnp.asarray(vae_cfg.latents_mean, jnp.float32)[None, :, None, None]
            s = jnp.asarray(vae_cfg.latents_std, jnp.float32)[None, :, None, None]
            return (latents - m) * vae_cfg.scaling_factor / s
        return latents * vae_cfg.scaling_factor

    def begin(params, adapters, ids, neg_ids, neg_zero, noise, init, mask, masked, seeds, scalars):
        # ids, neg_ids (B, 2, 77) int32; neg_zero (B,) bool; noise, init (B, C, h, w) f32; mask (B, 1, h, w) f32;
        # seeds (B,) uint32; scalars (B, len(SCALARS))
        b = ids.shape[0]
        if guided:
            both = jnp.stack([neg_ids, ids], axis=1).reshape(2 * b, *ids.shape[1:])  # [neg0, pos0, neg1, ...]
            context, pooled = _encode(model, params, both, adapters, paired=True)
            # A row without a negative prompt, on a model with force_zeros_for_empty_prompt: zero embeddings for
            # the unconditional half, as diffusers does (an empty-string negative prompt is encoded instead).
            keep = jnp.stack([~neg_zero, jnp.ones_like(neg_zero)], axis=1).reshape(2 * b).astype(context.dtype)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        else:
            context, pooled = _encode(model, params, ids, adapters)
        x = init * scalars[:, 3, None, None, None] + noise * scalars[:, 1, None, None, None]
        state = {"x": x, "d": jnp.zeros_like(x), "noise": noise, "init": init, "mask": mask, "seeds": seeds}
        if inpainting:
            state["masked"] = masked
        return state, context, pooled

    def advance(params, adapters, state, context, pooled, scalars, time_ids, tables, start, stop):
        # context (nB, 77, D), pooled (nB, P) with n = 2 guided, 1 not; time_ids (B, 2, ids): the unconditional
        # and the conditional row's (they differ for the refiner's aesthetic score); tables (B, T, MAX_STEPS);
        # start, stop () int32.
        b = state["x"].shape[0]
        guidance = scalars[:, 0, None, None, None]
        t = {name: tables[:, i] for i, name in enumerate(TABLES)}
        rows = _pair if guided else (lambda v: v)
        row_ids = time_ids.reshape(2 * b, -1) if guided else time_ids[:, 1]  # [uncond0, cond0, uncond1, ...]
        latent_shape = state["x"].shape[1:]
        draw = jax.vmap(step_noise, in_axes=(0, None, None))

        def step(i, carry):
            x, d_prev = carry
            col = lambda name: t[name][:, i, None, None, None]  # noqa: E731  (B, 1, 1, 1)
            model_in = x * col("c_in")
            if inpainting:  # the extra channels go in unscaled, as in diffusers
                model_in = jnp.concatenate([model_in, state["mask"], state["masked"]], axis=1)
            model_in = model_in.astype(dtype)
            out = unet.apply(
                _variables(params, adapters, "unet", guided),
                rows(model_in),
                rows(t["timesteps"][:, i]),
                context,
                pooled,
                row_ids,
            ).astype(jnp.float32)
            if guided:
                out = out.reshape(b, 2, *out.shape[1:])
                uncond, text = out[:, 0], out[:, 1]
                # diffusers skips guidance at scale <= 1; doing the same keeps results identical to it.
                out = jnp.where(guidance > 1, uncond + guidance * (text - uncond), text)
            d = col("p") * x + col("q") * out
            x = col("a") * x + col("b") * d + col("c") * d_prev + col("e") * draw(state["seeds"], i, latent_shape)
            if not inpainting:
                # Inpainting: outside the mask, the image re-noised to the next step's level (blend 0 on padding).
                keep = (1 - state["mask"]) * col("blend")
                x = (1 - keep) * x + keep * (state["init"] * col("k") + col("s_next") * state["noise"])
            return x, d

        # Traced bounds: any chunk of steps, and any number of steps, runs on this one executable.
        x, d = jax.lax.fori_loop(start, stop, step, (state["x"], state["d"]))
        return state | {"x": x, "d": d}, stop  # `stop` is ready when the chunk is: the engine waits on it

    def finish(params, state, scalars):
        latents = state["x"] * scalars[:, 2, None, None, None]  # out_scale
        if stats:
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

    return Program(begin, advance, finish, encode)


def noise_fn(shape: tuple[int, ...]) -> Any:
    """seeds (B,) uint32 -> unit normal noise (B, *shape), each row from its own key alone."""

    def noise(seeds):
        return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32))(seeds)

    return noise


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(rows split over the data axis, replicated)."""
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
