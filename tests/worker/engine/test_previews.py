"""The fixed latent-to-RGB map an engine draws previews with when it serves no preview decoder
(worker/engine/previews.py; numpy only: TAESD's drawing is tests/worker/engine/test_taesd.py)."""

import numpy as np
import pytest

from worker.engine import previews


def test_zero_latents_draw_the_maps_bias_and_each_channel_moves_the_colour_its_row_says():
    zero = previews.latent_rgb(np.zeros((4, 2, 3), np.float32))
    assert zero.shape == (2, 3, 3) and zero.dtype == np.uint8
    # bias (0.1084, -0.0175, -0.0011) in [-1, 1] -> (141, 125, 127)
    assert zero[0, 0].tolist() == [141, 125, 127]
    first = np.zeros((4, 1, 1), np.float32)
    first[0] = 1.0  # the first latent channel brightens every colour by (0.3651, 0.4232, 0.4341)
    assert previews.latent_rgb(first)[0, 0].tolist() == [187, 179, 182]


def test_non_finite_latents_draw_without_raising():
    latents = np.full((4, 2, 2), np.nan, np.float32)
    latents[0, 0, 0] = np.inf
    assert previews.latent_rgb(latents).dtype == np.uint8


def test_other_latent_shapes_are_refused():
    with pytest.raises(ValueError, match="4, h, w"):
        previews.latent_rgb(np.zeros((16, 8, 8), np.float32))
