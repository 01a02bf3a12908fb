"""TAESD's decoder (madebyollin's tiny autoencoder; TAESD-XL for SDXL's latents): previews worth looking at, for a
fraction of the VAE's cost. Its architecture as diffusers' AutoencoderTiny has it (`DecoderTiny`), read from a
diffusers AutoencoderTiny folder (config.json and diffusion_pytorch_model.safetensors; the encoder's tensors
are not read).

    decoder = taesd.load("/models/taesdxl")                     # PreviewDecoder: config and host parameters
    image = TAESDDecoder(decoder.config).apply({"params": decoder.params}, latents)  # (B, 4, h, w) -> (B, 3, 8h, 8w)

The network (about 1.2M parameters for TAESD-XL, every conv 64 wide): latents soft-clamped to [-3, 3]
(3 tanh(x / 3)), conv_in and the activation, then per stage `num_blocks` residual blocks (conv, act, conv, act,
conv, plus the input, then ReLU), 2x nearest upsampling and a conv without bias (the last stage: no upsampling,
a conv with bias to RGB). It draws [0, 1]; diffusers maps that to [-1, 1] (2x - 1), as the VAE's decode gives.
Parameter names follow diffusers' `decoder.layers.N` list: the activations and upsamplers hold an index of
their own, so conv_in is layers_0 and the first block layers_2.

Which latents it takes: the UNet's, as they are. AutoencoderTiny.decode applies no scale or shift; SDXL's
pipeline divides by the VAE config's `scaling_factor` first, which AutoencoderTiny's config sets to 1.0 (TAESD
was trained on latents already multiplied by SDXL's 0.13025), and it has no latents_mean/std. `preview` divides
by the config's scaling_factor likewise, so a config that says otherwise is honoured as diffusers would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from worker.engine.layers import conv
from worker.engine.model_source import ModelError, convert_component, locate_weights, read_state

STEM = "diffusion_pytorch_model"
PREVIEW_MAX_SIDE_PX = 256  # a preview's long side at most (worker/loop/preview.py's limit): shrunk on the device
# diffusers' get_activation names -> ours (torch's GELU is the exact one, not the tanh approximation)
ACTIVATIONS = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


@dataclass(frozen=True)
class TAESDConfig:
    """The decoder's half of an AutoencoderTiny config.json (its defaults are TAESD-XL's)."""

    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 64, 64, 64)  # decoder_block_out_channels, per stage
    num_blocks: tuple[int, ...] = (3, 3, 3, 1)  # num_decoder_blocks: residual blocks per stage
    upsampling_scaling_factor: int = 2
    act_fn: str = "relu"
    scaling_factor: float = 1.0  # what the pipeline divides latents by before decoding

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> TAESDConfig:
        name = config.get("_class_name", "AutoencoderTiny")
        if name != "AutoencoderTiny":
            raise ValueError(f"a {name}, not diffusers' AutoencoderTiny")
        if config.get("upsample_fn", "nearest") != "nearest":
            raise ValueError(f"upsample_fn {config['upsample_fn']!r}: only nearest is implemented")
        made = cls(
            latent_channels=int(config.get("latent_channels", 4)),
            out_channels=int(config.get("out_channels", 3)),
            block_out_channels=tuple(config.get("decoder_block_out_channels", cls.block_out_channels)),
            num_blocks=tuple(config.get("num_decoder_blocks", cls.num_blocks)),
            upsampling_scaling_factor=int(config.get("upsampling_scaling_factor", 2)),
            act_fn=str(config.get("act_fn", "relu")),
            scaling_factor=float(config.get("scaling_factor", 1.0)),
        )
        if made.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn {made.act_fn!r}: one of {sorted(ACTIVATIONS)}")
        if len(made.block_out_channels) != len(made.num_blocks):
            raise ValueError("decoder_block_out_channels and num_decoder_blocks differ in length")
        return made

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (8 for TAESD-XL)."""
        return self.upsampling_scaling_factor ** (len(self.num_blocks) - 1)


class Block(nn.Module):
    """AutoencoderTinyBlock: conv (conv_0), act, conv (conv_2), act, conv (conv_4), plus the input, ReLU. Its
    input and output widths are equal in DecoderTiny, so the skip is the identity (no weights)."""

    width: int
    act_fn: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        y = act(conv(self.width, 3, "conv_0", self.dtype)(x))
        y = act(conv(self.width, 3, "conv_2", self.dtype)(y))
        y = conv(self.width, 3, "conv_4", self.dtype)(y)
        return nn.relu(y + x)


