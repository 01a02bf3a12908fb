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
from collections.abc import Iterable
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


NAMES = {np.dtype(v): k for k, v in DTYPES.items()}  # numpy dtype -> the format's name


def layout(
    entries: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """A file's head (the length and the JSON header, padded with spaces to 8 bytes as safetensors pads it) and
    each tensor's byte offset in the file, from names, dtypes and shapes alone: the data can then be written a
    tensor at a time, in any order (weight_cache.Writer). Tensors lie in name order, back to back."""
    header: dict[str, object] = {"__metadata__": metadata}
    begin = 0
    for name in sorted(entries):
        dtype, shape = entries[name]
        end = begin + math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, {name: len(head) + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}


def release(arrays: Iterable[np.ndarray]) -> None:
    """Take the pages under `arrays` (views on read()'s memory maps) out of this process's resident memory.
    The data stays in the page cache and a later read of the views maps it back, so this is only ever a
    saving: once a group of weights has been copied (converted, or placed on the devices), its mapped pages
    need not count against the process (SDXL's UNet: 5 GB of them). Arrays not on a map are skipped."""
    page = mmap.PAGESIZE
    for array in arrays:
        mapped = _mapping(array)
        if mapped is None or not hasattr(mapped, "madvise") or array.size == 0:
            continue
        start = np.frombuffer(mapped, np.uint8, count=1).ctypes.data  # the map's address
        low, high = np.lib.array_utils.byte_bounds(array)
        begin = (low - start) // page * page  # whole pages, rounded outward: a neighbour's page refaults at worst
        end = min(len(mapped), -(-(high - start) // page) * page)
        if 0 <= begin < end:
            mapped.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer's base: a view of the map
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None
