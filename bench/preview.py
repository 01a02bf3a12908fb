"""What previews cost: a batch followed as the worker follows it, with and without a preview every 5 steps, drawn
by the fixed map and, with --taesd, by TAESD on the devices.

    python bench/preview.py --preset mid --size 256x256 --batch 2 --steps 20 \
        --json bench/results/preview-cpu-mid-256.json
    python bench/preview.py --preset tiny --size 256x256 --taesd random --taesd-side 256   # TAESD-XL, random weights

Method (docs/benchmarks.md, "Previews"): the preset's random weights, float32, one engine (previews compile
nothing: both variants run the same programs), the same rows, 20 Euler steps, progress every step (the
default). Each variant dispatches the batch, reads every chunk's end (Pending.progress()) and fetches the images:
- `progress`: nothing more (a job without `preview`);
- `preview_every_5`: at steps 5, 10 and 15, every row's preview as the finisher makes it (Pending.preview: the
  latents copied off the device and the fixed RGB map, worker/engine/previews.py; then worker/loop/preview.py's
  WebP data URL), every row a job of its own that asked for one; the time in that work is summed per batch;
- `taesd_every_5` (with --taesd FOLDER, or `random` for TAESD-XL's config with random weights: the cost is the
  same): the same on a second engine serving TAESD, whose `preview` program draws each row on the devices.
Each is run once (compile and first run), then rounds alternate the two so that both see the same machine
noise; medians. The cost is reported twice: the ratio of the medians (what a batch takes, noise included) and
the preview work's own time over the batch's (what the ratio cannot resolve on a busy machine). The previews
of a 1024 px image's latents (128x128) are also timed alone, on the host; with --taesd, TAESD's program alone
on one row of --taesd-side px (1024 by default: a CPU takes seconds there).
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
    p.add_argument("--taesd", default="", help="a TAESD folder, or 'random' (TAESD-XL's config, random weights)")
    p.add_argument("--taesd-side", type=int, default=1024, help="the image side TAESD's program is timed alone at")
    args = p.parse_args()
    result_file = harness.start("preview", args, __doc__)

    import numpy as np

    from bench.side_by_side import alternate, random_model
    from worker.engine import previews, taesd
    from worker.engine.engine import Engine, Row
    from worker.loop import preview

    # The host's part alone, at SDXL's 1024 px (128x128 latents): the map and the WebP encode.
    latents = np.random.default_rng(0).normal(0, 1, (4, 128, 128)).astype(np.float32)
    host_s = []
    for _ in range(30):
        t0 = time.perf_counter()
        url = preview.webp_data_url(previews.latent_rgb(latents))
        host_s.append(time.perf_counter() - t0)
    host = harness.Timing.of(host_s)
    print(f"one 1024 px preview on the host: {1000 * host.median_s:.2f} ms, {len(url or '')} bytes")
    decoder, alone = _taesd(args, taesd) if args.taesd else (None, None)

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

    def run_previews(engine: Engine, spent_s: list[float], sizes: list[int]) -> np.ndarray:
        pending = engine.dispatch(rows, h, w)
        spent, last = 0.0, 0
        for done in pending.progress():
            if preview.due(done, last, args.steps, EVERY_STEPS):
                last = done
                t0 = time.perf_counter()
                urls = [preview.webp_data_url(pending.preview(done, i)) for i in range(len(rows))]
                spent += time.perf_counter() - t0
                sizes.extend(len(u or "") for u in urls)
        spent_s.append(spent)
        return pending.fetch().images

    variants = {"progress": run_progress, "preview_every_5": lambda: run_previews(engine, preview_s, sizes)}
    taesd_s: list[float] = []  # the TAESD preview work in each taesd_every_5 batch
    taesd_sizes: list[int] = []
    if decoder is not None:
        served = Engine(m, [(h, w)], args.batch, progress_every_steps=1, preview_decoder=decoder)
        served.compile()  # its preview program at start, as a worker's
        variants["taesd_every_5"] = lambda: run_previews(served, taesd_s, taesd_sizes)
    ran = alternate(variants, args.rounds)
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
        "images_equal": all(np.array_equal(ran["outputs"]["progress"], out) for out in ran["outputs"].values()),
    }
    if decoder is not None:
        taesd_work = harness.Timing.of(taesd_s[1:])
        result |= {
            "taesd": args.taesd,
            "median_taesd_work_s": taesd_work.median_s,
            "taesd_work_pct": 100 * taesd_work.median_s / med["progress"],
            "taesd_over_progress": med["taesd_every_5"] / med["progress"],
            "median_taesd_data_url_bytes": float(np.median(taesd_sizes)),
            "taesd_side_px": args.taesd_side,
            "taesd_preview_alone_ms": 1000 * alone.median_s,
        }
    print(json.dumps(result, indent=2))
    result_file.add("summary", result)


def _taesd(args, taesd):  # -> (PreviewDecoder, Timing of its program alone on one row of --taesd-side px)
    """The decoder --taesd names (`random`: TAESD-XL's config with the tests' random weights, written to a
    temporary folder and read back as a real one is), and its preview program's time alone, compiled first."""
    import tempfile

    import jax
    import numpy as np

    folder = args.taesd
    if folder == "random":
        from tests.helpers import variants  # the tests' random TAESD

        folder = variants.write_taesd(Path(tempfile.mkdtemp(prefix="taesd-")), 0, {})
    decoder = taesd.load(folder)
    side = args.taesd_side // decoder.config.scale_factor
    latents = np.random.default_rng(0).normal(0, 1, (1, decoder.config.latent_channels, side, side)).astype(np.float32)
    params = jax.device_put(decoder.params)
    draw = jax.jit(lambda p, x: taesd.preview(decoder.config, p, x)).lower(params, latents).compile()
    spent = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.asarray(draw(params, latents))
        spent.append(time.perf_counter() - t0)
    alone = harness.Timing.of(spent)
    print(f"one {args.taesd_side} px TAESD preview alone: {1000 * alone.median_s:.1f} ms")
    return decoder, alone


if __name__ == "__main__":
    main()
