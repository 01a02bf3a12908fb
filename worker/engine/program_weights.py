"""The weights as the program takes them, made from a model's weights in the checkpoint's layout.

A model keeps the checkpoint's layout (one parameter per checkpoint tensor: convert.py's naming rule, the
converted-weights cache, the adapter bank's targets and the single-file tables all read it). The program's UNet
(layers.Projections) computes some projections otherwise, and this module lays the weights out to match, once,
when an engine places a model on its devices (Engine.place):

- fused: each self-attention's to_q, to_k and to_v become one `to_qkv` (kernels side by side, (in, 3 * inner)),
  each cross-attention's to_k and to_v one `to_kv`: one matmul reads the activation once instead of three
  times. The rows' LoRA factors for those layers are grouped the same way (fuse_adapters) and still applied
  per projection, so the result is the unfused layers' side by side.
- fp8: the UNet's transformer linear layers and ResNet 1x1 convolutions as e4m3fn kernels with float32
  per-output-channel scales (fp8.quantize_weight); a cross-attention's to_k/to_v/to_kv stay in the model's
  dtype (they project the text, once per batch).

Everything here is jnp on trees, so the same function makes the weights on the devices (under jit) and their
shapes for lowering an executable (jax.eval_shape).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from worker.engine import fp8
from worker.engine.layers import Projections
from worker.engine.model_source import Quantize

# attention module name -> (the fused layer's name, the layers it replaces, in order)
FUSED = {"attn1": ("to_qkv", ("to_q", "to_k", "to_v")), "attn2": ("to_kv", ("to_k", "to_v"))}
TEXT_PROJECTIONS = ("to_k", "to_v", "to_kv")  # a cross-attention's (attn2) layers that read the text


def form(model: Any, light_step: bool) -> Projections:
    """The program's UNet form for a model (model.Model) and an engine's step: fused with the lighter step,
    FP8 when the model is served quantized."""
    return Projections(fused=light_step, fp8=model.quantize is Quantize.fp8)


def prepare(params: Mapping[str, Any], projections: Projections) -> dict[str, Any]:
    """A model's weights (component -> tree, the checkpoint's layout) in the program's form; the components
    other than the UNet as they are."""
    out = dict(params)
    if projections == Projections() or "unet" not in params:
        return out
    unet = params["unet"]
    if projections.fused:
        unet = _fuse(unet, _join_weights)
    if projections.fp8:
        unet = _quantize(unet, ())
    out["unet"] = unet
    return out


def shapes(params: Mapping[str, Any], projections: Projections) -> Any:
    """prepare's result as jax.ShapeDtypeStruct, from a model's weights or their shapes."""
    return jax.eval_shape(lambda p: prepare(p, projections), params)


def fuse_adapters(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The UNet's "lora" collection (lora.variables) for fused projections: a fused layer's node holds its
    parts' `down` and `up` as tuples, in the parts' order, with the rows' slots and scales (layers.Linear)."""
    return _fuse(tree, _join_adapters)


def quantized(path: Sequence[str]) -> bool:
    """Whether the UNet layer at `path` (module names) runs in FP8: a transformer's linear layers (proj_in/out,
    the attentions' projections but the text's, the feed-forward) and the ResNets' 1x1 convolutions."""
    if path and path[-1] == "conv_shortcut":
        return True
    in_transformer = any(name.startswith("attentions_") for name in path)
    return in_transformer and not (len(path) >= 2 and path[-2] == "attn2" and path[-1] in TEXT_PROJECTIONS)


def _fuse(tree: Mapping[str, Any], join: Callable[[list[Any]], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in tree.items():
        if isinstance(node, Mapping):
            node = _fuse(node, join)
            if name in FUSED:
                fused, parts = FUSED[name]
                present = [p for p in parts if p in node]
                if present and len(present) != len(parts):
                    raise ValueError(f"{name} has {present} of {list(parts)}: projections fuse all together or none")
                if present:
                    node = {k: v for k, v in node.items() if k not in parts} | {fused: join([node[p] for p in parts])}
        out[name] = node
    return out


def _join_weights(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Linear layers of one input -> one: kernels (in, out_i) side by side, biases likewise."""
    out = {"kernel": jnp.concatenate([layer["kernel"] for layer in layers], axis=-1)}
    if any("bias" in layer for layer in layers):
        out["bias"] = jnp.concatenate([layer["bias"] for layer in layers], axis=-1)
    return out


def _join_adapters(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "down": tuple(layer["down"] for layer in layers),
        "up": tuple(layer["up"] for layer in layers),
        "slots": layers[0]["slots"],
        "scales": layers[0]["scales"],
    }


def _quantize(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in tree.items():
        out[name] = _quantize(node, (*path, name)) if isinstance(node, Mapping) else node
    if "kernel" in out and not isinstance(out["kernel"], Mapping) and quantized(path):
        out["kernel"], out["kernel_scale"] = fp8.quantize_weight(out["kernel"])
    return out
