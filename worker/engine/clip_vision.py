"""CLIP's vision tower with its projection (transformers' CLIPVisionModelWithProjection): the image encoder an
IP-Adapter reads (ViT-bigG for `ip-adapter_sdxl`, ViT-H for the `vit-h` variants), from its config.json.

    image_embeds = VisionEncoder(config).apply(variables, pixels (B, 3, S, S) normalized) -> (B, projection_dim)

A ViT: the image cut into patch_size squares by a stride-patch convolution (patch_embedding, no bias), a learned
class token before them, learned position embeddings, `pre_layrnorm` (transformers' spelling), the text encoder's
pre-LayerNorm blocks without the causal mask (clip.Encoder), then the class token's final state through
`post_layernorm` and `visual_projection` (no bias).

The pixels are what transformers' CLIPImageProcessor makes (preprocess): the shortest side resized to S with
PIL's bicubic filter, a centred S x S crop, [0, 1], then normalized by CLIP's per-channel mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from worker.engine.clip import ACTIVATIONS, CLIPConfig, Encoder

# CLIPImageProcessor's defaults (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD): every IP-Adapter's image encoder uses them
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> VisionConfig:
        """A CLIPVisionModelWithProjection config.json (or a CLIPConfig's vision_config); others refused by name."""
        config = config.get("vision_config", config)
        if config.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"an image encoder of type {config['model_type']!r} is not a CLIP vision model")
        if config.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(
                f"image encoder activation {config['hidden_act']!r}: expected one of {sorted(ACTIVATIONS)}"
            )
        return cls(**{f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def encoder(self) -> CLIPConfig:
        """The transformer blocks' config, as the text encoder's (clip.py), without the causal mask."""
        return CLIPConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            causal=False,
        )


class Embeddings(nn.Module):
    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, S, S, 3) NHWC -> (B, 1 + patches, hidden)."""
        cfg, p = self.cfg, self.cfg.patch_size
        patch = nn.Conv(
            cfg.hidden_size, (p, p), (p, p), "VALID", use_bias=False, dtype=self.dtype, name="patch_embedding"
        )
        x = patch(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)  # row-major patches, as PyTorch's flatten(2)
        token = self.param("class_embedding", nn.initializers.normal(), (cfg.hidden_size,), jnp.float32)
        token = jnp.broadcast_to(token.astype(self.dtype), (x.shape[0], 1, cfg.hidden_size))
        positions = nn.Embed(cfg.tokens, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return jnp.concatenate([token, x], axis=1) + positions(jnp.arange(cfg.tokens)[None])


class VisionModel(nn.Module):
    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, S, S, 3) -> the class token's final, normed state (B, hidden)."""
        cfg = self.cfg
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = norm("pre_layrnorm")(Embeddings(cfg, self.dtype, name="embeddings")(pixels))
        last, _ = Encoder(cfg.encoder(), self.dtype, name="encoder")(x)
        return norm("post_layernorm")(last[:, 0])


class VisionEncoder(nn.Module):
    """CLIPVisionModelWithProjection's image_embeds: pixels (B, 3, S, S) -> (B, projection_dim)."""

    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        pooled = VisionModel(self.config, self.dtype, name="vision_model")(pixels.transpose(0, 2, 3, 1))
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")
        return projection(pooled)

    def shapes(self) -> Any:
        size = self.config.image_size
        pixels = jnp.zeros((1, self.config.num_channels, size, size))
        return jax.eval_shape(lambda: self.init(jax.random.key(0), pixels))["params"]


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB image (H, W, 3) uint8 -> the encoder's pixels (3, size, size) float32, as CLIPImageProcessor
    (do_resize shortest_edge, do_center_crop, rescale 1/255, normalize): the same PIL call, so the same bytes."""
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    scaled = int(size * long / short)  # transformers' get_resize_output_image_size: the long side truncated
    new_h, new_w = (size, scaled) if h <= w else (scaled, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2  # transformers' center_crop: the offsets rounded down
    crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
    return ((crop - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)
