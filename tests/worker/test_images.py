import io

import numpy as np
import pytest
from PIL import Image

from worker import images


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_decode_to_the_right_size(fmt, pil):
    pixels = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    data = images.encode(pixels, fmt, {"seed": 1})
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == pil and im.size == (80, 48)
        if fmt == "png":  # lossless
            assert np.array_equal(np.asarray(im), pixels)


def test_png_carries_the_parameters():
    params = {"prompt": "a cat", "seed": 7, "steps": 20, "scheduler": "euler"}
    data = images.encode(np.zeros((8, 8, 3), np.uint8), "png", params)
    assert images.read_parameters(data) == params


@pytest.mark.parametrize("shape", [(1024, 1024, 3), (48, 80, 3), (7, 5, 3), (1, 1, 3), (3, 2, 3)])
def test_our_png_decodes_exactly(shape):
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-3, 4, shape), axis=0).astype(np.uint8)  # wraps: every filter delta occurs
    for pixels in (smooth, rng.integers(0, 256, shape, dtype=np.uint8)):
        data = images.encode(pixels, "png", {"seed": 1})
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # checks every CRC and the zlib stream's Adler-32
            assert im.mode == "RGB" and im.size == (shape[1], shape[0])
            assert np.array_equal(np.asarray(im), pixels)


def test_png_parameters_keep_non_latin_text():
    params = {"prompt": "富士山の夕焼け, café, 🦊"}
    assert images.read_parameters(images.encode(np.zeros((4, 4, 3), np.uint8), "png", params)) == params


def test_png_chunks_and_zlib_stream_are_strictly_valid():
    import struct
    import zlib

    data = images.encode(np.random.default_rng(2).integers(0, 256, (33, 17, 3), dtype=np.uint8), "png", {"a": "b"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert len(zlib.decompress(idat)) == 33 * (17 * 3 + 1)  # zlib checks the Adler-32 itself
