"""What a LoRA adapter file says, read the way diffusers (0.42, with PEFT) reads it: which layers it adapts, each
layer's factors, rank and alpha/rank scale. One reader for the API's registry (common/loras.py: a file the worker
cannot apply is refused when a job names it) and the engine (worker/engine/lora.py: it maps the layers onto a
model and loads the factors). It reads the safetensors header and the few `.alpha` scalars, nothing else: no JAX,
no torch.

Key styles, each normalised to one module name per layer (the `stem`: `<part>.<diffusers module>` for diffusers'
layouts, kohya's own `lora_unet_<module>` for kohya's):
- kohya (sd-scripts, A1111, ComfyUI): `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te1_`, `lora_te2_`;
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.` / `text_encoder_2.`;
- diffusers' older styles: `unet.<module>.lora.down.weight` / `.lora.up.weight`, attention processors'
  `unet.<block>.attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`), and the text encoders'
  `text_encoder.<module>.lora_linear_layer.down.weight` (what diffusers' SDXL training scripts write); a text
  encoder module without `text_model.` gets it (transformers' newer flattened CLIPTextModel names).

Alpha, per layer: kohya's `.alpha` scalar; for diffusers' layouts, the PEFT config diffusers writes into the
header's `__metadata__["lora_adapter_metadata"]` (JSON: the fields r, lora_alpha, rank_pattern, alpha_pattern and
use_rslora, each prefixed by its part, as `unet.` + field), resolved as PEFT resolves it: a module's rank and alpha
are the first pattern matching `(.*\\.)?(<pattern>)$` on its name, else `r` / `lora_alpha`, and its scale
alpha/rank (alpha/sqrt(rank) with rsLoRA); without that metadata an `.alpha` scalar, and without either alpha is
the rank (scale 1), diffusers' convention. The metadata's patterns are regular expressions from the file: adapter
files are the operator's (SDXL_LORA_DIR), never a request's.

Which layers an adapter may touch: every Linear of the UNet's transformers (proj_in/out, attn1/attn2's
to_q/k/v/out.0, the feed-forward) and of the text encoders' blocks (q/k/v/out_proj, fc1, fc2). Anything else
(convolutions: LoCon/LoHa; DoRA; biases) is refused here, by name, before a job runs.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAX_HEADER_BYTES = 64 * 1024 * 1024
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# (key suffix, factor), longest first where one ends another
SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# attention processors' names (diffusers' oldest files): UNet, text encoder
PROCESSOR = re.compile(r"\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# the layers adapters may touch, by part, in diffusers' module names and in kohya's
ADAPTABLE = {
    "unet": re.compile(
        r"(^|\.)attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
        r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$"
    ),
    "text": re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"),
}
KOHYA_ADAPTABLE = {
    "unet": re.compile(
        r"_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_(0_proj|2)))$"
    ),
    "text": re.compile(r"_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$"),
}
FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


class AdapterFileError(ValueError):
    """A file that is not a LoRA adapter this service can apply; the message says why."""


@dataclass(frozen=True)
class Layer:
    """One adapted Linear as the file gives it: its factors' keys, rank, and the scale (alpha / rank) to apply."""

    part: str  # unet, text_encoder, text_encoder_2
    stem: str  # the module's normalised name (see the module's docstring)
    down: str  # the key of the down factor (rank, in) (or (rank, in, 1, 1))
    up: str  # the key of the up factor (out, rank)
    rank: int
    alpha: float
    scale: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA


@dataclass(frozen=True)
class Layout:
    layout: str  # "kohya" or "diffusers"
    layers: dict[str, Layer]  # by stem

    @property
    def parts(self) -> list[str]:
        return sorted({layer.part for layer in self.layers.values()})

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())


def header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """A safetensors file's header ({tensor name: {dtype, shape, data_offsets}} and __metadata__), and where its
    data starts."""
    raw = f.read(8)
    if len(raw) != 8:
        raise AdapterFileError("not a safetensors file (shorter than its header)")
    (size,) = struct.unpack("<Q", raw)
    if size > MAX_HEADER_BYTES:
        raise AdapterFileError(f"not a safetensors file (a {size}-byte header)")
    try:
        parsed = json.loads(f.read(size))
    except ValueError:
        raise AdapterFileError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(parsed, dict):
        raise AdapterFileError("not a safetensors file (its header is not an object)")
    return parsed, 8 + size


def _scalar(f: BinaryIO, start: int, entry: dict[str, Any], key: str) -> float:
    """A one-element tensor's value (an `.alpha`), read from the file."""
    dtype, (begin, end) = entry.get("dtype"), entry.get("data_offsets", (0, 0))
    if math.prod(entry.get("shape", ())) != 1:
        raise AdapterFileError(f"{key} is not a single number")
    f.seek(start + begin)
    raw = f.read(end - begin)
    if dtype == "BF16" and len(raw) == 2:  # bfloat16 is float32's upper half
        return float(np.frombuffer(b"\0\0" + raw, "<f4")[0])
    if dtype not in FLOATS or len(raw) != np.dtype(FLOATS[dtype]).itemsize:
        raise AdapterFileError(f"{key} is a {dtype}, not a float")
    return float(np.frombuffer(raw, FLOATS[dtype])[0])


