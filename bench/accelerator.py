"""One prepared accelerator benchmark (GPU or TPU), under 10 minutes, no network. Run by bench/accelerator.sh.

    python bench/accelerator.py --out $OUT/accelerator.json                      # full SDXL, 1024x1024
    python bench/accelerator.py --preset tiny --size 256x256 --steps 2 --batches 1,2 --out /tmp/a.json  # CPU check

The full SDXL architecture with random bf16 weights, 20 Euler steps, for each batch size: our engine
(diffusers' einsum attention, then jax.nn.dot_product_attention with cuDNN on NVIDIA), the reference's
path (diffusers' FlaxStableDiffusionXLPipeline, replicated params, jit=True), and PyTorch diffusers'
StableDiffusionXLPipeline (eager; torch.compile if time is left). Each measurement: compile/warm-up once,
then the median of --rounds calls. Seconds per image, images/s, fraction of the peak you pass (bf16 dense),
peak device memory. Results are written to --out after every step, so a run cut short still reports.

Memory per batch size comes from XLA's analysis of each compiled program (arguments: weights and inputs;
temporaries; outputs), which is exact for the program and independent of what ran before (the process-wide
`peak_bytes_in_use` only ever grows). The largest batch that fits is extrapolated from those figures
(temporaries grow linearly with the batch) against the device's `bytes_limit`, then, when time is left,
compiled and run once at that size to check it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def timed(run, rounds: int) -> tuple[float, float]:
    """(first call incl. compile, median of the next `rounds`) in seconds."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def jax_peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def program_memory(engine, hw: tuple[int, int]) -> dict[str, float]:
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
    batch = int((limit_gib * 0.95 - base) / slope) // devices * devices  # 5% headroom for the allocator
    return {"batch": batch, "gib_per_row": slope, "fixed_gib": base, "limit_gib": limit_gib, "headroom": 0.05}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl", choices=["tiny", "mid", "sdxl"])
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the chip (H100: 989)")
    p.add_argument("--budget-s", type=float, default=540, help="stop starting new measurements after this")
    p.add_argument("--skip", default="", help="comma list of: reference,torch,cudnn,torch_compile,verify_largest")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    start = time.perf_counter()
    h, _, w = args.size.partition("x")
    hw = (int(h), int(w))
    batches = [int(b) for b in args.batches.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"preset": args.preset, "size": args.size, "steps": args.steps, "rows": [], "errors": []}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2))

    def left() -> bool:
        return time.perf_counter() - start < args.budget_s

    def record(name: str, batch: int, first: float, med: float, flops: float | None, **extra: object) -> None:
        row = {"path": name, "batch": batch, "first_call_s": first, "batch_s": med, "s_per_image": med / batch,
               "images_per_s": batch / med, **extra}  # fmt: skip
        if flops and args.peak_tflops:
            row["fraction_of_peak"] = flops * batch / med / 1e12 / args.peak_tflops
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    import jax
    import jax.numpy as jnp

    from worker.engine import model
    from worker.engine.engine import Engine, Row

    dtype = model.resolve_dtype("auto")
    result.update(device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                  jax=jax.__version__, dtype=jnp.dtype(dtype).name)  # fmt: skip
    t0 = time.perf_counter()
    m = model.from_preset(args.preset, dtype)
    result["build_weights_s"] = time.perf_counter() - t0
    save()
    flops = None
    memory_points: list[tuple[int, dict[str, float]]] = []
    attentions = ["einsum"] + ([] if "cudnn" in skip or result["platform"] != "gpu" else ["cudnn"])
    for attention in attentions:
        for batch in batches:
            if not left():
                break
            try:
                engine = Engine(m, [hw], batch, attention=attention)
                if flops is None:
                    from engine import flops_per_image  # bench/engine.py

                    flops = flops_per_image(engine, args.steps)
                    result["tflop_per_image"] = flops / 1e12
                rows = [Row(f"a photo of thing number {i}", "blurry", seed=i, steps=args.steps) for i in range(batch)]
                first, med = timed(lambda: engine.generate(rows, *hw), args.rounds)  # noqa: B023
                memory = program_memory(engine, hw)
                if memory and attention == "einsum":
                    memory_points.append((batch, memory))
                record(f"ours/{attention}", batch, first, med, flops, peak_memory_gib=jax_peak_gib(), **memory)
            except Exception as exc:
                result["errors"].append(f"ours/{attention} batch {batch}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                save()
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30
    estimate = largest_batch(memory_points, limit, jax.device_count())
    result["largest_batch_estimate"] = estimate
    save()
    if estimate and estimate["batch"] > max(batches) and left() and "verify_largest" not in skip:
        try:  # check the estimate: compile and run once at that size
            engine = Engine(m, [hw], estimate["batch"])
            rows = [Row(f"thing {i}", "", seed=i, steps=args.steps) for i in range(estimate["batch"])]
            first, med = timed(lambda: engine.generate(rows, *hw), 1)
            record("ours/einsum/largest", estimate["batch"], first, med, flops, peak_memory_gib=jax_peak_gib(),
                   **program_memory(engine, hw))  # fmt: skip
            del engine
        except Exception as exc:
            result["errors"].append(f"largest batch {estimate['batch']}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            save()
    if "reference" not in skip:
        from engine import reference_pipeline  # bench/engine.py

        for batch in batches:
            if not left():
                break
            try:
                ref = reference_pipeline(m, args.steps, batch, *hw)
                first, med = timed(ref, args.rounds)
                record("reference/flax_pipeline_pmap", batch, first, med, flops, peak_memory_gib=jax_peak_gib())
            except Exception as exc:
                result["errors"].append(f"reference batch {batch}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                save()
    del m
    if "torch" not in skip and left():
        try:
            run_torch(args, hw, batches, skip, record, left, result, save)
        except Exception as exc:
            result["errors"].append(f"torch: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    result["total_s"] = time.perf_counter() - start
    save()


def run_torch(args, hw, batches, skip, record, left, result, save) -> None:
    """PyTorch diffusers on the same architecture (its own random init), same size, steps and batches."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from worker.engine import tiny

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    result["torch"] = {"version": torch.__version__, "device": device}
    folder = Path(tempfile.mkdtemp(prefix="torch-sdxl-"))
    tiny.write_configs(folder, args.preset)
    cfg = tiny.configs(args.preset)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device(device):
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**strip(cfg["vae"])),
            text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            unet=UNet2DConditionModel(**strip(cfg["unet"])),
            scheduler=EulerDiscreteScheduler.from_config(strip(tiny.SCHEDULER)),
        )
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    modes = ["eager"] + ([] if "torch_compile" in skip else ["compile"])
    for mode in modes:
        if mode == "compile":
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
        for batch in batches:
            if not left():
                return
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def run() -> None:
                pipe(prompt=[f"a photo of thing number {i}" for i in range(batch)],  # noqa: B023
                     negative_prompt=["blurry"] * batch, num_inference_steps=args.steps, guidance_scale=5.0,  # noqa: B023
                     height=hw[0], width=hw[1], output_type="np")  # fmt: skip
                if device == "cuda":
                    torch.cuda.synchronize()

            first, med = timed(run, args.rounds)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            record(f"torch/{mode}", batch, first, med, result.get("tflop_per_image", 0) * 1e12 or None,
                   peak_memory_gib=peak)  # fmt: skip


if __name__ == "__main__":
    main()
