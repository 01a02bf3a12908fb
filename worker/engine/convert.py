"""PyTorch-layout state dicts <-> Flax parameter trees, on numpy arrays only (torch is never imported).

diffusers' own `convert_pytorch_state_dict_to_flax` wants torch tensors and first materialises a random
init of the whole model (about 10 GB in float32 for the SDXL UNet). Here the target layout comes from
`jax.eval_shape` (shapes only, no memory), and each tensor is renamed and transposed on its own.

Naming rules (diffusers and transformers, 0.39 / 4.57):
- Linear `weight` (out, in) -> `kernel` (in, out); Conv `weight` (O, I, kh, kw) -> `kernel` (kh, kw, I, O);
  norms' `weight` -> `scale`; embeddings' `weight` -> `embedding`; `bias` unchanged.
- diffusers Flax names list items `down_blocks_0`, transformers Flax names them `layers` / `0`.
- diffusers' Flax VAE attention calls its projections query/key/value/proj_attn where PyTorch has
  to_q/to_k/to_v/to_out.0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

FlatTree = dict[tuple[str, ...], Any]

# PyTorch ModuleList attributes in diffusers' UNet and VAE: `name.N` in PyTorch is `name_N` in Flax.
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
)
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTENTION_BACK = {v: k for k, v in _VAE_ATTENTION.items()}


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


def _candidate_paths(pt_key: str) -> list[tuple[str, ...]]:
    """Flax module paths a PyTorch module path may map to (diffusers style first, then transformers)."""
    parts = pt_key.split(".")
    diffusers_style: list[str] = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i + 1].isdigit() and not parts[i].isdigit():
            diffusers_style.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            diffusers_style.append(parts[i])
            i += 1
    found = [tuple(diffusers_style), tuple(parts)]
    # VAE attention renames: `...to_out_0` / `...to_q` -> `proj_attn` / `query`
    last = diffusers_style[-1]
    back = _VAE_ATTENTION_BACK.get("to_out.0" if last == "to_out_0" else last)
    if back:
        found.insert(0, (*tuple(diffusers_style[:-1]), back))
    return found


def pt_to_flax(state: Mapping[str, np.ndarray], target: FlatTree, what: str, dtype: Any = None) -> dict[str, Any]:
    """Convert a PyTorch-layout state dict into the Flax tree whose leaves' shapes `target` gives, cast to
    `dtype` (default: as stored)."""
    out: FlatTree = {}
    unexpected: list[str] = []
    for pt_key, tensor in state.items():
        module, leaf = pt_key.rsplit(".", 1)
        placed = False
        for path in _candidate_paths(module):
            if leaf == "bias" and (*path, "bias") in target:
                options = [((*path, "bias"), tensor)]
            elif leaf in ("weight", "gamma"):
                options = [
                    ((*path, "kernel"), tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T),
                    ((*path, "scale"), tensor),
                    ((*path, "embedding"), tensor),
                ]
            else:
                options = []
            for flax_key, value in options:
                if flax_key in target and tuple(target[flax_key].shape) == value.shape:
                    out[flax_key] = value  # a view: laid out and cast below, in one copy
                    placed = True
                    break
            if placed:
                break
        if not placed and not pt_key.endswith("position_ids"):  # a buffer, not a weight
            unexpected.append(pt_key)
    missing = sorted(".".join(k) for k in target if k not in out)
    if unexpected or missing:
        raise ValueError(
            f"{what}: the checkpoint does not match the model config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return unflatten(lay_out(out, dtype))


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
    if view.ndim < 2 or view.flags.c_contiguous or view.strides[-1] == view.itemsize:
        return np.array(view, dtype=dtype, order="C")
    out = np.empty(view.shape, dtype)
    rows, cols = view.shape[-2:]
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            out[..., i : i + TILE, j : j + TILE] = view[..., i : i + TILE, j : j + TILE]
    return out


def flax_to_pt(params: Mapping[str, Any], style: str) -> dict[str, np.ndarray]:
    """The inverse, used to write PyTorch-layout safetensors of the tiny model. style: diffusers|transformers."""
    out: dict[str, np.ndarray] = {}
    lists = "|".join(_MODULE_LISTS)
    for path, value in flatten(params).items():
        value = np.asarray(value)
        *module, leaf = path
        if style == "diffusers":
            if module and module[-1] in _VAE_ATTENTION:
                module = [*module[:-1], _VAE_ATTENTION[module[-1]]]
            name = ".".join(re.sub(rf"^({lists})_(\d+)$", r"\1.\2", m) for m in module)
        else:
            name = ".".join(module)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[f"{name}.{'bias' if leaf == 'bias' else 'weight'}"] = value  # a view, laid out below
    return lay_out(out)
