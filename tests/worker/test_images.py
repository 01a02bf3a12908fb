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
