"""The SDXL UNet (base and refiner), from a diffusers UNet2DConditionModel config.json.

    noise prediction = UNet(config)(sample NCHW, timesteps, context, text_embeds, time_ids)

What it is: conv_in; a timestep embedding plus SDXL's "text_time" embedding (the pooled text embedding and
the sinusoidal embeddings of the size/crop ids, through add_embedding); down blocks of ResNets, with
transformers where the block is CrossAttnDownBlock2D, each but the last halving the size; a mid block
(ResNet, transformer, ResNet); up blocks that take the down path's outputs back as skips; GroupNorm, SiLU,
conv_out. SDXL base: 3 levels (320, 640, 1280), transformer depths 0/2/10, 6 time ids; the refiner: 4 levels
(384, 768, 1536, 1536), depth 4, 5 time ids (an aesthetic score instead of the target size).

diffusers' `attention_head_dim` in SDXL's config is the number of heads per block (a long-standing
misnomer there): heads = attention_head_dim[i], head width = block width / heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from worker.engine.layers import (
    Attend,
    Downsample,
    Projections,
    ResnetBlock,
    TextKeysValues,
    TimestepEmbedding,
    Transformer2D,
    Upsample,
    conv,
    timestep_embedding,
)

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


def _per_block(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (5, 10, 20)  # diffusers' attention_head_dim (or num_attention_heads), per block
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    cross_attention_dim: int = 2048
    use_linear_projection: bool = True
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # size/crop ids in the text_time embedding: 6 for SDXL base (original size, crop, target size), 5 for the
    # refiner (original size, crop, aesthetic score). Not in the config: it follows from the pooled width.
    time_ids: int = 6

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], pooled_width: int) -> UNetConfig:
        """A diffusers config.json's contents, and the width of the pooled text embedding (the second text
        encoder's projection_dim); anything SDXL's UNet does not have is refused by name."""
        if config.get("addition_embed_type") != "text_time":
            raise ValueError(
                f"the UNet's addition_embed_type is {config.get('addition_embed_type')!r}; SDXL's is 'text_time'"
            )
        for key, ok in (("class_embed_type", None), ("encoder_hid_dim_type", None), ("time_cond_proj_dim", None)):
            if config.get(key, ok) != ok:
                raise ValueError(f"the UNet's {key}={config[key]!r} is not part of SDXL's UNet")
        unknown = [b for b in config.get("down_block_types", []) if b not in DOWN_BLOCKS]
        unknown += [b for b in config.get("up_block_types", []) if b not in UP_BLOCKS]
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn" or unknown:
            raise ValueError(f"the UNet has blocks SDXL's does not: {unknown or config['mid_block_type']}")
        n = len(config["block_out_channels"])
        heads = config.get("num_attention_heads") or config["attention_head_dim"]
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        values |= {
            "down_block_types": tuple(config["down_block_types"]),
            "up_block_types": tuple(config["up_block_types"]),
            "block_out_channels": tuple(config["block_out_channels"]),
            "heads": _per_block(heads, n),
            "transformer_layers_per_block": _per_block(config.get("transformer_layers_per_block", 1), n),
        }
        if isinstance(config.get("layers_per_block"), list):
            raise ValueError("a per-block layers_per_block is not part of SDXL's UNet")
        ids, rest = divmod(
            config["projection_class_embeddings_input_dim"] - pooled_width, config["addition_time_embed_dim"]
        )
        if rest or ids not in (5, 6):
            raise ValueError(
                f"the UNet's add_embedding takes {config['projection_class_embeddings_input_dim']} values: not a "
                f"pooled text embedding of {pooled_width} plus 5 or 6 time ids of {config['addition_time_embed_dim']}"
            )
        return cls(**values, time_ids=ids)

    @property
    def pooled_width(self) -> int:
        """The pooled text embedding's width: add_embedding's input is it and the ids' embeddings."""
        return self.projection_class_embeddings_input_dim - self.time_ids * self.addition_time_embed_dim


