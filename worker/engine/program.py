"""The compiled SDXL program, in parts: text encoders and starting sample (`begin`), denoising steps (`advance`,
any run of consecutive steps), the VAE decode (`finish`) and, for batches with init images, the VAE encoder
(`encode`). Their arguments are the typed pytrees of arguments.py.

Every per-job value is a per-row input (prompt ids, seed noise, guidance, size conditioning, the sampler
tables from schedule.py, steps), so unrelated jobs share one call and one compiled executable per part.

The lighter step (light_step, the default): work that does not change between steps leaves the loop. Every
cross-attention's keys and values depend on the text alone, so begin computes them once per batch
(unet.text_keys_values) and advance reads them (TextEmbeddings.keys_values); each attention's projections of
one input run as one matmul (program_weights.py lays the weights out so). light_step=False is the step as it
was before, kept as bench/engine.py's baseline.

Why parts and not one jit: a running job reports its step (live progress). The engine dispatches `advance`
once per chunk of steps (SDXL_PROGRESS_EVERY_STEPS) and learns that a chunk is done when its small output is
ready, without stopping the device: every call is queued at once (JAX dispatch is asynchronous). A host
callback inside one fused loop would say the same, but an executable holding a Python callback can be neither
serialized nor kept in JAX's persistent cache, and the warm start needs both. What splitting costs (a dispatch
per chunk, no fusion across chunks) is measured in bench/progress.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from worker.engine import controlnet, ip_adapter, lora, program_weights
from worker.engine.arguments import (
    AdapterInputs,
    AdvanceInputs,
    BeginInputs,
    ControlInputs,
    EncodeInputs,
    ImageInputs,
    RowScalars,
    SamplerState,
    TextEmbeddings,
)
from worker.engine.layers import Attend
from worker.engine.model import Model
from worker.engine.schedule import TABLES
from worker.engine.unet import Residuals, text_keys_values


def step_noise(seed: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The unit noise an ancestral or LCM step `step` (0-based, of the row's own steps) adds to a row: from the
    row's seed alone, so a row's image does not depend on its batch (the starting noise is key(seed) itself)."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), step + 1), shape, jnp.float32)


def noise(shape: tuple[int, ...]) -> Any:
    """seeds (B,) uint32 -> unit normal noise (B, *shape), each row from its own key alone."""

    def draw(seeds):
        return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32))(seeds)

    return draw


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(rows split over the data axis, replicated)."""
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def _pair(x: jax.Array) -> jax.Array:
    """(n, ...) -> (2n, ...) as [x0, x0, x1, x1, ...]: doubling rows in place keeps each row's copy on the
    device that holds the row, where concatenating [x; x] would move half the batch between devices."""
    return jnp.repeat(x, 2, axis=0)


def _variables(
    params: dict[str, Any], adapters: AdapterInputs | None, part: str, paired: bool, fused: bool = False
) -> dict[str, Any]:
    """A component's Flax variables: its weights, and the rows' LoRA adapters when the batch has any
    (worker/engine/lora.py). paired: the component runs two rows per image (guidance), which share adapters.
    fused: the UNet's projections are fused (program_weights): its adapters are grouped to match."""
    out = {"params": params[part]}
    if adapters is not None and part in adapters.bank:
        slots, scales = adapters.slots, adapters.scales
        if paired:
            slots, scales = _pair(slots), _pair(scales)
        out["lora"] = lora.variables(adapters.bank[part], slots, scales)
        if fused and part == "unet":
            out["lora"] = program_weights.fuse_adapters(out["lora"])
    return out


