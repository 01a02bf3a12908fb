"""What the engine benchmarks that compare variants on one machine share: a random model of a preset written
and loaded once, and rounds that alternate the variants so that all of them see the same machine noise."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Timing


def random_model(preset: str, purpose: str, folder: Path | None = None) -> Any:
    """The preset's random weights (float32) written to `folder` (None: a temporary one) and loaded: the same code
    path as real weights."""
    import numpy as np

    from worker.engine import model, tiny

    folder = folder or Path(tempfile.mkdtemp(prefix=f"{purpose}-{preset}-"))
    tiny.write(folder, preset=preset, precision=np.float32, threads=os.cpu_count() or 1)
    return model.load_folder(folder, model.LoadOptions(np.float32), name=preset)


def alternate(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, Any]:
    """Each variant compiled and run once (its output kept), then `rounds` rounds running every variant in
    turn: {"first_s", "outputs", "batch_s" (every round's time), "median_s", "timing" (median, p10, p90 and
    samples)} by variant name."""
    first, outputs, times = {}, {}, {name: [] for name in variants}
    for name, run in variants.items():
        t0 = time.perf_counter()
        outputs[name] = run()
        first[name] = time.perf_counter() - t0
    for _ in range(rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    timing = {name: Timing.of(t) for name, t in times.items()}
    median = {name: t.median_s for name, t in timing.items()}
    return {
        "first_s": first,
        "outputs": outputs,
        "batch_s": times,
        "median_s": median,
        "timing": {name: t.to_json() for name, t in timing.items()},
    }
