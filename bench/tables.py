"""docs/benchmarks.md's tables, rendered from the result files in bench/results/ (bench/harness.py's keys).

    python bench/tables.py            # rewrite every table between its markers in docs/benchmarks.md
    python bench/tables.py --check    # exit 1, naming the tables, where the page differs from the rendering

A table lives between `<!-- table: NAME -->` and `<!-- /table -->`; everything between the two is replaced,
so a figure is changed by rerunning its bench (or, for the prose, here), never by editing the page.
tests/bench/test_tables.py fails when the page and the rendering differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
MARKED = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


class Run:
    """One result file: its scenario and its figures by name."""

    def __init__(self, stem: str):
        self.document = harness.load(harness.RESULTS / f"{stem}.json")
        self.scenario: dict[str, Any] = self.document["scenario"]
        self.figures = {r["figure"]: r for r in self.document["results"]}

    def __getitem__(self, figure: str) -> dict[str, Any]:
        return self.figures[figure]

    @property
    def summary(self) -> dict[str, Any]:
        return self.figures["summary"]


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fixed(x: float, digits: int) -> str:
    """x to `digits` decimals, halves rounded up as a person rounds the printed value (format() would give
    14.4 for 14.45, whose binary value lies just below it)."""
    return str(Decimal(repr(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def pct(x: float, digits: int = 2) -> str:
    return f"{fixed(100 * x, digits)}%"


def bold(text: str, on: bool = True) -> str:
    return f"**{text}**" if on else text


def engine_own_model() -> str:
    rows = []
    for stem in ("engine-cpu-tiny-512-own-model", "engine-cpu-mid-256-own-model"):
        run = Run(stem)
        r, s = run.summary, run.scenario
        rows.append(
            [
                f"{s['preset']}, {s['size']}",
                f"{fixed(r['ours_s_per_image'], 2)}",
                f"{fixed(r['reference_s_per_image'], 2)}",
                f"{fixed(r['speedup_vs_reference'], 2)}x",
                f"{fixed(r['ours_compile_and_first_run_s'], 1)} s",
                f"{fixed(r['reference_compile_and_first_run_s'], 1)} s",
                f"{fixed(r['compile_ratio_reference_over_ours'], 2)}x",
                f"{fixed(r['tflop_per_image'], 3)}",
            ]
        )
    headers = ["preset, size", "ours s/image", "seed path s/image", "ours / seed speed", "ours compile + first run"]
    headers += ["seed compile + first run", "compile ratio", "TFLOP/image"]
    return markdown(headers, rows)


def precision() -> str:
    tiny, mid = Run("precision-cpu-tiny"), Run("precision-cpu-mid")
    names = {
        "text_encoder": "text encoder (CLIP-L), context",
        "text_encoder_2": "text encoder 2 (bigG), context",
        "pooled": "text encoder 2, pooled",
        "unet": "UNet, one step",
        "vae_decode": "VAE decode",
        "whole_program_pixels": "whole program, pixels",
    }
    rows = [
        [label, *(c for run in (tiny, mid) for c in (f"{fixed(run[k]['max_abs'], 3)}", pct(run[k]["rel_rms"])))]
        for k, label in names.items()
    ]
    return markdown(["network", "tiny: max abs", "tiny: relative RMS", "mid: max abs", "mid: relative RMS"], rows)


def start_weight_cache() -> str:
    dtypes = {"bfloat16": "bf16", "float32": "fp32", "auto": "fp32 (auto on a CPU)"}
    rows = []
    for stem, emphasis in (("sdxl-1024", True), ("mid-256", False), ("tiny-512", False)):
        r = Run(f"start-cpu-{stem}-weight-cache").summary
        ready = r["median_ready_s"]
        rows.append(
            [
                f"{r['model']}, {r['size']}, {dtypes.get(r['dtype'], r['dtype'])}",
                f"{fixed(ready['cold'], 1)} s",
                bold(f"{fixed(ready['warm'], 1)} s", emphasis),
                f"{fixed(ready['warm_disk'], 1)} s",
                f"{fixed(ready['warm_converting'], 1)} s",
                f"{bold(pct(r['warm_over_cold'], 1), emphasis)} (from disk {pct(r['warm_disk_over_cold'], 1)};"
                f" converting {pct(r['warm_converting_over_cold'], 1)})",
            ]
        )
    headers = ["model, size", "cold", "warm (restart)", "warm from disk", "warm converting (no weight cache)"]
    return markdown([*headers, "warm / cold"], rows)


def convert() -> str:
    casts = {"float16->bfloat16": "fp16 -> bf16", "float32->float32": "fp32 -> fp32"}
    rows = [
        [
            casts[r["cast"]],
            r["tensor"],
            f"{fixed(r['numpy_ns'], 2)}",
            f"{fixed(r['tiled_ns'], 2)}",
            f"{fixed(r['numpy_over_tiled'], 2)}",
        ]
        for r in Run("convert-cpu").figures.values()
    ]
    return markdown(["cast", "tensor", "numpy ns/element", "tiles ns/element", "numpy / tiles"], rows)


def imports() -> str:
    r = Run("imports-cpu-torch").summary
    rows = [
        [arm, *(fixed(r[f"{arm}: {m} median"], 2) + " s" for m in ("import_s", "process_s"))]
        for arm in ("as the worker (torch marked absent)", "torch imported")
    ]
    saved = (bold(fixed(r[f"saved per start: {m}"], 2) + " s") for m in ("import_s", "process_s"))
    rows.append(["saved per start", *saved])
    return markdown(["arm", "imports", "whole process"], rows)


def service() -> str:
    runs = [Run("service-cpu-standin-1024"), Run("service-cpu-tiny-256")]
    standin, tiny = (run.summary for run in runs)

    def row(measure: str, cell: Callable[[dict[str, Any], bool], str], target: str = "") -> list[str]:
        return [measure, cell(standin, True), cell(tiny, False), target]

    def jobs(run: Run) -> str:
        return f" ({run.scenario['jobs']} jobs)" if "jobs" in run.scenario else ""

    targets = " / ".join(f"{fixed(r['low_load_p50_target_s'], 3)} s" for r in (standin, tiny))
    rows = [
        row(
            "service / engine alone at saturation",
            lambda r, b: (
                bold(f"{fixed(r['service_over_engine'], 3)}", b) + f" ({fixed(r['service_images_per_s'], 3)} vs "
                f"{fixed(r['engine_alone_images_per_s'], 3)} images/s)"
            ),
            ">= 0.97",
        ),
        row("device busy fraction", lambda r, b: f"{fixed(r['device_busy_fraction'], 3)}"),
        row("batch fill", lambda r, b: f"{fixed(r['batch_fill'], 2)} ({r['batches']} batches)"),
        row(
            "low-load p50 / p95 / p99",
            lambda r, b: (
                bold(f"{fixed(r['low_load_p50_s'], 3)}", b)
                + f" / {fixed(r['low_load_p95_s'], 3)} / {fixed(r['low_load_p99_s'], 3)} s"
            ),
            f"one batch alone + batch timeout + 0.1 s: {targets}",
        ),
        row(
            "of which created -> running / -> device done / -> succeeded (p50)",
            lambda r, b: (
                f"{fixed(r['low_load_to_running_p50_s'], 3)} / {fixed(r['low_load_running_to_device_done_p50_s'], 3)}"
                f" / {fixed(r['low_load_device_done_to_succeeded_p50_s'], 3)} s"
            ),
        ),
        row(
            "client that polls every 1 s: latency p50 (overhead)",
            lambda r, b: f"{fixed(r['client_polling_p50_s'], 3)} s ({fixed(r['client_polling_overhead_p50_s'], 3)} s)",
        ),
        row(
            "client with `Prefer: wait`: latency p50 (overhead)",
            lambda r, b: (
                bold(f"{fixed(r['client_waiting_p50_s'], 3)} s ({fixed(r['client_waiting_overhead_p50_s'], 3)} s)", b)
                + f", {fixed(r['client_waiting_over_polling'], 2)}x the polling client's"
            ),
        ),
        [
            "saturation p50 / p95 / p99 (all jobs at once)",
            *(
                " / ".join(fixed(r[f"saturation_p{q}_s"], 1) for q in (50, 95, 99)) + f" s{jobs(run)}"
                for run, r in zip(runs, (standin, tiny), strict=True)
            ),
            "",
        ],
        row("API submit p99", lambda r, b: f"{fixed(r['submit_p99_ms'], 0)} ms"),
        row(
            "Redis commands per job (API with auth, Celery, worker, feeder)",
            lambda r, b: f"{fixed(r['redis_commands_per_job'], 1)}",
        ),
    ]
    headers = [
        "measure",
        f"stand-in ({fixed(standin['one_batch_alone_s'], 2)} s per {standin['batch']} x {standin['size']})",
        f"tiny engine ({tiny['size']}, {tiny['steps']} steps)",
        "target",
    ]
    return markdown(headers, rows)


def images() -> str:
    encoders = {
        "pillow level 1": "Pillow, `compress_level=1`",
        "ours, zlib level 3 (before)": "ours with zlib level 3 (before)",
        "ours, ISA-L level 1 (now)": "ours with ISA-L level 1 (now)",
    }
    rows = []
    for r in Run("images-cpu").figures.values():
        now = r["encoder"] == "ours, ISA-L level 1 (now)"
        ratio = "1" if now else f"{fixed(r['times_isal'], 2)}"
        rows.append(
            [r["image"], bold(encoders[r["encoder"]], now), bold(f"{fixed(r['ms'], 1)}", now), f"{r['bytes']:,}", ratio]
        )
    return markdown(["image", "encoder", "ms", "bytes", "time / ISA-L's"], rows)


def retention() -> str:
    run = Run("retention-cpu")
    s3, local = run["s3"], run["local"]
    rows = [
        [
            "SeaweedFS (S3 API)",
            bold(f"{s3['ours_images_per_s']:,}"),
            f"{s3['one_by_one_images_per_s']:,}",
            bold(f"{fixed(s3['ratio'], 2)}x"),
            f"{fixed(s3['ours_s3_requests_per_image'], 3)} / {fixed(s3['one_by_one_s3_requests_per_image'], 3)}",
            f"{fixed(s3['ours_redis_commands_per_image'], 1)}",
        ],
        [
            "local folder",
            f"{local['ours_images_per_s']:,}",
            f"{local['one_by_one_images_per_s']:,}",
            f"{fixed(local['ratio'], 2)}x",
            "-",
            f"{fixed(local['ours_redis_commands_per_image'], 1)}",
        ],
    ]
    headers = ["storage", "ours, images/s", "one by one, images/s", "ours / one by one"]
    headers += ["S3 requests per image, ours / one by one", "Redis commands per image (both)"]
    return markdown(headers, rows)


def redis_wait() -> str:
    run = Run("redis-wait-cpu")
    rows = []
    for name in ("no WAIT", "WAIT 1", "WAIT 2"):
        f = run[name]
        ms = f"{fixed(f['create_median_ms'], 3)} ({fixed(f['create_p10_ms'], 3)}-{fixed(f['create_p90_ms'], 3)})"
        added = "-" if not f["wait_replicas"] else f"+{fixed(f['added_ms'], 3)} ({fixed(f['latency_ratio'], 2)}x)"
        per_s = f"{f['creates_per_s']:,} ({fixed(f['throughput_ratio'], 2)}x)"
        start = f"{fixed(f['start_median_ms'], 3)}" + (
            "" if not f["wait_replicas"] else f" (+{fixed(f['start_added_ms'], 3)})"
        )
        first = bold(name) if name == "WAIT 1" else name
        rows.append([first, ms, bold(added) if name == "WAIT 1" else added, per_s, start])
    headers = [
        "setting",
        "create, ms: median (p10-p90)",
        "added per submit, ms",
        "creates/s on 8 threads",
        "a worker's job start, ms (added)",
    ]
    return markdown(headers, rows)


def datasets() -> str:
    run = Run("datasets-cpu-100k")
    naive = run["naive"]
    rows = [
        [
            "naive (everything enqueued at once)",
            f"{naive['lines']:,}",
            f"{fixed(naive['peak_above_baseline_bytes'] / 1e6, 1)} MB",
            f"{fixed(naive['enqueue_s'], 1)} s to enqueue",
            "",
            "",
        ]
    ]
    for name in ("feeder_small", "feeder_large"):
        r = run[name]
        rows.append(
            [
                "feeder",
                f"{r['lines']:,}",
                f"{fixed(r['peak_above_baseline_bytes'] / 1e6, 2)} MB",
                f"{fixed(r['total_s'], 1)} s",
                f"{fixed(r['lines_per_s'], 1)}",
                str(r["shards"]),
            ]
        )
    return markdown(["phase", "lines", "peak Redis memory above baseline", "time", "lines/s", "shards"], rows)


def progress() -> str:
    r = Run("progress-cpu-mid-256").summary
    med = r["median_batch_s"]
    rows = [
        [name, f"{fixed(med[name], 2)}", f"{fixed(med[name] / med['fused'], 3)}"]
        for name in ("per_step", "one_chunk", "fused")
    ]
    return markdown(["variant", "median batch s", "vs fused"], rows)


def preview() -> str:
    r = Run("preview-cpu-mid-256").summary
    med, work = r["median_batch_s"], r["median_preview_work_s"]
    rows = [
        ["progress (no preview)", f"{fixed(med['progress'], 2)}", "1.000", "-"],
        [
            f"preview every 5 steps ({r['previews_per_batch']} previews)",
            f"{fixed(med['preview_every_5'], 2)}",
            f"{fixed(r['preview_over_progress'], 3)}",
            f"{fixed(1000 * work, 1)} ms ({fixed(r['preview_work_pct'], 3)}%)",
        ],
    ]
    return markdown(["variant", "median batch s", "vs progress", "preview work per batch (share)"], rows)


def sampling() -> str:
    r = Run("sampling-cpu-mid-256").summary
    what = {
        "guided_program": "4 trailing Euler steps, guidance 0, forced onto the guided program",
        "free_program": "the same rows on the guidance-free program (what the engine picks)",
        "guided_program_8": "as guided_program, 8 steps",
        "free_program_8": "as free_program, 8 steps",
        "turbo_4": "4 trailing Euler steps, guidance 0 (SDXL-Turbo's way)",
        "guided_20": "20 Euler steps, guidance 5 (the service's default)",
    }
    rows = [[k, w, f"{fixed(r['median_batch_s'][k], 2)}", f"{fixed(r['images_per_s'][k], 2)}"] for k, w in what.items()]
    return markdown(["variant", "what runs", "median batch s", "images/s"], rows)


def lora() -> str:
    run = Run("lora-cpu-mid-256")
    r, s = run.summary, run.scenario
    batches = r["batches"]
    kept = f"{s['merged']} merged sets" if "merged" in s else "the merged sets"  # not recorded before the harness
    what = {
        "none": f"the jobs without adapters, an engine without a bank, {batches['in_order']} full batches",
        "bank_idle": "the same rows on the engine with the bank (no row names an adapter)",
        "bank": f"**what the service does**: per-row factors from an {s['slots']}-slot bank ({s['per_row']} slots a"
        f" row, the default `SDXL_MAX_LORAS_PER_JOB`), {batches['in_order']} full batches in arrival order,"
        " adapters replaced least recently used as they come",
        "merged": f"weights merged per adapter on the host and placed, {kept} kept on the device, jobs grouped by"
        f" adapter (all {s['jobs']} known at once: grouping's best case)",
    }
    rows = [
        [k, w, f"{fixed(r['median_s'][k], 2)}", f"{fixed(r['images_per_s'][k], 2)}", f"{fixed(r['vs_none'][k], 2)}"]
        for k, w in what.items()
    ]
    return markdown(["way", "what runs", "workload s", "images/s", "time vs none"], rows)


def control() -> str:
    run = Run("control-cpu-mid-256")
    r, n = run.summary, run.scenario["batch"]
    what = {
        "bare_plain": f"{n} plain rows on an engine serving nothing",
        "plain": f"{n} plain rows on the engine serving two ControlNets and an IP-Adapter",
        "controlnet_1": "every row with one ControlNet",
        "controlnet_2": "every row with two ControlNets",
        "ip_adapter": "every row with an image prompt (IP-Adapter)",
        "mixed": f"**unrelated rows in one batch**: one with a ControlNet, one with an image prompt, {n - 2} plain",
    }
    rows = []
    for k, w in what.items():
        t = r["timing"][k]
        rows.append(
            [
                k,
                w,
                f"{fixed(t['median_s'], 2)} ({fixed(t['p10_s'], 2)}-{fixed(t['p90_s'], 2)})",
                f"{fixed(r['s_per_image'][k], 2)}",
                bold(f"{fixed(r['vs_plain'][k], 2)}", k == "mixed"),
                f"{fixed(r['flop_vs_plain'][k], 2)}",
            ]
        )
    rows.append(
        [
            "grouped (derived)",
            "the mixed batch's rows served one batch per kind: controlnet_1's, ip_adapter's and plain's medians added",
            f"{fixed(r['grouped_s'], 2)}",
            f"{fixed(r['grouped_s'] / n, 2)}",
            f"{fixed(r['grouped_s'] / r['median_s']['plain'], 2)}",
            "",
        ]
    )
    headers = ["variant", "what runs", "batch s, median (p10-p90)", "s/image", "time vs plain", "FLOP vs plain"]
    return markdown(headers, rows)


def step_count() -> str:
    def flop(gflop: float, digits: int, unit: str) -> str:
        return f"{Decimal(fixed(gflop * 1000 if unit == 'MFLOP' else gflop, digits)):,} {unit}"

    rows, dtypes = [], {"bfloat16": "bf16"}
    for stem in ("step-count-sdxl-1024", "engine-cpu-mid-256-compare-step", "step-count-tiny-64"):
        run = Run(stem)
        r, s = run.summary, run.scenario
        unit = "MFLOP" if r["before_advance_gflop"] < 1 else "GFLOP"
        saved = r["measured_saving_gflop"]
        rows.append(
            [
                f"{s['preset']}, {s['size']}, {s['batch']} ({2 * s['batch']}), {dtypes.get(r['dtype'], r['dtype'])}",
                flop(r["before_advance_gflop"], 2, unit),
                flop(r["after_advance_gflop"], 2, unit),
                f"{flop(saved, 3, unit)} ({100 * saved / r['before_advance_gflop']:.3g}%)",
                flop(r["predicted_saving_gflop"], 3, unit),
                f"{fixed(r['before_begin_gflop'] * (1000 if unit == 'MFLOP' else 1), 2)} -> "
                + flop(r["after_begin_gflop"], 2, unit),
            ]
        )
    headers = ["model, size, images (UNet rows)", "advance before", "advance after", "saved", "predicted"]
    return markdown([*headers, "begin before -> after"], rows)


def step_time() -> str:
    r = Run("engine-cpu-mid-256-compare-step").summary

    def rounds(key: str) -> str:
        return ", ".join(f"{fixed(t, 2)}" for t in r[key])

    rows = [
        [
            "before (`light_step=False`)",
            f"{fixed(r['before_batch_s'], 2)} ({rounds('before_rounds_s')})",
            f"{fixed(r['before_compile_and_first_run_s'], 1)} s",
            f"{fixed(r['before_advance_gflop'], 2)} GFLOP",
        ],
        [
            "after (the lighter step)",
            f"{fixed(r['after_batch_s'], 2)} ({rounds('after_rounds_s')})",
            f"{fixed(r['after_compile_and_first_run_s'], 1)} s",
            f"{fixed(r['after_advance_gflop'], 2)} GFLOP ({fixed(r['advance_after_over_before'], 3)}x)",
        ],
    ]
    return markdown(["step", "median batch s (rounds)", "compile + first run", "XLA count of one advance step"], rows)


def fp8() -> str:
    r = Run("fp8-cpu-mid-256").summary
    pairs = [
        "bfloat16_vs_float32",
        "fp8_vs_float32",
        "fp8_vs_bfloat16",
        "fp8_calibrated_vs_float32",
        "fp8_calibrated_vs_bfloat16",
    ]
    rows = []
    for output, label in (("unet_one_call", "UNet, one call"), ("whole_image_pixels", "whole image")):
        rows.append([f"{label}: relative RMS", *(pct(r[f"{output}/{p}"]["rel_rms"]) for p in pairs)])
        of = " (of 1)" if output == "whole_image_pixels" else ""
        rows.append([f"{label}: max abs{of}", *(fixed(r[f"{output}/{p}"]["max_abs"], 3) for p in pairs)])
    headers = ["output", "bf16 vs float32", "FP8 dynamic vs float32", "FP8 dynamic vs bf16"]
    return markdown([*headers, "FP8 calibrated vs float32", "FP8 calibrated vs bf16"], rows)


def accelerator_flops() -> str:
    run = Run("accelerator-flops-sdxl-1024")
    g, r = run["count"]["gflop"], run["count"]

    def gflop(key: str) -> str:
        return f"{Decimal(fixed(g[key], 2)):,}"

    rows = [
        [
            "begin, guided (both text encoders on prompt and negative, the cross-attentions' keys and values once)",
            gflop("begin"),
        ],
        [
            "advance, guided, one step (2 UNet rows)",
            f"{gflop('advance')} ({fixed(g['advance'] / 2 / 1000, 3)} TFLOP per UNet row and step)",
        ],
        ["begin, guidance-free", gflop("begin-free")],
        ["advance, guidance-free, one step (1 row)", gflop("advance-free")],
        ["finish: the VAE decode to uint8", gflop("finish-uint8")],
        [
            bold("one image, 20 guided steps (40 UNet rows)"),
            bold(f"{fixed(r['tflop_per_image_guided_20_steps'], 2)} TFLOP"),
        ],
        ["one image, 4 guidance-free steps (4 rows)", f"{fixed(r['tflop_per_image_free_4_steps'], 2)} TFLOP"],
    ]
    return markdown(["program (one image)", "GFLOP"], rows)


TABLES: dict[str, Callable[[], str]] = {
    "engine-own-model": engine_own_model,
    "precision": precision,
    "start-weight-cache": start_weight_cache,
    "convert": convert,
    "imports": imports,
    "service": service,
    "images": images,
    "retention": retention,
    "redis-wait": redis_wait,
    "datasets": datasets,
    "progress": progress,
    "preview": preview,
    "sampling": sampling,
    "lora": lora,
    "control": control,
    "step-count": step_count,
    "step-time": step_time,
    "fp8": fp8,
    "accelerator-flops": accelerator_flops,
}


def render(text: str) -> str:
    """The page with every marked table rendered afresh; a marker naming no table is an error."""

    def table(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"docs/benchmarks.md marks a table {name!r} that bench/tables.py does not render")
        return match.group(1) + TABLES[name]() + match.group(4)

    return MARKED.sub(table, text)


def differing(text: str) -> list[str]:
    """The names of the marked tables whose text differs from their rendering."""
    return [m["name"] for m in MARKED.finditer(text) if m["body"] != TABLES[m["name"]]()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = p.parse_args()
    text = DOC.read_text()
    if args.check:
        stale = differing(text)
        if stale:
            sys.exit(f"docs/benchmarks.md: tables differ from bench/results: {', '.join(stale)}")
        return
    DOC.write_text(render(text))


if __name__ == "__main__":
    main()
