"""The `canny` control preprocessor: an RGB picture -> the edge map canny ControlNets are trained on (white edges on
black, three equal channels), as OpenCV's cv2.Canny(gray, low, high) makes it, in numpy and scipy (no model, no
OpenCV): 3x3 Sobel gradients, L1 magnitude (OpenCV's default), non-maximum suppression along the gradient's
direction in four sectors, then hysteresis: pixels at or above `high` are edges, and those at or above `low`
joined to one (8-connected) are too.

Thresholds are on the gradient of 0-255 grey levels, as OpenCV's; diffusers' examples use 100 and 200.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_LOW, DEFAULT_HIGH = 100.0, 200.0
TAN_22_5 = 0.4142135623730951  # the sector boundaries of the gradient's direction (22.5 degrees)


def edges(image: np.ndarray, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> np.ndarray:
    """image (H, W, 3) uint8 RGB -> (H, W, 3) uint8, 255 on edges, 0 elsewhere. ValueError for bad thresholds."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    gray = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    gray = np.round(gray)  # OpenCV converts to 8-bit grey first
    gx = ndimage.sobel(gray, axis=1, mode="reflect")
    gy = ndimage.sobel(gray, axis=0, mode="reflect")
    magnitude = np.abs(gx) + np.abs(gy)
    thin = magnitude * _local_maximum(magnitude, gx, gy)
    strong = thin >= high
    weak = thin >= max(low, 1e-6)
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), bool))
    keep = np.zeros(count + 1, bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    out = (keep[labels] * 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def _local_maximum(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Where the magnitude is a maximum along its gradient's direction (ties go to the first neighbour, as OpenCV)."""
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= ax * TAN_22_5  # the gradient runs along x: compare left and right
    vertical = ay > ax / TAN_22_5
    same_sign = (gx * gy) > 0
    keep_h = (magnitude > at(0, -1)) & (magnitude >= at(0, 1))
    keep_v = (magnitude > at(-1, 0)) & (magnitude >= at(1, 0))
    keep_d1 = (magnitude > at(-1, -1)) & (magnitude > at(1, 1))  # gradient down-right: the "\" diagonal
    keep_d2 = (magnitude > at(-1, 1)) & (magnitude > at(1, -1))
    diagonal = np.where(same_sign, keep_d1, keep_d2)
    return np.where(horizontal, keep_h, np.where(vertical, keep_v, diagonal))
