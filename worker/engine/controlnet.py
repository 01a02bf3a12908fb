"""An SDXL ControlNet (diffusers' ControlNetModel), from its config.json: the UNet's encoder half, which sees the
sample plus an embedding of a control image, and hands the UNet one residual per skip of its down path and
one for its mid block.

    residuals = ControlNet(config).apply(variables, sample NCHW, timesteps, context, text_embeds, time_ids, image)
    embedded = embed(config, params, image, dtype)  # the image alone: made once per chunk, handed in as `embedded`

What it is: the UNet's time and text_time embeddings, conv_in and down blocks and mid block (unet.py's, the same
parameter names); `controlnet_cond_embedding` (ControlNetConditioningEmbedding: a 3x3 conv, then per level a 3x3
conv and a stride-2 3x3 conv, SiLU after each, then a 3x3 conv to the UNet's first width), added to conv_in's
output; `controlnet_down_blocks_i`, a 1x1 conv per skip, and `controlnet_mid_block`, a 1x1 conv on the mid
block's output (the "zero convolutions": zero when training starts, so a fresh ControlNet changes nothing).

The control image goes in as diffusers' pipelines hand it: (B, 3, H, W) in [0, 1] at the output size, RGB. The
conditioning scale is the caller's (program.py multiplies the residuals per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from worker.engine.layers import Attend, Projections, conv
from worker.engine.unet import Residuals, UNetConfig, down_path, embed_time

UP = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder half's (the up blocks are the mirror of the down blocks, and unused)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], pooled_width: int) -> ControlNetConfig:
        """A ControlNetModel config.json's contents; what SDXL's ControlNets do not have is refused by name."""
        if config.get("global_pool_conditions"):
            raise ValueError("global_pool_conditions (a shuffle-style ControlNet) is not supported")
        if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
            raise ValueError("only RGB control images (controlnet_conditioning_channel_order 'rgb')")
        mirrored = [UP.get(kind, kind) for kind in reversed(config.get("down_block_types", []))]
        unet = UNetConfig.from_diffusers(
            config | {"up_block_types": mirrored, "out_channels": config.get("in_channels", 4)}, pooled_width
        )
        return cls(
            unet,
            config.get("conditioning_channels", 3),
            tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """Its config.json (tests and benchmarks write random ControlNets with it)."""
        u = self.unet
        return {
            "_class_name": "ControlNetModel",
            "in_channels": u.in_channels,
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "down_block_types": list(u.down_block_types),
            "block_out_channels": list(u.block_out_channels),
            "layers_per_block": u.layers_per_block,
            "attention_head_dim": list(u.heads),
            "transformer_layers_per_block": list(u.transformer_layers_per_block),
            "cross_attention_dim": u.cross_attention_dim,
            "use_linear_projection": u.use_linear_projection,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": u.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": u.projection_class_embeddings_input_dim,
            "flip_sin_to_cos": u.flip_sin_to_cos,
            "freq_shift": u.freq_shift,
            "norm_num_groups": u.norm_num_groups,
            "norm_eps": u.norm_eps,
        }


class ConditioningEmbedding(nn.Module):
    """diffusers' ControlNetConditioningEmbedding: image (B, H, W, 3) -> (B, H / 2^levels, W / 2^levels, out)."""

    widths: tuple[int, ...]
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(conv(self.widths[0], 3, "conv_in", self.dtype)(x.astype(self.dtype)))
        for i in range(len(self.widths) - 1):
            x = nn.silu(conv(self.widths[i], 3, f"blocks_{2 * i}", self.dtype)(x))
            x = nn.silu(conv(self.widths[i + 1], 3, f"blocks_{2 * i + 1}", self.dtype, stride=2)(x))
        return conv(self.out, 3, "conv_out", self.dtype)(x)


class ControlNet(nn.Module):
    """config: ControlNetConfig; attend, dtype, form: as the UNet's (a ControlNet's projections stay in the
    checkpoint's layout: Projections())."""

    config: ControlNetConfig
    attend: Attend
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        text_embeds: jax.Array,
        time_ids: jax.Array,
        image: jax.Array | None = None,
        embedded: jax.Array | None = None,
    ) -> Residuals:
        """As the UNet's inputs (sample (B, C, h, w) NCHW), and the control image (B, 3, H, W) in [0, 1] or its
        embedding already made (`embed`: the same at every step) -> the residuals at scale 1, NHWC."""
        cfg, dtype = self.config.unet, self.dtype
        context = context.astype(dtype)
        temb = embed_time(cfg, timesteps, text_embeds, time_ids, dtype)
        x = conv(cfg.block_out_channels[0], 3, "conv_in", dtype)(sample.transpose(0, 2, 3, 1).astype(dtype))
        if embedded is None:
            assert image is not None, "a control image or its embedding"
            embedded = self._embedding()(image.transpose(0, 2, 3, 1))
        x, skips = down_path(self, cfg, x + embedded.astype(dtype), temb, context)
        down = [conv(s.shape[-1], 1, f"controlnet_down_blocks_{i}", dtype)(s) for i, s in enumerate(skips)]
        return Residuals(down, conv(x.shape[-1], 1, "controlnet_mid_block", dtype)(x))

    def _embedding(self) -> ConditioningEmbedding:
        cfg = self.config
        widths, out = cfg.conditioning_embedding_out_channels, cfg.unet.block_out_channels[0]
        return ConditioningEmbedding(widths, out, self.dtype, name="controlnet_cond_embedding")

    def shapes(self) -> Any:
        """The parameter tree's shapes (jax.ShapeDtypeStruct in float32), traced, never materialised."""
        cfg = self.config.unet
        size = 2 ** (len(cfg.block_out_channels) - 1)
        factor = 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)
        args = (
            jnp.zeros((1, cfg.in_channels, size, size)),
            jnp.zeros((1,)),
            jnp.zeros((1, 77, cfg.cross_attention_dim)),
            jnp.zeros((1, cfg.pooled_width)),
            jnp.zeros((1, cfg.time_ids)),
            jnp.zeros((1, self.config.conditioning_channels, size * factor, size * factor)),
        )
        return jax.eval_shape(lambda: self.init(jax.random.key(0), *args))["params"]


def embed(config: ControlNetConfig, params: Any, image: jax.Array, dtype: Any) -> jax.Array:
    """The control image (B, 3, H, W) in [0, 1] -> its embedding (B, h, w, first width), NHWC, from a ControlNet's
    parameters: the same at every step, so the program makes it once per chunk of steps, not per step."""
    widths, out = config.conditioning_embedding_out_channels, config.unet.block_out_channels[0]
    layer = ConditioningEmbedding(widths, out, dtype)
    return layer.apply({"params": params["controlnet_cond_embedding"]}, image.transpose(0, 2, 3, 1))