class Program:
    """The traced functions (see the module's docstring); jit them with `jax.jit`, each is pure.

    output: 'uint8' (NHWC bytes, for serving) or 'float32' (for parity checks). attend: the attention kernel
    (attention.make). guided: two UNet rows per image (unconditional and conditional, classifier-free guidance);
    False: one, for batches whose every row has guidance <= 1 (Turbo, Lightning, LCM), half the UNet work.
    light_step: see the module's docstring. The weights it takes are program_weights.prepare's, in the form
    program_weights.form(model, light_step) (FP8 when the model is served so). controls: the configs of the
    ControlNets a controlled advance runs (AdvanceInputs.controls), in the engine's order."""

    def __init__(
        self,
        model: Model,
        output: str,
        attend: Attend,
        guided: bool = True,
        light_step: bool = True,
        controls: tuple[controlnet.ControlNetConfig, ...] = (),
        images: tuple[ip_adapter.IPAdapterConfig, ...] = (),
    ):
        self.model, self.output, self.guided, self.light_step = model, output, guided, light_step
        self.controls = [controlnet.ControlNet(c, attend, model.dtype) for c in controls]
        self.images = images  # the IP-Adapters an imaged begin runs (BeginInputs.images), in the engine's order
        self.form = program_weights.form(model, light_step)
        self.unet = model.configs.module("unet", model.dtype, attend, self.form)
        self.vae = model.configs.module("vae", model.dtype_of("vae"), attend)
        # An inpainting UNet sees the mask and the masked image's latents as extra input channels, and is not
        # blended (diffusers blends only for a base UNet).
        self.inpainting = model.inpainting

    def _text(self, params: dict[str, Any], ids: jax.Array, adapters: AdapterInputs | None, paired: bool) -> Any:
        """ids (n, 2, 77) -> context (n, 77, d1 + d2), pooled (n, p): SDXL's penultimate-layer embeddings. The
        refiner has the second text encoder alone: context (n, 77, d2)."""
        m = self.model
        te2 = m.configs.module("text_encoder_2", m.dtype)
        context2, pooled = te2.apply(_variables(params, adapters, "text_encoder_2", paired), ids[:, 1])
        if m.refiner:
            return context2, pooled
        te1 = m.configs.module("text_encoder", m.dtype)
        context1, _ = te1.apply(_variables(params, adapters, "text_encoder", paired), ids[:, 0])
        return jnp.concatenate([context1, context2], axis=-1), pooled

    def _vae_stats(self) -> tuple[jax.Array, jax.Array] | None:
        """The VAE config's per-channel latent mean and std (B, C, 1, 1 broadcast), when it has them."""
        cfg = self.model.vae
        if cfg.latents_mean is None or cfg.latents_std is None:
            return None
        mean = jnp.asarray(cfg.latents_mean, jnp.float32)[None, :, None, None]
        return mean, jnp.asarray(cfg.latents_std, jnp.float32)[None, :, None, None]

    def encode(self, params: dict[str, Any], inputs: EncodeInputs) -> jax.Array:
        """Images (B, 3, H, W) in [-1, 1] -> image latents (B, C, h, w), as the UNet sees them."""
        mean, _ = self.vae.apply({"params": params["vae"]}, inputs.images, method="encode")
        # The distribution's mode, not a sample: diffusers samples with its own generator, which no seed here
        # reproduces; SDXL's VAE log-variance is so small that the two differ far below a pixel level.
        latents = mean.astype(jnp.float32)
        scale, stats = self.model.vae.scaling_factor, self._vae_stats()
        if stats is not None:
            return (latents - stats[0]) * scale / stats[1]
        return latents * scale

    def begin(
        self, params: dict[str, Any], adapters: AdapterInputs | None, inputs: BeginInputs
    ) -> tuple[SamplerState, TextEmbeddings]:
        p, start = inputs.prompts, inputs.start
        b = p.ids.shape[0]
        if self.guided:
            both = jnp.stack([p.neg_ids, p.ids], axis=1).reshape(2 * b, *p.ids.shape[1:])  # [neg0, pos0, neg1, ...]
            context, pooled = self._text(params, both, adapters, paired=True)
            # A row without a negative prompt, on a model with force_zeros_for_empty_prompt: zero embeddings for
            # the unconditional half, as diffusers does (an empty-string negative prompt is encoded instead).
            keep = jnp.stack([~p.neg_zero, jnp.ones_like(p.neg_zero)], axis=1).reshape(2 * b).astype(context.dtype)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        else:
            context, pooled = self._text(params, p.ids, adapters, paired=False)
        keys_values = None
        if self.light_step:  # the text's keys and values, once per batch instead of once per step
            variables = _variables(params, adapters, "unet", self.guided, fused=self.form.fused)
            keys_values = text_keys_values(variables, context, self.model.dtype, self.form)
        if inputs.images is not None:
            if keys_values is None:
                raise ValueError("IP-Adapters need the light step (their keys and values are made in begin)")
            keys_values = self._image_prompts(keys_values, inputs.images)
        per_row = lambda v: v[:, None, None, None]  # noqa: E731  (B,) -> (B, 1, 1, 1)
        x = start.init * per_row(inputs.scalars.init_weight) + start.noise * per_row(inputs.scalars.init_scale)
        state = SamplerState(
            x=x,
            d=jnp.zeros_like(x),
            noise=start.noise,
            init=start.init,
            mask=start.mask,
            seeds=start.seeds,
            masked=start.masked if self.inpainting else None,
        )
        return state, TextEmbeddings(context, pooled, keys_values)

    def _image_prompts(self, keys_values: Any, images: ImageInputs) -> Any:
        """The text's keys and values with every served IP-Adapter's beside them (ip_adapter.merge): per image
        row, the unconditional UNet row gets a zero embedding's tokens and the conditional one the image's (as
        diffusers), both at the row's scale."""
        dtype, adapters = self.model.dtype, []
        for a, (config, weights) in enumerate(zip(self.images, images.weights, strict=True)):
            cond, uncond = ip_adapter.image_tokens(config, weights, images.pixels[:, a], dtype)
            scales = images.scales[:, a]
            if self.guided:  # [uncond0, cond0, uncond1, ...], as the text's rows
                tokens = jnp.stack([uncond, cond], axis=1).reshape(2 * cond.shape[0], *cond.shape[1:])
                scales = jnp.repeat(scales, 2)
            else:
                tokens = cond
            adapters.append(ip_adapter.keys_values(weights["layers"], tokens, scales, dtype))
        return ip_adapter.merge(keys_values, adapters)

    def advance(
        self,
        params: dict[str, Any],
        adapters: AdapterInputs | None,
        state: SamplerState,
        inputs: AdvanceInputs,
        start: jax.Array,
        stop: jax.Array,
    ) -> tuple[SamplerState, jax.Array]:
        """Steps start..stop-1 (traced bounds: any chunk of steps, and any number of steps, runs on this one
        executable). Returns `stop` too: it is ready when the chunk is, and the engine waits on it (progress)."""
        b = state.x.shape[0]
        guided, unet = self.guided, self.unet
        guidance = inputs.scalars.guidance[:, None, None, None]
        t = {name: inputs.tables[:, i] for i, name in enumerate(TABLES)}  # name -> (B, MAX_STEPS)
        rows = _pair if guided else (lambda v: v)
        ids = inputs.time_ids.reshape(2 * b, -1) if guided else inputs.time_ids[:, 1]  # [uncond0, cond0, ...]
        draw = jax.vmap(step_noise, in_axes=(0, None, None))
        variables = _variables(params, adapters, "unet", guided, fused=self.form.fused)
        if inputs.text.keys_values is not None:
            variables["text"] = inputs.text.keys_values
        control = self._control(inputs.controls, rows, ids, inputs.text)

        def step(i, carry):
            x, d_prev = carry
            col = lambda name: t[name][:, i, None, None, None]  # noqa: E731  (B, 1, 1, 1)
            model_in = x * col("c_in")
            residuals = control(model_in.astype(self.model.dtype), rows(t["timesteps"][:, i]), i)
            if self.inpainting:  # the extra channels go in unscaled, as in diffusers
                model_in = jnp.concatenate([model_in, state.mask, state.masked], axis=1)
            model_in = model_in.astype(self.model.dtype)
            text = inputs.text
            out = unet.apply(
                variables, rows(model_in), rows(t["timesteps"][:, i]), text.context, text.pooled, ids, residuals
            )
            out = out.astype(jnp.float32)
            if guided:
                out = out.reshape(b, 2, *out.shape[1:])
                uncond, cond = out[:, 0], out[:, 1]
                # diffusers skips guidance at scale <= 1; doing the same keeps results identical to it.
                out = jnp.where(guidance > 1, uncond + guidance * (cond - uncond), cond)
            d = col("p") * x + col("q") * out
            x = col("a") * x + col("b") * d + col("c") * d_prev + col("e") * draw(state.seeds, i, state.x.shape[1:])
            if not self.inpainting:
                # Inpainting: outside the mask, the image re-noised to the next step's level (blend 0 on padding).
                keep = (1 - state.mask) * col("blend")
                x = (1 - keep) * x + keep * (state.init * col("k") + col("s_next") * state.noise)
            return x, d

        x, d = jax.lax.fori_loop(start, stop, step, (state.x, state.d))
        return state.replace(x=x, d=d), stop

    def _control(self, controls: ControlInputs | None, rows: Any, ids: jax.Array, text: TextEmbeddings) -> Any:
        """control(model input (B, C, h, w), timesteps (UNet rows,), step) -> the ControlNets' residuals summed, each
        at its rows' scale for the step (None without controls). A ControlNet whose scale is zero on every row at
        this step (none of the rows uses it, or the step is outside their windows) is skipped, not computed."""
        if controls is None:
            return lambda sample, timesteps, i: None
        dtype = self.model.dtype
        # The control images' embeddings depend on the image alone: made once per chunk of steps, not per step.
        embedded = [
            rows(controlnet.embed(net.config, w, controls.images[:, c], dtype))
            for c, (net, w) in enumerate(zip(self.controls, controls.weights, strict=True))
        ]

        def control(sample: jax.Array, timesteps: jax.Array, i: jax.Array) -> Residuals:
            total = None
            for c, (net, weights) in enumerate(zip(self.controls, controls.weights, strict=True)):
                scale = controls.scales[:, c, i]  # (B,)
                per_row = rows(scale).astype(dtype)[:, None, None, None]

                def run(net=net, weights=weights, c=c, per_row=per_row) -> Residuals:
                    got = net.apply(
                        {"params": weights},
                        rows(sample),
                        timesteps,
                        text.context,
                        text.pooled,
                        ids,
                        embedded=embedded[c],
                    )
                    return jax.tree_util.tree_map(lambda r: r * per_row, got)

                zeros = jax.tree_util.tree_map(lambda r: jnp.zeros(r.shape, r.dtype), jax.eval_shape(run))
                got = jax.lax.cond(jnp.any(scale != 0), run, lambda zeros=zeros: zeros)
                total = got if total is None else jax.tree_util.tree_map(jnp.add, total, got)
            return total

        return control

    def finish(self, params: dict[str, Any], state: SamplerState, scalars: RowScalars) -> tuple[jax.Array, jax.Array]:
        """The last sample -> (images (B, H, W, 3): uint8, or float32 in [0, 1]; finite (B,) bool)."""
        latents = state.x * scalars.out_scale[:, None, None, None]
        cfg, stats = self.model.vae, self._vae_stats()
        if stats is not None:  # diffusers' SDXL pipeline: latents * std / scaling_factor + mean, per channel
            latents = latents * stats[1] / cfg.scaling_factor + stats[0]
        else:
            latents = latents / cfg.scaling_factor
        image = self.vae.apply({"params": params["vae"]}, latents, method="decode")
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)  # (B, H, W, 3)
        finite = jnp.isfinite(image).all(axis=(1, 2, 3))
        if self.output == "uint8":
            # Bytes leave the device, not float32: 4x less to copy to the host.
            image = jnp.round(image * 255).astype(jnp.uint8)
        return image, finite
