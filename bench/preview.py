"""What previews cost: a batch followed as the worker follows it, with and without a preview every 5 steps.

    python bench/preview.py --preset mid --size 256x256 --batch 2 --steps 20 \
        --json bench/results/preview-cpu-mid-256.json

Method (docs/benchmarks.md, "Previews"): the preset's random weights, float32, one engine (previews compile
nothing: both variants run the same programs), the same rows, 20 Euler steps, progress every step (the
default). Each variant dispatches the batch, reads every chunk's end (Pending.progress()) and fetches the images:
- `progress`: nothing more (a job without `preview`);
- `preview_every_5`: at steps 5, 10 and 15, every row's preview as the finisher makes it (Pending.estimate:
  the latents copied off the device, then worker/loop/preview.py: the RGB map and a WebP data URL), every row
  a job of its own that asked for one; the time in that work is summed per batch.
Each is run once (compile and first run), then rounds alternate the two so that both see the same machine
noise; medians. The cost is reported twice: the ratio of the medians (what a batch takes, noise included) and
the preview work's own time over the batch's (what the ratio cannot resolve on a busy machine). The previews
of a 1024 px image's latents (128x128) are also timed alone, on the host.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

EVERY_STEPS = 5


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    result_file = harness.start("preview", args, __doc__)

    import numpy as np

    from bench.side_by_side import alternate, random_model
    from worker.engine.engine import Engine, Row
    from worker.loop import preview

    # The host's part alone, at SDXL's 1024 px (128x128 latents): the map and the WebP encode.
    latents = np.random.default_rng(0).normal(0, 1, (4, 128, 128)).astype(np.float32)
    host_s = []
    for _ in range(30):
        t0 = time.perf_counter()
        url = preview.preview(latents)
        host_s.append(time.perf_counter() - t0)
    host = harness.Timing.of(host_s)
    print(f"one 1024 px preview on the host: {1000 * host.median_s:.2f} ms, {len(url or '')} bytes")

    w, h = (int(v) for v in args.size.split("x"))
    m = random_model(args.preset, "preview")
    rows = [Row(f"a picture number {i}", seed=i, steps=args.steps) for i in range(args.batch)]
    engine = Engine(m, [(h, w)], args.batch, progress_every_steps=1)
    preview_s: list[float] = []  # the preview work in each preview_every_5 batch
    sizes: list[int] = []

    def run_progress() -> np.ndarray:
        pending = engine.dispatch(rows, h, w)
        for _ in pending.progress():
            pass
        return pending.fetch().images

    def run_previews() -> np.ndarray:
        pending = engine.dispatch(rows, h, w)
        spent, last = 0.0, 0
        for done in pending.progress():
            if preview.due(done, last, args.steps, EVERY_STEPS):
                last = done
                t0 = time.perf_counter()
                estimate = pending.estimate(done)
                urls = [preview.preview(estimate[i]) for i in range(len(rows))]
                spent += time.perf_counter() - t0
                sizes.extend(len(u or "") for u in urls)
        preview_s.append(spent)
        return pending.fetch().images

    ran = alternate({"progress": run_progress, "preview_every_5": run_previews}, args.rounds)
    med = ran["median_s"]
    work = harness.Timing.of(preview_s[1:])  # the rounds' (the first run's includes its first copies)
    result = {
        "dtype": "float32",
        "compile_and_first_run_s": ran["first_s"],
        "batch_s": ran["batch_s"],
        "median_batch_s": med,
        "timing": ran["timing"],
        "previews_per_batch": args.batch * len(range(EVERY_STEPS, args.steps, EVERY_STEPS)),
        "median_preview_work_s": work.median_s,
        "preview_work_pct": 100 * work.median_s / med["progress"],
        "preview_over_progress": med["preview_every_5"] / med["progress"],
        "preview_cost_pct": 100 * (med["preview_every_5"] / med["progress"] - 1),
        "median_data_url_bytes": float(np.median(sizes)),
        "host_preview_1024_ms": 1000 * host.median_s,
        "host_preview_1024_bytes": len(url or ""),
        "images_equal": bool(np.array_equal(ran["outputs"]["progress"], ran["outputs"]["preview_every_5"])),
    }
    print(json.dumps(result, indent=2))
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
