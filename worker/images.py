"""Encoding images for upload: PNG (with the generation parameters in a text chunk), JPEG or WebP.

PNG is written here rather than by Pillow: every row gets the "Up" filter (a vectorised numpy
subtraction) and the rows are deflated in parallel slices by ISA-L (Intel's deflate, the `isal` wheel),
joined by full flushes into one valid zlib stream. Pillow picks a filter per row, which can make real
photographs ~10% smaller, but the encoder sits on every job's latency path and on the host's CPU budget:
bench/images.py measures it against Pillow and against the same encoder with zlib (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
from isal import isal_zlib
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PARAMETERS_KEY = "sdxl-parameters"  # PNG iTXt key holding the JSON that reproduces the image
PNG_SLICES = 4  # deflate slices per image, compressed in parallel (ISA-L and zlib release the GIL)
PNG_LEVEL = 1  # ISA-L's levels are 0-3; on 1024x1024 here 1 was the fastest, and within 0.1% of the smallest
_deflaters = ThreadPoolExecutor(PNG_SLICES, thread_name_prefix="deflate")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(
    pixels: np.ndarray, text: dict[str, str], codec: ModuleType = isal_zlib, level: int = PNG_LEVEL
) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes, 8-bit RGB, with each text entry as a UTF-8 iTXt chunk. `codec`: a module
    with zlib's compressobj and adler32 (bench/images.py passes zlib itself, to compare)."""
    h, w, _ = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), np.uint8)  # one filter-type byte, then the row
    filtered[0, 0] = 0  # None: the first row has nothing above it
    filtered[0, 1:] = rows[0]
    filtered[1:, 0] = 2  # Up: the byte minus the one above, mod 256 (uint8 arithmetic wraps)
    filtered[1:, 1:] = rows[1:] - rows[:-1]
    raw = filtered.tobytes()
    cuts = [round(i * h / PNG_SLICES) * (w * 3 + 1) for i in range(PNG_SLICES + 1)]

    def deflate(i: int) -> bytes:
        z = codec.compressobj(level, codec.DEFLATED, -15)  # raw deflate: the zlib wrapper is added once
        last = i == PNG_SLICES - 1
        return z.compress(raw[cuts[i] : cuts[i + 1]]) + z.flush(codec.Z_FINISH if last else codec.Z_FULL_FLUSH)

    body = b"".join(_deflaters.map(deflate, range(PNG_SLICES)))
    stream = b"\x78\x01" + body + struct.pack(">I", codec.adler32(raw))
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in text.items():  # iTXt: keyword, no compression, no language, UTF-8 text
        chunks.append(_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode()))
    chunks += [_chunk(b"IDAT", stream), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def encode(pixels: np.ndarray, fmt: str, parameters: dict[str, Any]) -> bytes:
    """pixels (H, W, 3) uint8 -> file bytes."""
    if fmt == "png":
        return encode_png(pixels, {PARAMETERS_KEY: json.dumps(parameters, sort_keys=True, ensure_ascii=False)})
    image = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=92, comment=json.dumps(parameters).encode())
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=92)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


def read_parameters(data: bytes) -> dict[str, Any]:
    """The parameters stored in a PNG made by `encode`."""
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[PARAMETERS_KEY])  # type: ignore[attr-defined]
