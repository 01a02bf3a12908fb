"""The image-prompt adapter (IP-Adapter: `ip-adapter_sdxl`, `ip-adapter_sdxl_vit-h`): an image's CLIP embedding
as a few extra tokens that every cross-attention of the UNet attends to beside the text, through the adapter's
own key and value projections.

    embeds = clip_vision.VisionEncoder(encoder)(pixels)            # (B, projection_dim)
    tokens = ImageProjection(config)(embeds)                        # (B, 4, cross_attention_dim): proj, LayerNorm
    per cross-attention: out = attend(q, k_text, v_text) + scale * attend(q, to_k_ip(tokens), to_v_ip(tokens))

as diffusers' IPAdapterAttnProcessor2_0 (before to_out). The unconditional row of classifier-free guidance gets
the tokens of a zero embedding (diffusers' encode_image: zeros_like), not none, and the same scale.

The scale is folded into the values (attention is linear in v), and the keys and values are made once per batch
with the text's (unet.text_keys_values, the "text" collection: `ip_k`, `ip_v` (adapters, rows, 4, inner) beside
each attn2's `k`, `v`), so rows with another adapter, or none (scale 0: values zero, a term exactly 0), share
one batch and one compiled program.

The weights are diffusers' `load_ip_adapter` layout, one .safetensors: `image_proj.proj.{weight,bias}`,
`image_proj.norm.{weight,bias}`, and `ip_adapter.{id}.to_{k,v}_ip.weight` where id 1, 3, 5, ... numbers the
UNet's cross-attentions in diffusers' module order (down blocks, up blocks, mid block: cross_attentions()).
The IP-Adapter Plus variants (a Resampler over the encoder's hidden states) are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from worker.engine.clip_vision import VisionConfig, VisionEncoder
from worker.engine.unet import UNetConfig

TOKENS = 4  # IP-Adapter's image tokens (diffusers' num_image_text_embeds for a `proj.weight` adapter)


@dataclass(frozen=True)
class IPAdapterConfig:
    encoder: VisionConfig
    cross_attention_dim: int  # the UNet's: the tokens' width
    tokens: int = TOKENS


class ImageProjection(nn.Module):
    """diffusers' ImageProjection (`image_proj`: proj, then norm per token): (B, embed) -> (B, tokens, width)."""

    config: IPAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.tokens * cfg.cross_attention_dim, dtype=self.dtype, name="proj")(embeds.astype(self.dtype))
        x = x.reshape(x.shape[0], cfg.tokens, cfg.cross_attention_dim)
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)


def cross_attentions(unet: UNetConfig) -> list[tuple[str, ...]]:
    """The UNet's cross-attentions (paths of its parameter tree down to `attn2`) in diffusers' module order,
    which numbers an IP-Adapter's layers: down blocks, then up blocks, then the mid block."""
    out: list[tuple[str, ...]] = []
    depths, up_depths = unet.transformer_layers_per_block, unet.transformer_layers_per_block[::-1]

    def block(name: str, layers: int, depth: int) -> None:
        for j in range(layers):
            out.extend((name, f"attentions_{j}", f"transformer_blocks_{k}", "attn2") for k in range(depth))

    for i, kind in enumerate(unet.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            block(f"down_blocks_{i}", unet.layers_per_block, depths[i])
    for i, kind in enumerate(unet.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            block(f"up_blocks_{i}", unet.layers_per_block + 1, up_depths[i])
    block("mid_block", 1, depths[-1])
    return out


def image_tokens(config: IPAdapterConfig, params: Mapping[str, Any], pixels: jax.Array, dtype: Any) -> jax.Array:
    """pixels (B, 3, S, S) (clip_vision.preprocess) -> (conditional tokens, unconditional tokens), each
    (B, tokens, width): the image's embedding and a zero embedding through image_proj."""
    embeds = VisionEncoder(config.encoder, dtype).apply({"params": params["encoder"]}, pixels)
    project = ImageProjection(config, dtype)
    variables = {"params": params["image_proj"]}
    return project.apply(variables, embeds), project.apply(variables, jnp.zeros_like(embeds))


def keys_values(layers: Mapping[str, Any], tokens: jax.Array, scales: jax.Array, dtype: Any) -> dict[str, Any]:
    """One adapter's keys and values of `tokens` (n, tokens, width) at every cross-attention, values times each
    row's scale (n,). layers: the adapter's {path...: {"attn2": {"to_k_ip": {"kernel"}, "to_v_ip": ...}}} ->
    the same paths down to each attn2: {"ip_k": (n, tokens, inner), "ip_v": ...}."""
    tokens = tokens.astype(dtype)
    scale = scales.astype(dtype)[:, None, None]

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        if "to_k_ip" in node:
            k = tokens @ node["to_k_ip"]["kernel"].astype(dtype)
            return {"ip_k": k, "ip_v": (tokens @ node["to_v_ip"]["kernel"].astype(dtype)) * scale}
        return {name: walk(child) for name, child in node.items()}

    return walk(layers)


def merge(text: Mapping[str, Any], adapters: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The "text" collection (unet.text_keys_values) with every adapter's keys and values beside each attn2's,
    stacked on a leading axis: {"k", "v", "ip_k": (adapters, n, tokens, inner), "ip_v"}."""
    if "k" in text:
        return dict(text) | {
            "ip_k": jnp.stack([a["ip_k"] for a in adapters]),
            "ip_v": jnp.stack([a["ip_v"] for a in adapters]),
        }
    return {name: merge(node, [a[name] for a in adapters]) for name, node in text.items()}
