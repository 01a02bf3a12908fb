"""The canny control preprocessor (numpy and scipy): thin edges where the picture changes, none where it is flat,
thresholds that decide which edges stay."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine import canny


def _square(level: int = 255) -> np.ndarray:
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = level
    return image


def test_a_square_gives_its_outline_one_pixel_wide():
    out = canny.edges(_square())
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 255}
    edge = out[..., 0] > 0
    assert not edge[12:20, 12:20].any()  # flat inside
    assert not edge[:5].any() and not edge[:, :5].any()  # flat outside
    for row in (12, 16, 20):  # each side is crossed by one line, thin after non-maximum suppression
        assert 1 <= edge[row, :16].sum() <= 2 and 1 <= edge[row, 16:].sum() <= 2
        assert 1 <= edge[:16, row].sum() <= 2 and 1 <= edge[16:, row].sum() <= 2


def test_thresholds_decide_which_edges_stay():
    faint = _square(level=30)  # a grey step of 30: an L1 Sobel gradient of 4 x 30 = 120 along a side, less than
    # 200 at the corners
    assert canny.edges(faint, 100, 200).max() == 0  # below high: nothing starts an edge
    assert canny.edges(faint, 50, 100).max() == 255


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="low <= high"):
        canny.edges(_square(), 200, 100)
