"""Reading ControlNets: a diffusers ControlNetModel folder (config.json and its safetensors, variants such as fp16)
or a single `.safetensors` file in diffusers' layout (how most SDXL ControlNets ship one file), whose config is
read from a config.json beside it or inferred from the tensors. The weights become controlnet.py's parameters
through the same conversion as a model's components (model_source.convert_component).

A ControlNet is served with one model: its text conditioning must be that model's (the pooled width, the
cross-attention width, the time ids), and this checks so by name before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from worker.engine import attention
from worker.engine.controlnet import ControlNet, ControlNetConfig
from worker.engine.model_source import ModelError, convert_component, locate_weights, read_state
from worker.engine.unet import UNetConfig

STEM = "diffusion_pytorch_model"
HEAD_WIDTH = 64  # SDXL's attention heads are 64 wide: what a single file's config is inferred with


@dataclass
class ControlModel:
    """A ControlNet as an engine serves it: its name (what requests say), config and host parameters."""

    name: str
    config: ControlNetConfig
    params: Any  # controlnet.ControlNet's tree, host arrays in the model's dtype
    source: str  # where it was read from (logs)


def load(name: str, spec: str | Path, unet: UNetConfig, dtype: Any = jnp.float32, variant: str = "") -> ControlModel:
    """`spec`: a diffusers ControlNetModel folder or a single .safetensors file; unet: the served model's UNet
    config, whose conditioning the ControlNet must share. ModelError says what does not fit."""
    path = Path(spec)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise ModelError(f"ControlNet {name!r}: {path} is not a diffusers ControlNetModel folder (no config.json)")
        raw = json.loads(config_path.read_text())
        files = locate_weights(path, STEM, variant)
    elif path.is_file():
        files = [path]
        beside = path.with_name("config.json")
        raw = json.loads(beside.read_text()) if beside.exists() else infer_config(read_state(files), unet)
    else:
        raise ModelError(f"ControlNet {name!r}: no such file or folder {path}")
    try:
        config = ControlNetConfig.from_diffusers(raw, unet.pooled_width)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"ControlNet {name!r} ({path}): not an SDXL ControlNet: {exc}") from exc
    _check_fits(name, config, unet)
    shapes = ControlNet(config, attention.einsum).shapes()
    params = convert_component(
        "controlnet", lambda: read_state(files), files, shapes, dtype, None, f"ControlNet {name!r} ({path})"
    ).tree()
    return ControlModel(name, config, params, str(path))


def _check_fits(name: str, config: ControlNetConfig, unet: UNetConfig) -> None:
    c = config.unet
    # a ControlNet sees the sample alone (an inpainting UNet's extra channels are not its input)
    theirs = (c.in_channels, c.cross_attention_dim, c.time_ids, c.pooled_width, c.block_out_channels)
    ours = (unet.out_channels, unet.cross_attention_dim, unet.time_ids, unet.pooled_width, unet.block_out_channels)
    if theirs != ours:
        raise ModelError(
            f"ControlNet {name!r} is for another model: (latent channels, text width, time ids, pooled width, widths) "
            f"{theirs}, the served UNet's {ours}"
        )


def infer_config(state: dict[str, Any], unet: UNetConfig) -> dict[str, Any]:
    """A diffusers-layout ControlNet's config.json from its tensors' names and shapes. What the tensors do not say
    (the heads, the time ids' embedding width) is the served UNet's, whose encoder a ControlNet copies; heads 64
    wide (SDXL's) where the widths differ from it. ModelError for another layout."""
    if "controlnet_cond_embedding.conv_in.weight" not in state:
        raise ModelError(
            "a single-file ControlNet must be in diffusers' layout (controlnet_cond_embedding.*, down_blocks.*); "
            "give a diffusers folder or a config.json beside the file"
        )
    shape = lambda key: tuple(state[key].shape)  # noqa: E731
    levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down_blocks."))
    widths = [shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down_blocks.0.resnets."))
    kinds, depths = [], []
    for i in range(levels):
        blocks = {int(k.split(".")[5]) for k in state if k.startswith(f"down_blocks.{i}.attentions.0.transformer_")}
        kinds.append("CrossAttnDownBlock2D" if blocks else "DownBlock2D")
        depths.append(max(blocks) + 1 if blocks else 1)
    embedding = [shape("controlnet_cond_embedding.conv_in.weight")[0]]
    embedding += [
        shape(f"controlnet_cond_embedding.blocks.{j}.weight")[0]
        for j in range(1, 2 * levels + 8, 2)
        if f"controlnet_cond_embedding.blocks.{j}.weight" in state
    ]
    text = next(shape(k)[1] for k in sorted(state) if k.endswith("attn2.to_k.weight"))
    heads = [w // HEAD_WIDTH for w in widths]
    add_in = shape("add_embedding.linear_1.weight")[1]
    return {
        "in_channels": shape("conv_in.weight")[1],
        "conditioning_channels": shape("controlnet_cond_embedding.conv_in.weight")[1],
        "conditioning_embedding_out_channels": embedding,
        "down_block_types": kinds,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "attention_head_dim": list(unet.heads) if tuple(widths) == unet.block_out_channels else heads,
        "transformer_layers_per_block": depths,
        "cross_attention_dim": text,
        "use_linear_projection": len(shape(_first(state, "proj_in.weight"))) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": unet.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": add_in,
    }


def _first(state: dict[str, Any], suffix: str) -> str:
    return next(k for k in sorted(state) if k.endswith(suffix))
