"""A running job's preview: its current estimate of the image, small, as a WebP data URL on the event stream.

The engine draws the estimate (PendingBatch.preview: worker/engine/previews.py, TAESD on the devices when the
worker serves SDXL_PREVIEW_DECODER, else SDXL's fixed latent-to-RGB map on the host); here it becomes a WebP of
at most PREVIEW_MAX_SIDE_PX on its long side (a few ms on the CPU; docs/benchmarks.md has its cost to a batch).
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

PREVIEW_MAX_SIDE_PX = 256  # the preview's long side at most: small on the wire and in the job record
PREVIEW_MAX_BYTES = 64 * 1024  # a data URL longer than this is dropped (a 256 px WebP is usually 3-15 KiB)
WEBP_QUALITY = 70  # a preview is a glimpse: smaller beats sharper


def webp_data_url(rgb: np.ndarray, max_side_px: int = PREVIEW_MAX_SIDE_PX) -> str | None:
    """(h, w, 3) uint8 -> "data:image/webp;base64,...", shrunk to at most max_side_px on its long side (never
    enlarged); None when it would pass PREVIEW_MAX_BYTES (then no preview is better than a heavy event)."""
    image = Image.fromarray(rgb, "RGB")
    if max(image.size) > max_side_px:
        image.thumbnail((max_side_px, max_side_px), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=0)  # method 0: the fastest encoder
    url = "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()
    return url if len(url) <= PREVIEW_MAX_BYTES else None


def due(done: int, last: int, steps: int, every_steps: int) -> bool:
    """Whether a report at `done` steps carries a preview: `every_steps` since the last one (`last`, 0 at the
    start), and not at the last step (the image itself comes next)."""
    return done < steps and done - last >= every_steps