class TAESDDecoder(nn.Module):
    config: TAESDConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        """latents (B, C, h, w), as AutoencoderTiny.decode takes them -> image (B, 3, H, W) in about [-1, 1]."""
        cfg, act = self.config, ACTIVATIONS[self.config.act_fn]
        x = latents.transpose(0, 2, 3, 1).astype(self.dtype)  # NHWC
        x = jnp.tanh(x / 3) * 3
        x = act(conv(cfg.block_out_channels[0], 3, "layers_0", self.dtype)(x))
        index = 2  # layers_1 is the activation
        for stage, (width, blocks) in enumerate(zip(cfg.block_out_channels, cfg.num_blocks, strict=True)):
            last = stage == len(cfg.num_blocks) - 1
            for _ in range(blocks):
                x = Block(width, cfg.act_fn, self.dtype, name=f"layers_{index}")(x)
                index += 1
            if not last:
                f = cfg.upsampling_scaling_factor
                x = jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)  # nearest
                index += 1
            out = cfg.out_channels if last else width
            pad = ((1, 1), (1, 1))
            x = nn.Conv(out, (3, 3), padding=pad, use_bias=last, dtype=self.dtype, name=f"layers_{index}")(x)
            index += 1
        return (x * 2 - 1).transpose(0, 3, 1, 2)

    def shapes(self) -> Any:
        latents = jnp.zeros((1, self.config.latent_channels, 1, 1))
        return jax.eval_shape(lambda: self.init(jax.random.key(0), latents))["params"]


@dataclass
class PreviewDecoder:
    """A TAESD decoder as an engine serves it for previews: its config and host parameters."""

    config: TAESDConfig
    params: Any  # TAESDDecoder's tree, host arrays in float32
    source: str  # where it was read from (logs)


def load(spec: str | Path, variant: str = "") -> PreviewDecoder:
    """A diffusers AutoencoderTiny folder (config.json, diffusion_pytorch_model[.variant].safetensors): its
    decoder. ModelError says what does not fit. float32: the decoder is small, and a preview's cost is its
    pixels' convolutions, not its weights' bytes."""
    path = Path(spec)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.exists():
        raise ModelError(f"preview decoder: {path} is not a diffusers AutoencoderTiny folder (no config.json)")
    try:
        config = TAESDConfig.from_diffusers(json.loads(config_path.read_text()))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"preview decoder ({path}): not a TAESD: {exc}") from exc
    files = locate_weights(path, STEM, variant)

    def decoder_state() -> dict[str, Any]:  # the decoder's tensors, named as within it
        prefix = "decoder."
        return {k[len(prefix) :]: v for k, v in read_state(files).items() if k.startswith(prefix)}

    shapes = TAESDDecoder(config).shapes()
    what = f"preview decoder ({path})"
    params = convert_component("taesd", decoder_state, files, shapes, jnp.float32, None, what).tree()
    return PreviewDecoder(config, params, str(path))


def preview_size(height: int, width: int, max_side_px: int = PREVIEW_MAX_SIDE_PX) -> tuple[int, int]:
    """An image's preview size: shrunk to max_side_px on its long side (never enlarged), aspect kept."""
    scale = min(1.0, max_side_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def preview(config: TAESDConfig, params: Any, latents: jax.Array, max_side_px: int = PREVIEW_MAX_SIDE_PX) -> jax.Array:
    """The UNet's latents (B, C, h, w) (the sampler's estimate) -> RGB previews (B, H', W', 3) uint8, at most
    max_side_px on the long side: decoded, then shrunk on the device (antialiased), so only small bytes leave it.
    Non-finite values draw as black."""
    image = TAESDDecoder(config).apply({"params": params}, latents.astype(jnp.float32) / config.scaling_factor)
    rgb = jnp.nan_to_num((image / 2 + 0.5).transpose(0, 2, 3, 1), nan=0.0).clip(0, 1)  # (B, H, W, 3)
    height, width = preview_size(rgb.shape[1], rgb.shape[2], max_side_px)
    if (height, width) != rgb.shape[1:3]:  # a triangle filter: no overshoot past [0, 1]
        rgb = jax.image.resize(rgb, (rgb.shape[0], height, width, 3), "linear", antialias=True)
    return jnp.round(rgb * 255).astype(jnp.uint8)
