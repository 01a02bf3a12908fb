"""The processes bench/accelerator.py starts, each ending by its deadline: `jax` (figures a-d), `torch` (e),
`seed` (f). Each reopens results.json (harness.ResultFile.resume), adds its figures to it as it measures them,
and a `skipped` entry, with the reason, for a figure that cannot finish before its deadline; beside them the
records of its own stages (`flops`, `jax`, `stage 2`, `jax process`, `torch`), named by what they hold.

JAX (a-d), compiling only what each figure runs (Engine.compile(programs=...)) and never while timing:
 1. the model folder loaded as the worker loads it (weights converted on a thread while (a)'s programs compile);
 2. (a): the guided programs and the uint8 decode for batch 8, compiled, then timed;
 3. the programs of (b) at batch 1 and 4, (c)'s guidance-free pair on (a)'s engine and (d)'s FP8 engine,
    compiled side by side on threads (XLA compiles off the GIL), as many of them, in that order, as (a)'s compile
    and run times say will fit; then each timed alone, in order.
Each timing: one untimed call, then the median of `rounds` calls, images fetched to the host (the call's end).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from accelerator import (
    PEAK_TFLOPS,
    Plan,
    add,
    count_gflop,
    counted_gflop,
    figure,
    figures,
    flops_file,
    record,
    run_record,
    tflop_per_image,
)

from bench import harness

T0 = time.perf_counter()
PROMPTS = [f"a photo of thing number {i}" for i in range(64)]
NAMES = {"c": "ours/bf16/free-trailing", "d": "ours/fp8/guided"}  # the others: ours/bf16/guided
# of the device's limit, left free by the largest-batch estimate (5% failed on the H200: 119 GiB asked at once)
HEADROOM = 0.10
PARALLEL_COMPILE = 1.9  # compiles side by side take this times one alone (H200 run 1: four at 70-93 s, one 47-50 s)


def run(part: str, plan: Plan, results: harness.ResultFile, deadline_s: float) -> None:
    {"jax": run_jax, "torch": run_torch, "seed": run_seed}[part](plan, results, deadline_s)


def timed(call: Callable[[], Any], rounds: int) -> tuple[float, list[float], Any]:
    """(the untimed first call's seconds, each timed call's seconds, the last call's result)."""
    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return first, times, out


def timing(batch: int, first: float, times: list[float], tflop: float | None) -> dict[str, Any]:
    batch_s = harness.Timing.of(times).median_s
    per_s = batch / batch_s
    fraction = tflop * per_s / PEAK_TFLOPS["bf16"] if tflop else None
    return {
        "batch": batch,
        "first_call_s": first,
        "rounds_s": times,
        "batch_s": batch_s,
        "s_per_image": batch_s / batch,
        "images_per_s": per_s,
        "tflop_per_image": tflop,
        "fraction_of_bf16_peak": fraction,
    }


# ---------------------------------------------------------------------------------------------- JAX: a-d


def run_jax(plan: Plan, results: harness.ResultFile, deadline_s: float) -> None:
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # as worker/main.py: diffusers' imports
    import jax
    import numpy as np

    from worker.engine import model
    from worker.engine.engine import Engine, Programs, Row
    from worker.engine.model_source import Quantize

    left = lambda: deadline_s - (time.perf_counter() - T0)  # noqa: E731
    dev = jax.devices()[0]
    dtype = np.dtype(plan.dtype)  # bf16; float32 on the dry run's CPU (XLA:CPU emulates bf16)
    options = model.LoadOptions(dtype, variant="fp16", background=True)  # no weight cache: nothing to flush
    # An engine streams its model's weights onto the devices and the model keeps none on the host (a full-size
    # start fits), so each engine gets its own load of the folder (cheap: read as the engine places it)
    load = lambda: model.load(run_record(results, "setup")["model_dir"], options)  # noqa: E731
    m = load()
    hw = plan.size

    # FLOPs: the file `bench/accelerator.sh prepare` keeps, else counted here on the CPU backend (shapes only)
    saved = counted_gflop(plan)
    if saved is not None:
        count = {"from": flops_file(plan).name, "gflop": saved, "count_s": None}
    else:
        t0 = time.perf_counter()
        count = {"from": "counted on this host's CPU backend", "gflop": count_gflop(m, hw)}
        count["count_s"] = time.perf_counter() - t0
    gflop = count["gflop"]
    record(results, "flops", count)

    def rows(n: int, steps: int, guided: bool) -> list[Row]:
        if guided:
            return [Row(PROMPTS[i], "blurry", seed=i, steps=steps) for i in range(n)]
        return [Row(PROMPTS[i], seed=i, steps=steps, guidance_scale=0.0, timestep_spacing="trailing") for i in range(n)]

    def memory(engine: Any, kinds: list[Any]) -> dict[str, float]:
        out = {}
        for kind in kinds:
            stats = engine.executable(*hw, kind).memory_analysis()
            if stats is not None:
                total = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
                out[str(kind)] = (total - stats.alias_size_in_bytes) / 2**30
        return out

    def peak_gib() -> float | None:
        stats = jax.devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None

    def measure(
        part: str, name: str, engine: Any, n: int, steps: int, guided: bool, compiled: dict, against: Any = None
    ) -> Any:
        first, times, out = timed(lambda: engine.generate(rows(n, steps, guided), *hw), plan.rounds)
        kinds = Programs.guided if guided else Programs.free
        programs = [k for k in (kinds | Programs.uint8).kinds() if k.part.value != "noise"]
        values = timing(n, first, times, tflop_per_image(gflop, steps, guided))
        values.update(steps=steps, guided=guided, peak_memory_gib=peak_gib(), compile_s=compiled)
        if against is not None:  # (d) against (a): the same rows and seeds
            diff = out.images.astype(np.float64) - against.images.astype(np.float64)
            values.update(
                max_pixel_difference=float(np.abs(diff).max()), rms_pixel_difference=float(np.sqrt(np.mean(diff**2)))
            )
        add(results, figure(part, name, **values, program_memory_gib=memory(engine, programs)))
        return out

    # (a): compiled while the weights are converted on a thread, then timed
    guided = Programs.guided | Programs.uint8
    t0 = time.perf_counter()
    main = Engine(m, [hw], plan.batch, attention="auto")
    main.compile(guided)
    compile_a_s = time.perf_counter() - t0
    jax_record = {"version": jax.__version__, "device": dev.device_kind, "platform": dev.platform, "dtype": plan.dtype}
    jax_record |= {"attention": main.attention, "load_and_compile_a_s": compile_a_s, "weights_s": m.weights_s}
    record(results, "jax", jax_record)
    t0 = time.perf_counter()
    a = measure("a", "ours/bf16/guided", main, plan.batch, plan.steps, True, dict(main.compile_s))
    per_image_s = (time.perf_counter() - t0) / (plan.rounds + 1) / plan.batch  # (a)'s call, per image

    # (b), (c), (d): what fits, compiled side by side, then timed one at a time
    def call_s(n: int, steps: int, guided: bool) -> float:  # a generous guess from (a)'s
        work = n * steps / plan.steps * (1.0 if guided else 0.5) * (1.5 if n < plan.batch else 1.0)
        return per_image_s * max(work, 1.0) + 1.0

    engines: dict[str, Any] = {}
    todo = [(f"b{i}", n, plan.steps, True) for i, n in enumerate(plan.other_batches)]  # keys: b0, b1, c, d
    todo += [("c", plan.batch, plan.fast_steps, False), ("d", plan.batch, plan.steps, True)]

    def build(key: str, n: int) -> tuple[Any, dict]:
        if key == "c":  # (a)'s engine: its guidance-free pair alone (the decode is compiled already)
            before = set(main.compile_s)
            main.compile(Programs.free | Programs.uint8)
            return main, {k: v for k, v in main.compile_s.items() if k not in before}
        if n == plan.batch and key != "d":
            return main, {}
        loaded = load()
        engine = Engine(
            dataclasses.replace(loaded, quantize=Quantize.fp8) if key == "d" else loaded, [hw], n, attention="auto"
        )
        engine.compile(guided)
        return engine, dict(engine.compile_s)

    # the last ones out until the rest fit; their `skipped` entries are written at their turn, in order
    need = lambda items: compile_a_s * PARALLEL_COMPILE + sum((plan.rounds + 1) * call_s(*i[1:]) for i in items)  # noqa: E731
    fitting, skips = list(todo), {}
    while fitting and need(fitting) > left():
        skips[fitting[-1][0]] = f"{need(fitting):.0f} s needed with those before it, {left():.0f} s left"
        fitting.pop()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(len(fitting), 1)) as pool:
        futures = {key: pool.submit(build, key, n) for key, n, *_ in fitting}
    for key, future in futures.items():
        try:
            engines[key] = future.result()
        except Exception as exc:  # one failed compile (FP8 on a chip without it) skips its figure alone
            skips[key] = f"compile failed: {type(exc).__name__}: {exc}"
    record(results, "stage 2", {"compile_s": time.perf_counter() - t0, "compiled": [key for key, *_ in fitting]})

    for key, n, steps, g in todo:
        name = NAMES.get(key, "ours/bf16/guided")
        if key not in skips and (plan.rounds + 1) * call_s(n, steps, g) > left():
            skips[key] = f"{left():.0f} s left"
        if key in skips:
            add(results, figure(key[0], name, batch=n, steps=steps, guided=g, skipped=skips[key]))
            continue
        engine, compiled = engines.pop(key)
        try:
            measure(key[0], name, engine, n, steps, g, compiled, against=a if key == "d" else None)
        except Exception as exc:
            add(results, figure(key[0], name, batch=n, steps=steps, guided=g, skipped=f"{type(exc).__name__}: {exc}"))
        if engine is not main:
            del engine
            gc.collect()
    estimate = largest_batch(results, dev)
    record(results, "jax process", {"largest_batch_estimate": estimate, "process_s": time.perf_counter() - T0})