def _split(key: str) -> tuple[str, str, str] | None:
    """A key -> (part, stem, factor), or None when it is not a LoRA factor of a part this service knows."""
    for prefix, part in KOHYA_PARTS.items():
        if key.startswith(prefix):
            for suffix, factor in SUFFIXES:
                if key.endswith(suffix) and suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                    return part, key[: -len(suffix)], factor
            return None
    part, _, module = key.partition(".")
    if part not in PARTS:
        if not key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
            return None
        part, module = "unet", key  # diffusers' oldest UNet files: attention processors without a prefix
    processor = PROCESSOR.search(module)
    if processor is not None:
        names = PROCESSOR_UNET if part == "unet" else PROCESSOR_TEXT
        module, factor = f"{module[: processor.start()]}.{names[processor.group(1)]}", processor.group(2)
    else:
        found = next(((s, f) for s, f in SUFFIXES if module.endswith(s)), None)
        if found is None:
            return None
        module, factor = module[: -len(found[0])], found[1]
    if part != "unet" and not module.startswith("text_model."):
        module = f"text_model.{module}"
    return part, f"{part}.{module}", factor


def _adaptable(part: str, stem: str, kohya: bool) -> bool:
    kind = "unet" if part == "unet" else "text"
    if kohya:
        return KOHYA_ADAPTABLE[kind].search(stem) is not None
    return ADAPTABLE[kind].search(stem.removeprefix(f"{part}.")) is not None


def _pattern(patterns: dict[str, Any], name: str) -> Any:
    """PEFT's get_pattern_key: the value of the first pattern matching the end of `name` at a dot, else None."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
        except re.error:
            raise AdapterFileError(f"its metadata has a pattern that is no regular expression: {pattern!r}") from None
    return None


def _configs(meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The PEFT config of each part from diffusers' metadata (`{part}.{field}`); {} when the file has none."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise AdapterFileError(f"its {METADATA_KEY} metadata is not JSON") from None
    if not isinstance(flat, dict):
        raise AdapterFileError(f"its {METADATA_KEY} metadata is not an object")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        part, _, field = str(key).partition(".")
        if part in PARTS and field:
            out.setdefault(part, {})[field] = value
    for part, config in out.items():
        if config.get("use_dora"):
            raise AdapterFileError(f"DoRA ({part}.use_dora in its metadata) is not supported")
    return out


def _rank_and_alpha(config: dict[str, Any], name: str) -> tuple[float, float, bool]:
    """A module's (rank, alpha, rsLoRA) from a PEFT config, as PEFT's LoraModel resolves them (LoraConfig's
    defaults r=8, lora_alpha=8)."""
    try:
        rank_patterns, alpha_patterns = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    except (TypeError, ValueError):
        raise AdapterFileError(f"its {METADATA_KEY} metadata has a pattern table that is no object") from None
    rank, alpha = _pattern(rank_patterns, name), _pattern(alpha_patterns, name)
    try:
        rank = float(config.get("r", 8) if rank is None else rank)
        alpha = float(config.get("lora_alpha", 8) if alpha is None else alpha)
    except (TypeError, ValueError):
        raise AdapterFileError(f"its {METADATA_KEY} metadata has a rank or alpha that is not a number") from None
    return rank, alpha, bool(config.get("use_rslora"))


def parse(head: dict[str, Any], alpha_of: Any) -> Layout:
    """A header's adapter; alpha_of(key) reads an `.alpha` scalar. AdapterFileError when the service cannot
    apply all of it."""
    meta = head.get("__metadata__") or {}
    tensors = {k: v for k, v in head.items() if k != "__metadata__"}
    groups: dict[str, dict[str, str]] = {}
    part_of: dict[str, str] = {}
    unknown: list[str] = []
    for key in tensors:
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        part, stem, factor = split
        groups.setdefault(stem, {})[factor] = key
        part_of[stem] = part
    dora = [k for k in unknown if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise AdapterFileError(f"DoRA ({len(dora)} magnitude keys, e.g. {dora[0]}) is not supported")
    kohya = {stem.startswith("lora_") for stem in groups}
    if len(kohya) > 1:
        raise AdapterFileError("it mixes kohya and diffusers key names")
    is_kohya = kohya == {True}
    for stem, got in groups.items():
        if not _adaptable(part_of[stem], stem, is_kohya):
            unknown += got.values()
    if unknown:
        conv = [k for k in unknown if re.search(r"(resnets|in_layers|out_layers|emb_layers|conv|skip|\.op\b|_op_)", k)]
        what = "convolution adapters (LoCon/LoHa) are not supported" if conv else "not a layer adapters may touch"
        raise AdapterFileError(f"{len(unknown)} keys it cannot apply ({what}), e.g. {sorted(unknown)[:3]}")
    configs = {} if is_kohya else _configs(meta)
    layers: dict[str, Layer] = {}
    for stem, got in groups.items():
        if "down" not in got or "up" not in got:
            raise AdapterFileError(f"{stem} has no {'up' if 'down' in got else 'down'} factor")
        down, up = tensors[got["down"]].get("shape", []), tensors[got["up"]].get("shape", [])
        if len(down) not in (2, 4) or len(up) not in (2, 4) or down[0] != up[1] or down[0] < 1:
            raise AdapterFileError(f"{stem} has factors of shapes {down} and {up}, not (rank, in) and (out, rank)")
        rank, part = int(down[0]), part_of[stem]
        if part in configs:
            want, alpha, rslora = _rank_and_alpha(configs[part], stem.removeprefix(f"{part}."))
            if want != rank:
                raise AdapterFileError(f"{stem} has rank {rank}; its {METADATA_KEY} metadata says {want:g}")
        else:
            alpha, rslora = (alpha_of(got["alpha"]) if "alpha" in got else float(rank)), False
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        layers[stem] = Layer(part, stem, got["down"], got["up"], rank, alpha, scale)
    if not layers:
        raise AdapterFileError("no LoRA factors (lora_down / lora_A weights) in it")
    return Layout("kohya" if is_kohya else "diffusers", layers)


def read(path: Path) -> Layout:
    """An adapter file's layers (its header and `.alpha` scalars; the factors stay in the file)."""
    with open(path, "rb") as f:
        head, start = header(f)
        return parse(head, lambda key: _scalar(f, start, head[key], key))
