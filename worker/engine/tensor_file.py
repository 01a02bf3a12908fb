"""Reading .safetensors files as numpy views on a memory map of the file.

`safetensors.numpy.load_file` copies every tensor out of the file into new arrays, and the conversion to
Flax's layout then copies each again: for SDXL's UNet that is 5 GB (fp16) read, held and copied twice. Here
the arrays are views on the page cache, so the layout copy is the only one and the file's bytes are never
held twice. numpy's loader also has no bfloat16; ml_dtypes gives it one, so BF16 checkpoints load too.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data, offsets
counted from its start.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


class TensorFileError(ValueError):
    """A file that is not a readable safetensors file; the message names it and what is wrong."""


def read(path: Path) -> dict[str, np.ndarray]:
    """Every tensor in the file, as read-only arrays backed by one memory map (kept open by the arrays)."""
    return read_with_metadata(path)[0]


def read_with_metadata(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """read(), and the file's `__metadata__` (strings; empty when there is none)."""
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise TensorFileError(f"{path}: not a safetensors file ({exc})") from exc
    if hasattr(mapped, "madvise"):  # read ahead the whole file now: the copies then rarely wait on the disk
        mapped.madvise(mmap.MADV_WILLNEED)
    size = len(mapped)
    if size < 8:
        raise TensorFileError(f"{path}: not a safetensors file ({size} bytes)")
    (header_bytes,) = struct.unpack("<Q", mapped[:8])
    if header_bytes > min(MAX_HEADER_BYTES, size - 8):
        raise TensorFileError(
            f"{path}: not a safetensors file, or truncated or corrupt (a header of {header_bytes} bytes in {size})"
        )
    try:
        header = json.loads(mapped[8 : 8 + header_bytes])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    base = 8 + header_bytes
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{path}: __metadata__ is not a mapping of strings")
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TensorFileError(f"{path}: tensor {name!r} has an unreadable entry {info!r}") from exc
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or begin < 0 or base + end > size:
            raise TensorFileError(
                f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit bytes {begin}-{end} "
                f"of {size - base}: the file is truncated or corrupt"
            )
        tensors[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    return tensors, metadata
