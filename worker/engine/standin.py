"""A stand-in engine for benchmarks of the queue, not of the model: `SDXL_MODEL=standin`.

It holds a simulated device for `batch_s` per batch (batches queue behind each other, as on a real chip,
and dispatch returns at once, as JAX's does) and returns real images of the requested size: smooth
colour fields with grain, so PNG encoding and upload cost at least what they cost for real SDXL output
(2.1 MB per 1024x1024 PNG, 20 ms to encode here: bench/images.py; real SDXL PNGs are usually smaller).
The default, 2.33 s per batch of 4 1024x1024 images, is what diffusers' Flax SDXL pipeline takes on a TPU v5e-4.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from worker.engine.engine import EngineInputError, Output, Row
from worker.engine.feed import Canceled
from worker.engine.program_kind import Role


def picture(height: int, width: int, seed: int, grain: float = 6.0) -> np.ndarray:
    """A smooth colour field plus Gaussian grain of `grain` levels (0: none); bench/images.py uses both."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 64 + 2, width // 64 + 2, 3))
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    smooth = (
        c[y0][:, x0] * (1 - fy) * (1 - fx)
        + c[y0 + 1][:, x0] * fy * (1 - fx)
        + c[y0][:, x0 + 1] * (1 - fy) * fx
        + c[y0 + 1][:, x0 + 1] * fy * fx
    )
    noise = rng.normal(0, grain, (height, width, 3)) if grain else 0.0
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class StandInModel:
    """What the stand-in says it serves (heartbeats, PNG parameters): no weights."""

    name: str
    weights_hash: str = "standin"
    nbytes: int = 0


@dataclass(frozen=True)
class StandInMesh:
    devices: np.ndarray  # one simulated device


@dataclass
class StandInPending:
    images: np.ndarray
    rows: int
    done_at: float
    steps: int = 20
    batch_s: float = 0.0
    canceled: bool = False

    def progress(self) -> Iterator[int]:
        """Steps done, spread evenly over the simulated batch time (as the real engine's chunks finish)."""
        for done in range(1, self.steps + 1):
            time.sleep(max(0.0, self.done_at - self.batch_s * (1 - done / self.steps) - time.monotonic()))
            if self.canceled:
                return
            yield done

    def cancel(self) -> bool:
        """Its remaining steps dropped (the simulated device is not given the time back)."""
        self.canceled = time.monotonic() < self.done_at
        return self.canceled

    def preview(self, done: int, row: int) -> np.ndarray | None:
        """Row `row`'s picture after `done` steps, at the latents' size (h/8, w/8, 3) as the fixed map draws it:
        noisier the earlier (no model: something a preview can show)."""
        if not 1 <= done <= self.steps or not 0 <= row < self.rows:
            return None
        small = self.images[row, ::8, ::8, :].astype(np.float32)  # (h/8, w/8, 3)
        noise = np.random.default_rng(done).normal(0, 127.5 * (1 - done / self.steps), small.shape)
        return np.clip(small + noise, 0, 255).astype(np.uint8)

    def fetch(self) -> Output:
        if self.canceled:
            raise Canceled("the batch was canceled")
        time.sleep(max(0.0, self.done_at - time.monotonic()))
        return Output(self.images[: self.rows].copy(), [False] * self.rows, [True] * self.rows)


class StandInEngine:
    def __init__(self, sizes: Sequence[tuple[int, int]], batch_rows: int, batch_s: float):
        self.sizes = [tuple(s) for s in sizes]
        self.batch_rows = batch_rows
        self.batch_s = batch_s
        self.model = StandInModel(f"standin-{batch_s}s")
        self.models = {Role.base: self.model}
        self.mesh = StandInMesh(np.zeros(1))
        self._pictures = {(h, w): np.stack([picture(h, w, i) for i in range(batch_rows)]) for h, w in self.sizes}
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.compile_s: dict[str, float] = {}

    @property
    def conditions(self) -> dict[str, str | int]:
        """As the real engine's (worker/engine/engine.py): its pictures depend on nothing but the row's index."""
        return {
            "dtype": "uint8",
            "vae_dtype": "uint8",
            "quantize": "none",
            "attention": "none",
            "batch_rows": self.batch_rows,
            "devices": 1,
            "platform": "standin",
            "device_kind": "standin",
            "jax": "none",
            "jaxlib": "none",
        }

    def compile(self) -> dict[str, float]:
        return {}

    def dispatch(self, rows: Sequence[Row], height: int, width: int, **_: object) -> StandInPending:
        if (height, width) not in self.sizes:
            raise EngineInputError("size", f"{height}x{width} is not served")
        if not 1 <= len(rows) <= self.batch_rows:
            raise EngineInputError("rows", f"between 1 and {self.batch_rows} rows per call, got {len(rows)}")
        with self._lock:  # one device: a batch starts when the previous one is done
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + self.batch_s
        steps = max(row.steps for row in rows)
        return StandInPending(self._pictures[(height, width)], len(rows), self._free_at, steps, self.batch_s)

    def generate(self, rows: Sequence[Row], height: int, width: int) -> Output:
        return self.dispatch(rows, height, width).fetch()
