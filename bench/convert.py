"""Weight layout copy: numpy's whole-array copy of a transposed view against worker/engine/convert.py's tiles.

    python bench/convert.py --out bench/results/convert-cpu.json

Method (docs/benchmarks.md): SDXL's largest kernel shapes as stored in a checkpoint (PyTorch layout), each
copied to Flax's layout and cast the way a load does (fp16 file -> bfloat16 served, the accelerator case;
float32 -> float32, the CPU case), on one thread. The two copies alternate for `--rounds` rounds; medians,
in nanoseconds per element, and the ratio old / tiled (> 1: tiles are faster). Both results are compared
bit for bit before anything is timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from worker.engine.convert import contiguous  # noqa: E402

# (name, PyTorch shape, axes to Flax's layout)
SHAPES = [
    ("feed-forward in 1280->10240 (linear)", (10240, 1280), (1, 0)),
    ("attention out 1280x1280 (linear)", (1280, 1280), (1, 0)),
    ("resnet conv 1280x1280x3x3", (1280, 1280, 3, 3), (2, 3, 1, 0)),
    ("resnet conv 320x320x3x3", (320, 320, 3, 3), (2, 3, 1, 0)),
]
CASTS = [("float16->bfloat16", np.float16, ml_dtypes.bfloat16), ("float32->float32", np.float32, np.float32)]


def ns_per_element(copy, view: np.ndarray, dtype) -> float:
    t0 = time.perf_counter()
    copy(view, dtype)
    return (time.perf_counter() - t0) * 1e9 / view.size


def main() -> None:
    p = harness.parser(__doc__, output=("--out", "--json"))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    result = harness.start("convert", args, __doc__)
    for cast, stored, served in CASTS:
        for name, shape, axes in SHAPES:
            view = np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(stored).transpose(axes)
            old = np.ascontiguousarray(view, dtype=served)
            assert np.array_equal(old.view(np.uint8), contiguous(view, served).view(np.uint8))
            times: dict[str, list[float]] = {"numpy": [], "tiled": []}
            for _ in range(args.rounds):
                times["numpy"].append(ns_per_element(lambda v, d: np.ascontiguousarray(v, dtype=d), view, served))
                times["tiled"].append(ns_per_element(contiguous, view, served))
            med = {k: harness.Timing.of(v).median_s for k, v in times.items()}
            row = {
                "cast": cast,
                "tensor": name,
                "elements": view.size,
                "numpy_ns": round(med["numpy"], 2),
                "tiled_ns": round(med["tiled"], 2),
                "numpy_over_tiled": round(med["numpy"] / med["tiled"], 2),
                # the spread, in ns per element (the samples are times per element, not seconds)
                "numpy_ns_p10_p90": [round(harness.percentile(times["numpy"], q), 2) for q in (10, 90)],
                "tiled_ns_p10_p90": [round(harness.percentile(times["tiled"], q), 2) for q in (10, 90)],
            }
            print(json.dumps(row), flush=True)
            result.add(f"{cast} {name}", row)


if __name__ == "__main__":
    main()
