"""SDXL's AutoencoderKL, encoder and decoder, from a diffusers config.json.

    latents = VAE(config).apply(params, image, method="encode")   # (B, 3, H, W) in [-1, 1] -> mean (B, 4, h, w)
    image   = VAE(config).apply(params, latents, method="decode") # the inverse, (B, 3, H, W) in about [-1, 1]

Encoder: conv_in, down blocks of ResNets each but the last ending in a stride-2 conv padded bottom/right only,
a mid block (ResNet, one-head self-attention over all pixels, ResNet), GroupNorm, SiLU, conv_out to the mean
and log-variance, then quant_conv. Decoder: post_quant_conv, conv_in, the mid block, up blocks of
layers_per_block + 1 ResNets each but the last ending in 2x nearest upsampling and a conv, GroupNorm, SiLU,
conv_out. The scaling factor (and latents_mean/std where a config has them) is applied by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from worker.engine.layers import Attend, Downsample, ResnetBlock, Upsample, conv


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    force_upcast: bool = True
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VAEConfig:
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            odd = [b for b in config.get(key, []) if b != want]
            if odd:
                raise ValueError(f"the VAE's {key} has {odd}; SDXL's AutoencoderKL has only {want}")
        if config.get("use_quant_conv", True) is False or config.get("use_post_quant_conv", True) is False:
            raise ValueError("a VAE without quant_conv/post_quant_conv is not SDXL's AutoencoderKL")
        if config.get("mid_block_add_attention", True) is False:
            raise ValueError("a VAE without mid-block attention is not SDXL's AutoencoderKL")
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        for key in ("block_out_channels", "latents_mean", "latents_std"):
            if key in values:
                values[key] = tuple(values[key])
        made = cls(**values)
        for key in ("latents_mean", "latents_std"):
            value = getattr(made, key)
            if value is not None and len(value) != made.latent_channels:
                raise ValueError(f"the VAE's {key} has {len(value)} values for {made.latent_channels} latent channels")
        return made

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


class SpatialAttention(nn.Module):
    """The mid block's attention: GroupNorm, then every pixel attends to every pixel (one head as wide as the
    block), to_out.0, plus the input."""

    groups: int
    attend: Attend
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(t) for name in ("to_q", "to_k", "to_v"))
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(self.attend(q, k, v, 1))
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    groups: int
    attend: Attend
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = ResnetBlock(width, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
        x = SpatialAttention(self.groups, self.attend, self.dtype, name="attentions_0")(x)
        return ResnetBlock(width, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: ResNets, then a stride-2 conv padded bottom/right ("down"), 2x
    nearest upsampling and a conv ("up"), or nothing (the last block of each side)."""

    width: int
    layers: int
    resample: str  # "down", "up" or ""
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.layers):
            x = ResnetBlock(self.width, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.width, asymmetric=True, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.width, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    cfg: VAEConfig
    attend: Attend
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype, groups = self.cfg, self.dtype, self.cfg.norm_num_groups
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, "conv_in", dtype)(x)
        for i, width in enumerate(channels):
            last = i == len(channels) - 1
            x = Block(width, cfg.layers_per_block, "" if last else "down", groups, dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(groups, self.attend, dtype, name="mid_block")(x)
        x = nn.silu(nn.GroupNorm(groups, epsilon=1e-6, dtype=dtype, name="conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", dtype)(x)


class Decoder(nn.Module):
    cfg: VAEConfig
    attend: Attend
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype, groups = self.cfg, self.dtype, self.cfg.norm_num_groups
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], 3, "conv_in", dtype)(x)
        x = MidBlock(groups, self.attend, dtype, name="mid_block")(x)
        for i, width in enumerate(channels):
            last = i == len(channels) - 1
            x = Block(width, cfg.layers_per_block + 1, "" if last else "up", groups, dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(nn.GroupNorm(groups, epsilon=1e-6, dtype=dtype, name="conv_norm_out")(x))
        return conv(cfg.out_channels, 3, "conv_out", dtype)(x)


class VAE(nn.Module):
    config: VAEConfig
    attend: Attend
    dtype: Any = jnp.float32

    def setup(self) -> None:
        c, latent = self.config, self.config.latent_channels
        self.encoder = Encoder(c, self.attend, self.dtype)
        self.quant_conv = conv(2 * latent, 1, "quant_conv", self.dtype, padding="VALID")
        self.post_quant_conv = conv(latent, 1, "post_quant_conv", self.dtype, padding="VALID")
        self.decoder = Decoder(c, self.attend, self.dtype)

    def encode(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image (B, 3, H, W) in [-1, 1] -> the latent distribution's (mean, log-variance), each (B, C, h, w),
        unscaled (multiply by scaling_factor for the UNet)."""
        moments = self.quant_conv(self.encoder(image.transpose(0, 2, 3, 1).astype(self.dtype)))
        mean, logvar = jnp.split(moments.transpose(0, 3, 1, 2), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, C, h, w), unscaled -> image (B, 3, H, W), about [-1, 1]."""
        x = self.post_quant_conv(latents.transpose(0, 2, 3, 1).astype(self.dtype))
        return self.decoder(x).transpose(0, 3, 1, 2)

    def __call__(self, image: jax.Array) -> jax.Array:
        """encode then decode the mean: what init traces, so the tree holds both halves."""
        mean, _ = self.encode(image)
        return self.decode(mean)

    def shapes(self) -> Any:
        size = self.config.scale_factor
        image = jnp.zeros((1, self.config.in_channels, size, size))
        return jax.eval_shape(lambda: self.init(jax.random.key(0), image))["params"]