class DownBlock(nn.Module):
    """DownBlock2D, or CrossAttnDownBlock2D when `depth` > 0: ResNets (each followed by a transformer), then a
    stride-2 conv unless it is the last block. Returns the output and the skips it hands the up path."""

    width: int
    layers: int
    heads: int
    depth: int  # transformer blocks after each ResNet; 0: none (DownBlock2D)
    downsample: bool
    cfg: UNetConfig
    attend: Attend
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j in range(self.layers):
            x = _resnet(self, self.width, f"resnets_{j}")(x, temb)
            if self.depth:
                x = _transformer(self, self.heads, self.depth, f"attentions_{j}")(x, context)
            skips.append(x)
        if self.downsample:
            x = Downsample(self.width, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: ResNet, transformer, ResNet."""

    heads: int
    depth: int
    cfg: UNetConfig
    attend: Attend
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = _resnet(self, width, "resnets_0")(x, temb)
        x = _transformer(self, self.heads, self.depth, "attentions_0")(x, context)
        return _resnet(self, width, "resnets_1")(x, temb)


class UpBlock(nn.Module):
    """UpBlock2D, or CrossAttnUpBlock2D when `depth` > 0: each ResNet takes the next skip (concatenated on
    channels), then 2x nearest upsampling and a conv unless it is the last block."""

    width: int
    layers: int
    heads: int
    depth: int
    upsample: bool
    cfg: UNetConfig
    attend: Attend
    dtype: Any = jnp.float32
    form: Projections = Projections()

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array) -> jax.Array:
        for j in range(self.layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _resnet(self, self.width, f"resnets_{j}")(x, temb)
            if self.depth:
                x = _transformer(self, self.heads, self.depth, f"attentions_{j}")(x, context)
        if self.upsample:
            x = Upsample(self.width, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _transformer(block: Any, heads: int, depth: int, name: str) -> Transformer2D:
    cfg = block.cfg
    return Transformer2D(
        heads, depth, block.attend, cfg.use_linear_projection, cfg.norm_num_groups, block.dtype, block.form, name=name
    )


def _resnet(block: Any, width: int, name: str) -> ResnetBlock:
    cfg = block.cfg
    return ResnetBlock(width, cfg.norm_num_groups, cfg.norm_eps, block.dtype, block.form.fp8, name=name)


@struct.dataclass
class Residuals:
    """What ControlNets add to the UNet (NHWC, in the UNet's dtype): one per skip of the down path (conv_in's
    output, then each down block's), and one for the mid block's output."""

    down: list[jax.Array]
    mid: jax.Array


def embed_time(cfg: UNetConfig, timesteps: jax.Array, text_embeds: jax.Array, time_ids: jax.Array, dtype: Any) -> Any:
    """The timestep embedding plus SDXL's text_time embedding (time_embedding, add_embedding), made inside the
    calling module's compact method (the UNet's, a ControlNet's: the same parameter names)."""
    width = cfg.block_out_channels[0]
    temb = timestep_embedding(timesteps, width, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype)
    temb = TimestepEmbedding(4 * width, dtype=dtype, name="time_embedding")(temb)
    b = time_ids.shape[0]
    ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    added = jnp.concatenate([text_embeds.astype(jnp.float32), ids.reshape(b, -1)], axis=-1).astype(dtype)
    return temb + TimestepEmbedding(4 * width, dtype=dtype, name="add_embedding")(added)


def down_path(
    module: Any, cfg: UNetConfig, x: jax.Array, temb: jax.Array, context: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """The down blocks and the mid block of `cfg`, made inside `module`'s compact method (it has attend, dtype
    and form): x after conv_in -> (the mid block's output, the skips: x itself, then each down block's)."""
    dtype = module.dtype
    channels = cfg.block_out_channels
    last = len(channels) - 1
    skips = [x]
    for i, kind in enumerate(cfg.down_block_types):
        depth = cfg.transformer_layers_per_block[i] if kind == "CrossAttnDownBlock2D" else 0
        block = DownBlock(
            channels[i],
            cfg.layers_per_block,
            cfg.heads[i],
            depth,
            i < last,
            cfg,
            module.attend,
            dtype,
            module.form,
            name=f"down_blocks_{i}",
        )
        x, more = block(x, temb, context)
        skips += more
    depth = cfg.transformer_layers_per_block[-1]
    mid = MidBlock(cfg.heads[-1], depth, cfg, module.attend, dtype, module.form, name="mid_block")
    return mid(x, temb, context), skips


class UNet(nn.Module):
    """form: how the projections are computed (layers.Projections; the checkpoint's layout by default, the
    program's own from program_weights.py)."""

    config: UNetConfig
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
        residuals: Residuals | None = None,
    ) -> jax.Array:
        """sample (B, C, h, w); timesteps (B,); context (B, 77, cross_attention_dim); text_embeds (B, pooled);
        time_ids (B, n ids); residuals: ControlNets' (controlnet.py), added to the down path's skips and the
        mid block's output, as diffusers' down_block_additional_residuals and mid_block_additional_residual.
        Returns the prediction (B, C, h, w) in `dtype`."""
        cfg, dtype = self.config, self.dtype
        channels = cfg.block_out_channels
        last = len(channels) - 1
        context = context.astype(dtype)
        temb = embed_time(cfg, timesteps, text_embeds, time_ids, dtype)
        x = conv(channels[0], 3, "conv_in", dtype)(sample.transpose(0, 2, 3, 1).astype(dtype))
        x, skips = down_path(self, cfg, x, temb, context)
        if residuals is not None:
            skips = [s + r.astype(dtype) for s, r in zip(skips, residuals.down, strict=True)]
            x = x + residuals.mid.astype(dtype)

        up_heads, up_depths = cfg.heads[::-1], cfg.transformer_layers_per_block[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            depth = up_depths[i] if kind == "CrossAttnUpBlock2D" else 0
            block = UpBlock(
                channels[last - i],
                cfg.layers_per_block + 1,
                up_heads[i],
                depth,
                i < last,
                cfg,
                self.attend,
                dtype,
                self.form,
                name=f"up_blocks_{i}",
            )
            x = block(x, skips, temb, context)

        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dtype, name="conv_norm_out")(x))
        x = conv(cfg.out_channels, 3, "conv_out", dtype)(x)
        return x.transpose(0, 3, 1, 2)

    def shapes(self) -> Any:
        """The parameter tree's shapes (jax.ShapeDtypeStruct in float32), traced, never materialised."""
        cfg = self.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        args = (
            jnp.zeros((1, cfg.in_channels, factor, factor)),
            jnp.zeros((1,)),
            jnp.zeros((1, 77, cfg.cross_attention_dim)),
            jnp.zeros((1, cfg.pooled_width)),
            jnp.zeros((1, cfg.time_ids)),
        )
        return jax.eval_shape(lambda: self.init(jax.random.key(0), *args))["params"]


def text_keys_values(variables: Mapping[str, Any], context: jax.Array, dtype: Any, form: Projections) -> dict[str, Any]:
    """Every cross-attention's keys and values of the text `context` (n, 77, D), as the "text" collection the
    UNet reads in place of projecting the context at each step (layers.Attention): the context is the same at
    every step, so the program computes these once per batch (program.Program.begin). variables: the UNet's
    (`params` in the program's form, `lora` when the rows have adapters). The result mirrors the parameters'
    paths down to each `attn2`: {"k": (n, 77, inner), "v": ...}. SDXL base, per UNet row in bfloat16: 70
    cross-attentions x 77 tokens x 2 x (10 x 640 + 60 x 1280 wide) = 25.6 MB."""
    context = context.astype(dtype)

    def walk(params: Mapping[str, Any], adapters: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, node in params.items():
            if not isinstance(node, Mapping):
                continue
            below = adapters.get(name) if adapters is not None else None
            if name == "attn2":
                to_q = node["to_q"]
                inner = to_q["kernel"].shape[-1]
                layer = TextKeysValues(inner, "bias" in to_q, dtype, form)
                k, v = layer.apply({"params": node} | ({"lora": below} if below is not None else {}), context)
                out[name] = {"k": k, "v": v}
            elif found := walk(node, below):
                out[name] = found
        return out

    return walk(variables["params"], variables.get("lora"))
