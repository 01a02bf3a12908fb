"""SDXL's text encoders: CLIP ViT-L (transformers' CLIPTextModel) and OpenCLIP ViT-bigG
(CLIPTextModelWithProjection), from a transformers config.json.

A causal transformer over the 77 token ids: token and position embeddings, pre-LayerNorm blocks (self-
attention, then an MLP with quick_gelu for CLIP-L or exact gelu for bigG), a final LayerNorm. SDXL reads
the penultimate block's output (before the final norm) as its context, and from the second encoder the
final, normed state at the end-of-text token through `text_projection` as its pooled embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from worker.engine.layers import Linear, gelu


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    with_projection: bool = False  # CLIPTextModelWithProjection: text_projection and a pooled output
    causal: bool = True  # the text's mask; CLIP's vision tower (clip_vision.py) attends to every patch

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> CLIPConfig:
        if config.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"a text encoder of type {config['model_type']!r} is not a CLIP text model")
        if config.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {config['hidden_act']!r}: expected one of {sorted(ACTIVATIONS)}")
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        values["with_projection"] = "CLIPTextModelWithProjection" in config.get("architectures", [])
        return cls(**values)


ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x), "gelu": gelu}


class SelfAttention(nn.Module):
    """q_proj, k_proj, v_proj, out_proj, all with bias; a causal mask unless `causal` is False."""

    heads: int
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = (split(Linear(d, dtype=self.dtype, name=n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (d // self.heads) ** -0.5
        if self.causal:
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        return Linear(d, dtype=self.dtype, name="out_proj")(out)


class EncoderLayer(nn.Module):
    cfg: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + SelfAttention(cfg.num_attention_heads, self.dtype, cfg.causal, name="self_attn")(norm("layer_norm1")(x))
        h = norm("layer_norm2")(x)
        h = MLP(cfg, self.dtype, name="mlp")(h)
        return x + h


class MLP(nn.Module):
    cfg: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Linear(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return Linear(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[self.cfg.hidden_act](x))


class Embeddings(nn.Module):
    cfg: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(ids.shape[-1])[None])


class Encoder(nn.Module):
    cfg: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(last layer's output, the penultimate layer's)."""
        penultimate = x
        for i in range(self.cfg.num_hidden_layers):
            penultimate = x
            x = EncoderLayer(self.cfg, self.dtype, name=f"layers_{i}")(x)
        return x, penultimate


class TextModel(nn.Module):
    cfg: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids (B, T) -> (penultimate hidden state (B, T, d), final normed state at the end-of-text token (B, d))."""
        cfg = self.cfg
        x = Embeddings(cfg, self.dtype, name="embeddings")(ids)
        last, penultimate = Encoder(cfg, self.dtype, name="encoder")(x)
        last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(last)
        # transformers' rule: configs from before the eos id was set (eos_token_id 2, SDXL's own) take the
        # highest id, which is <|endoftext|> in CLIP's vocabulary; others the first end-of-text token.
        eos = jnp.argmax(ids, axis=-1) if cfg.eos_token_id == 2 else jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return penultimate, pooled


class TextEncoder(nn.Module):
    """What SDXL reads: (context (B, T, d), pooled (B, projection_dim) or None without a projection)."""

    config: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        context, pooled = TextModel(self.config, self.dtype, name="text_model")(ids)
        if not self.config.with_projection:
            return context, None
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")
        return context, projection(pooled)

    def shapes(self) -> Any:
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return jax.eval_shape(lambda: self.init(jax.random.key(0), ids))["params"]
