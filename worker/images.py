"""Encoding images for upload: PNG (with the generation parameters in a text chunk), JPEG or WebP.

PNG is written here rather than by Pillow: every row gets the "Up" filter (a vectorised numpy
subtraction) and the rows are deflated in parallel slices, joined by full flushes into one valid zlib
stream. At 1024x1024 that is ~60 ms against Pillow's ~210 ms at its fastest level, for the same size on
the benchmark images (Pillow picks a filter per row, which can make real photographs ~10% smaller). The
encoder sits on every job's latency path and on the host's CPU budget, so the trade is worth it.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PARAMETERS_KEY = "sdxl-parameters"  # PNG iTXt key holding the JSON that reproduces the image
PNG_SLICES = 4  # deflate slices per image, compressed in parallel (zlib releases the GIL)
PNG_LEVEL = 3  # zlib level: 1-3 are the fast strategy; 3 was fastest and smallest on 1024x1024 here
_deflaters = ThreadPoolExecutor(PNG_SLICES, thread_name_prefix="deflate")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, text: dict[str, str]) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes, 8-bit RGB, with each text entry as a UTF-8 iTXt chunk."""
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
        z = zlib.compressobj(PNG_LEVEL, zlib.DEFLATED, -15)  # raw deflate: the zlib wrapper is added once
        last = i == PNG_SLICES - 1
        return z.compress(raw[cuts[i] : cuts[i + 1]]) + z.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)

    stream = b"\x78\x01" + b"".join(_deflaters.map(deflate, range(PNG_SLICES))) + struct.pack(">I", zlib.adler32(raw))
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
