"""PyTorch-layout state dicts <-> our Flax parameter trees, on numpy arrays only (torch is never imported).

The target layout comes from the modules' `shapes()` (jax.eval_shape: no memory), and each tensor is
renamed and transposed on its own, into one copy.

Naming (worker/engine/layers.py): our modules carry PyTorch's attribute names, a list's index joined by "_".
- `down_blocks.0.resnets.1.conv1.weight` -> ("down_blocks_0", "resnets_1", "conv1", "kernel")
- Linear `weight` (out, in) -> `kernel` (in, out); Conv `weight` (O, I, kh, kw) -> `kernel` (kh, kw, I, O);
  norms' `weight` -> `scale`; embeddings' `weight` -> `embedding`; `bias` unchanged.
- Old diffusers VAE files name the mid-block attention query/key/value/proj_attn (before diffusers 0.14):
  renamed to to_q/to_k/to_v/to_out.0 (`legacy_vae_names`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

FlatTree = dict[tuple[str, ...], Any]

# PyTorch ModuleList attributes: `name.N` in PyTorch is `name_N` here. (The reverse needs the list: names
# such as `linear_1` are attributes, not list items.)
_MODULE_LISTS = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "to_out",
    "net",
    "layers",
    "controlnet_down_blocks",  # a ControlNet's zero convolutions
    "blocks",  # a ControlNet's conditioning embedding
    "conv",  # TAESD's residual blocks (an nn.Sequential of convs and activations: taesd.py)
)
_LEGACY_VAE = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> FlatTree:
    out: FlatTree = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def unflatten(flat: FlatTree) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def module_path(pt_module: str) -> tuple[str, ...]:
    """`down_blocks.0.resnets.1.conv1` -> ("down_blocks_0", "resnets_1", "conv1")."""
    parts = pt_module.split(".")
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def pt_module(path: tuple[str, ...]) -> str:
    """The inverse of module_path: ("down_blocks_0", "resnets_1", "conv1") -> `down_blocks.0.resnets.1.conv1`."""
    lists = "|".join(_MODULE_LISTS)
    return ".".join(re.sub(rf"^({lists})_(\d+)$", r"\1.\2", m) for m in path)


def legacy_vae_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An old diffusers VAE's attention names (query, key, value, proj_attn) as today's."""
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        head, _, last = module.rpartition(".")
        if last in _LEGACY_VAE and ".attentions." in key:
            key = f"{head}.{_LEGACY_VAE[last]}.{leaf}"
        out[key] = value
    return out


def match(state: Mapping[str, np.ndarray], target: FlatTree, what: str) -> FlatTree:
    """Each parameter of `target` (a flat tree of shapes) with the checkpoint tensor that fills it, as a view
    in our layout (nothing copied). Every key must have a home and every parameter be filled: otherwise a
    ValueError naming a few of each."""
    out: FlatTree = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for pt_key, tensor in state.items():
        module, leaf = pt_key.rsplit(".", 1)
        path = module_path(module)
        if leaf == "bias":
            options = [((*path, "bias"), tensor)]
        elif leaf == "weight":
            options = [
                ((*path, "kernel"), tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T),
                ((*path, "scale"), tensor),
                ((*path, "embedding"), tensor),
            ]
        else:
            options = []
        present = [(key, value) for key, value in options if key in target]
        if not present:
            if not pt_key.endswith("position_ids"):  # a buffer, not a weight
                unexpected.append(pt_key)
            continue
        key, value = present[0]
        want = tuple(target[key].shape)
        if value.shape == want:
            out[key] = value  # a view: laid out and cast below, in one copy
        elif value.size == int(np.prod(want)) and key[-1] == "kernel" and tensor.ndim == 4 and len(want) == 2:
            out[key] = tensor.reshape(tensor.shape[:2]).T  # a 1x1 conv where we have a Linear
        else:
            pt_want = (
                tuple(want[i] for i in (3, 2, 0, 1)) if len(want) == 4 else want[::-1] if key[-1] == "kernel" else want
            )
            wrong_shape.append(f"{pt_key} {tuple(tensor.shape)}, the config's {pt_want}")
    missing = sorted(".".join(k) for k in target if k not in out)
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"{what}: the checkpoint does not match the model config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong_shape)} of another shape "
            f"(e.g. {wrong_shape[:3]})"
        )
    return out


def pt_to_flax(state: Mapping[str, np.ndarray], target: FlatTree, what: str, dtype: Any = None) -> dict[str, Any]:
    """Convert a PyTorch-layout state dict into the tree whose leaves' shapes `target` gives, cast to `dtype`
    (default: as stored): match(), then one laid-out copy per tensor."""
    return unflatten(lay_out(match(state, target, what), dtype))


def lay_out(views: Mapping[Any, np.ndarray], dtype: Any = None) -> dict[Any, np.ndarray]:
    """Each view copied C-contiguous (contiguous) and cast to `dtype` (default: its own). One copy per tensor;
    numpy releases the GIL while copying, so threads spread it over the host's cores (gigabytes for SDXL:
    most of a converting start's model load)."""
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        laid_out = pool.map(lambda v: contiguous(v, dtype or v.dtype), views.values())
        return dict(zip(views.keys(), laid_out, strict=True))


TILE = 128  # elements: a 128x128 tile of either side stays in a core's L2 while it is transposed


def contiguous(view: np.ndarray, dtype: Any) -> np.ndarray:
    """A C-contiguous copy of `view` cast to `dtype`. A transposed view is copied tile by tile: copied whole,
    numpy walks the source a whole row apart per element and misses the cache on each. A conv kernel's tile
    takes every tap at once, so each source cache line (which holds all taps of an input/output pair) is
    read once. bench/convert.py: 2-3x faster for SDXL's large kernels."""
    out = aligned_empty(view.shape, dtype)
    if view.ndim < 2 or view.flags.c_contiguous or view.strides[-1] == view.itemsize:
        out[...] = view
        return out
    rows, cols = view.shape[-2:]
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            out[..., i : i + TILE, j : j + TILE] = view[..., i : i + TILE, j : j + TILE]
    return out


ALIGN = 64  # bytes: a CPU device takes an array this aligned as its own storage (jax.device_put copies no bytes)


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.empty whose data starts on an ALIGN-byte boundary. On a CPU, placing a converted array then copies
    nothing: the device's buffer is this array, so the host never holds the weights twice, and nothing is freed
    back to a heap that keeps it (numpy's own arrays are 16-byte aligned: JAX copies them)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.empty(count * dtype.itemsize + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + count * dtype.itemsize].view(dtype).reshape(shape)


def flax_to_pt(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse, used to write PyTorch-layout safetensors of test and benchmark models."""
    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        value = np.asarray(value)
        *module, leaf = path
        name = pt_module(tuple(module))
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[f"{name}.{'bias' if leaf == 'bias' else 'weight'}"] = value  # a view, laid out below
    return lay_out(out)
