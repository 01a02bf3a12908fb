"""Previews (worker/loop/preview.py): the engine's drawing of a row as a small WebP data URL, when one is due (the
drawing itself: tests/worker/engine/test_previews.py and test_taesd.py)."""

import base64
import io

import numpy as np
from PIL import Image

from worker.loop import preview


def decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/webp;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "WEBP"
    return image


def test_a_preview_is_a_webp_data_url_at_most_256_px_on_its_long_side_never_enlarged():
    rng = np.random.default_rng(0)
    big = decode(preview.webp_data_url(rng.integers(0, 255, (96, 160, 3), np.uint8)))  # a 1280x768 image's map
    assert big.size == (160, 96)  # under 256 px: as it is
    wide = decode(preview.webp_data_url(rng.integers(0, 255, (300, 512, 3), np.uint8)))
    assert wide.size == (256, 150)
    url = preview.webp_data_url(np.full((128, 128, 3), 128, np.uint8))  # 1024 px by the fixed map: 128 px
    assert len(url) < 4096 and decode(url).size == (128, 128)


def test_one_that_would_be_too_heavy_is_dropped(monkeypatch):
    monkeypatch.setattr(preview, "PREVIEW_MAX_BYTES", 100)
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    assert preview.webp_data_url(noise) is None


def test_a_preview_is_due_every_k_steps_since_the_last_and_never_at_the_last_step():
    assert [d for d in range(1, 21) if preview.due(d, 0, 20, 5)] == [
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        19,
    ]
    # as the finisher uses it: the last preview's step moves on with each one
    last, shown = 0, []
    for done in range(1, 21):
        if preview.due(done, last, 20, 5):
            last = done
            shown.append(done)
    assert shown == [5, 10, 15]
    assert not preview.due(20, 0, 20, 5)  # the image itself comes next
    assert preview.due(7, 0, 20, 5) and not preview.due(7, 3, 20, 5)  # chunks of 7 steps: after any 5 or more
