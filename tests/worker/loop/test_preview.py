"""Previews (worker/loop/preview.py): SDXL's latents to RGB by the fixed map, a small WebP data URL, when one is
due."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from worker.loop import preview


def decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/webp;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "WEBP"
    return image


def test_zero_latents_draw_the_maps_bias_and_each_channel_moves_the_colour_its_row_says():
    zero = preview.latent_rgb(np.zeros((4, 2, 3), np.float32))
    assert zero.shape == (2, 3, 3) and zero.dtype == np.uint8
    # bias (0.1084, -0.0175, -0.0011) in [-1, 1] -> (141, 125, 127)
    assert zero[0, 0].tolist() == [141, 125, 127]
    first = np.zeros((4, 1, 1), np.float32)
    first[0] = 1.0  # the first latent channel brightens every colour by (0.3651, 0.4232, 0.4341)
    assert preview.latent_rgb(first)[0, 0].tolist() == [187, 179, 182]


def test_non_finite_latents_draw_without_raising():
    latents = np.full((4, 2, 2), np.nan, np.float32)
    latents[0, 0, 0] = np.inf
    assert preview.latent_rgb(latents).dtype == np.uint8


def test_other_latent_shapes_are_refused():
    with pytest.raises(ValueError, match="4, h, w"):
        preview.latent_rgb(np.zeros((16, 8, 8), np.float32))


def test_a_preview_is_a_webp_data_url_at_most_256_px_on_its_long_side_never_enlarged():
    rng = np.random.default_rng(0)
    big = decode(preview.preview(rng.normal(0, 1, (4, 96, 160)).astype(np.float32)))  # a 1280x768 image's latents
    assert big.size == (160, 96)  # under 256 px: as it is
    wide = decode(preview.webp_data_url(rng.integers(0, 255, (300, 512, 3), np.uint8)))
    assert wide.size == (256, 150)
    url = preview.preview(np.zeros((4, 128, 128), np.float32))  # 1024 px: 128 px of latents
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
