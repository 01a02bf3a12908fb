"""Reading IP-Adapters: the adapter's .safetensors in diffusers' `load_ip_adapter` layout (ip_adapter.py) and its
image encoder, a transformers CLIPVisionModelWithProjection folder: `image_encoder/` beside the file (diffusers'
default, h94/IP-Adapter's sdxl_models layout), or named after a colon (`ip-adapter_sdxl_vit-h.safetensors:
/models/image_encoder`, the ViT-H encoder from h94's models folder).

An adapter is served with one model: its tokens must be as wide as the UNet's cross-attention, and it must have
a key and value projection for each of the UNet's cross-attentions; ModelError says what does not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker.engine import convert
from worker.engine.clip_vision import VisionConfig, VisionEncoder
from worker.engine.ip_adapter import ImageProjection, IPAdapterConfig, cross_attentions
from worker.engine.model_source import ModelError, convert_component, locate_weights, read_state
from worker.engine.unet import UNetConfig


@dataclass
class IPAdapterModel:
    """An IP-Adapter as an engine serves it: its name (what requests say), config and host parameters:
    {"encoder": VisionEncoder's, "image_proj": ImageProjection's, "layers": {UNet path...: {"attn2":
    {"to_k_ip": {"kernel"}, "to_v_ip": {"kernel"}}}}}, in the model's dtype."""

    name: str
    config: IPAdapterConfig
    params: Any
    source: str


def load(name: str, spec: str | Path, unet: UNetConfig, dtype: Any = jnp.float32) -> IPAdapterModel:
    weights, _, encoder = str(spec).partition(":")
    path = Path(weights)
    folder = Path(encoder) if encoder else path.parent / "image_encoder"
    what = f"IP-Adapter {name!r} ({path})"
    if not path.is_file():
        raise ModelError(f"{what}: no such file")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{what}: no image encoder at {folder} (a CLIPVisionModelWithProjection folder)")
    try:
        vision = VisionConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{what}: {folder}: {exc}") from exc
    state = read_state([path])
    proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    if "proj.weight" not in proj:
        kind = "an IP-Adapter Plus or Face ID (a Resampler)" if proj else "no image_proj"
        raise ModelError(f"{what}: {kind}; only IP-Adapter's ImageProjection (image_proj.proj) is supported")
    tokens, rest = divmod(proj["proj.weight"].shape[0], unet.cross_attention_dim)
    if rest or proj["proj.weight"].shape[1] != vision.projection_dim:
        raise ModelError(
            f"{what}: image_proj.proj is {tuple(proj['proj.weight'].shape)}: not tokens of the UNet's width "
            f"{unet.cross_attention_dim} from the encoder's {vision.projection_dim}-wide embedding"
        )
    config = IPAdapterConfig(vision, unet.cross_attention_dim, tokens)
    embeds = jnp.zeros((1, vision.projection_dim))
    projection = jax.eval_shape(lambda: ImageProjection(config).init(jax.random.key(0), embeds))["params"]
    params = {
        "image_proj": convert.pt_to_flax(proj, convert.flatten(projection), what, dtype),
        "encoder": _encoder(folder, vision, dtype, what),
        "layers": _layers(state, unet, dtype, what),
    }
    return IPAdapterModel(name, config, params, str(path))


def _encoder(folder: Path, vision: VisionConfig, dtype: Any, what: str) -> Any:
    """The encoder's parameters; its class token is a bare tensor (no .weight), placed by hand."""
    files = locate_weights(folder, "model")
    shapes = VisionEncoder(vision).shapes()
    token = shapes["vision_model"]["embeddings"].pop("class_embedding")
    state = read_state(files)
    key = "vision_model.embeddings.class_embedding"
    if key not in state:
        raise ModelError(f"{what}: the image encoder has no {key}")
    cls = state.pop(key)
    state.pop("vision_model.embeddings.position_ids", None)
    params = convert_component("image_encoder", lambda: state, files, shapes, dtype, None, f"{what} encoder").tree()
    if cls.shape != token.shape:
        raise ModelError(f"{what}: {key} is {cls.shape}, the config's {token.shape}")
    params["vision_model"]["embeddings"]["class_embedding"] = np.asarray(cls, dtype)
    return params


def _layers(state: dict[str, np.ndarray], unet: UNetConfig, dtype: Any, what: str) -> dict[str, Any]:
    """ip_adapter.{1, 3, 5, ...}.to_{k,v}_ip.weight, in cross_attentions()' order, as a tree of UNet paths."""
    paths = cross_attentions(unet)
    ids = {int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")}
    if ids != {2 * i + 1 for i in range(len(paths))}:
        raise ModelError(
            f"{what}: {len(ids)} ip_adapter layers for the UNet's {len(paths)} cross-attentions (ids 1, 3, 5, ...)"
        )
    tree: dict[str, Any] = {}
    for i, path in enumerate(paths):
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        for proj in ("to_k_ip", "to_v_ip"):
            weight = state[f"ip_adapter.{2 * i + 1}.{proj}.weight"]  # (inner, cross_attention_dim), no bias
            if weight.shape[1] != unet.cross_attention_dim:
                raise ModelError(f"{what}: ip_adapter.{2 * i + 1}.{proj} takes {weight.shape[1]}-wide tokens")
            node[proj] = {"kernel": np.ascontiguousarray(weight.T, dtype)}
    return tree