def largest_batch(results: harness.ResultFile, dev: Any) -> dict[str, Any] | None:
    """The largest batch whose programs fit the device, from XLA's memory analysis of the bf16 guided programs
    measured (a, b): a batch's need is its largest program's (begin, the steps or the VAE decode: they run one after
    another), fitted linearly in the batch, against the device's limit less HEADROOM. An estimate: not run."""
    points = {}
    for entry in figures(results):
        if entry["name"] == "ours/bf16/guided" and entry["program_memory_gib"]:
            points[entry["batch"]] = max(entry["program_memory_gib"].values())
    limit = (dev.memory_stats() or {}).get("bytes_limit", 0) / 2**30
    if len(points) < 2:
        return None
    xs, ys = list(points), list(points.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    base = my - slope * mx
    batch = int((limit * (1 - HEADROOM) - base) / slope) if limit and slope > 0 else None
    return {
        "batch": batch,
        "gib_per_image": slope,
        "fixed_gib": base,
        "limit_gib": limit or None,
        "headroom": HEADROOM,
        "points_gib": points,
    }


# ---------------------------------------------------------------------------------------------- PyTorch: e


def run_torch(plan: Plan, results: harness.ResultFile, deadline_s: float) -> None:
    """diffusers' StableDiffusionXLPipeline (eager, its default attention: PyTorch's SDPA) from the same folder."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, plan.dtype)
    folder = Path(run_record(results, "setup")["model_dir"])
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16", torch_dtype=dtype)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    import diffusers

    record(
        results,
        "torch",
        {
            "version": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "load_s": time.perf_counter() - t0,
        },
    )
    n = plan.batch

    def call() -> None:
        pipe(
            prompt=PROMPTS[:n],
            negative_prompt=["blurry"] * n,
            num_inference_steps=plan.steps,
            guidance_scale=5.0,
            height=plan.size[0],
            width=plan.size[1],
            generator=[torch.Generator().manual_seed(i) for i in range(n)],
            output_type="np",
        )
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, times, _ = timed(call, plan.torch_rounds)
    gflop = (run_record(results, "flops") or {}).get("gflop")
    values = timing(n, first, times, tflop_per_image(gflop, plan.steps, True) if gflop else None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    add(results, figure("e", "torch/diffusers/eager", **values, steps=plan.steps, guided=True, peak_memory_gib=peak))


# ---------------------------------------------------------------------------------------------- seed: f


def run_seed(plan: Plan, results: harness.ResultFile, deadline_s: float) -> None:
    """The seed's path (bench/seed_path.py: diffusers 0.39's Flax pipeline, split_head_dim, pmap) on the folder."""
    try:
        import seed_path
        from diffusers import FlaxStableDiffusionXLPipeline  # noqa: F401  # transformers' Flax classes too
    except Exception as exc:
        add(results, figure("f", "seed/flax-pipeline", skipped=f"not importable here: {type(exc).__name__}: {exc}"))
        return
    folder = Path(run_record(results, "setup")["model_dir"])
    call = seed_path.build(folder, *plan.size, plan.batch, plan.steps, plan.dtype)
    first, times, _ = timed(call, plan.rounds)  # the first call compiles (pmap)
    gflop = (run_record(results, "flops") or {}).get("gflop")
    values = timing(plan.batch, first, times, tflop_per_image(gflop, plan.steps, True) if gflop else None)
    add(results, figure("f", "seed/flax-pipeline", **values, steps=plan.steps, guided=True))
