"""Engine benchmark: our compiled program against the reference's path, side by side, in one process.

    python bench/engine.py --preset tiny --size 512x512 --batch 4 --steps 20
    python bench/engine.py --preset sdxl --size 1024x1024 --batch 4 --peak-tflops 989   # an accelerator

Method (docs/benchmarks.md):
- Both paths read the same weights: the preset (random weights; `sdxl` is the full SDXL architecture) written
  once as a diffusers folder of safetensors, and run the same dtype, device(s), batch, size and steps
  (Euler). Ours: worker/engine (our own modules, `--attention`). The reference is the seed's own path,
  the blog's: diffusers 0.39's FlaxStableDiffusionXLPipeline with `split_head_dim=True`, replicated
  parameters, `jit=True` (pmap over the devices), in its own environment (.venv-reference, `scripts/setup.sh
  reference`), a child process driven one call at a time (bench/seed_path.py).
- Each path is compiled and run once (timed: "compile and first run", and their ratio); then rounds
  alternate ours / reference so both see the same machine noise; the median of each is reported, and the
  ratio reference / ours (> 1: ours is faster).
- Start-up: two fresh processes build the engine with a new persistent compile cache and executable store
  (as the worker does): the first compiles (cold), the second loads (warm). From process start to ready.
- FLOPs per image from XLA's cost analysis of the UNet (x steps), the text encoders and the VAE decode,
  each lowered alone (a while loop's trip count is not in XLA's count); the achieved fraction of a peak
  you give with --peak-tflops.

    python bench/engine.py --preset mid --size 256x256 --batch 4 --steps 20 --compare-step

--compare-step: the step before and after issue 30's lighter step, side by side in one process on one model:
`Engine(light_step=False)` (every cross-attention's keys and values projected at each step, q/k/v apart) and
`Engine(light_step=True)` (those keys and values once per batch in begin, q/k/v and k/v fused). Each engine
compiles its guided programs and runs once (timed apart), then rounds alternate before / after, one batch
each, so both see the same machine noise; medians, and the ratio before / after (> 1: the lighter step is
faster). Beside them XLA's count of one advance step of each (the loop's body is counted once) and of begin,
the saving the shapes predict (2 x UNet rows x 77 x d_context x inner for each cross-attention's k and v), and
the largest pixel difference between the two engines' images. With --count-only the counts alone, from the
preset's shapes (no weights drawn, nothing compiled): `--preset sdxl --size 1024x1024 --batch 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402


def _dtype(name: str):
    from worker.engine.model import resolve_dtype

    return resolve_dtype(name)


def from_preset(preset: str, dtype: Any, shapes_only: bool = False) -> Any:  # -> model.Model
    """A random model of a preset size (tiny, mid, sdxl) built in memory, no weight files: the weights are drawn
    per component as they are read, so a start-up measurement times what a worker's start does but no disk.
    shapes_only: their shapes instead (enough to lower and count)."""
    import jax

    from worker.engine import model, tiny
    from worker.engine.model_source import SDXL_SCHEDULER

    root = Path(tempfile.mkdtemp(prefix=f"sdxl-{preset}-"))
    tiny.write_configs(root, preset)
    configs = model.Configs.from_dicts(tiny.configs(preset), preset)

    def weights(part: str, shapes: Any, dtype: Any) -> tuple[Any, str]:
        if shapes_only:
            return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes), "shapes"
        return tiny.build_params(preset, dtype, parts=(part,))[part], "random"

    source = model.Source(f"random-{preset}", configs, root, SDXL_SCHEDULER, True, weights)
    return model.assemble(source, model.LoadOptions(dtype))


def start_only(args: argparse.Namespace) -> None:
    """Child process: time from start to a compiled engine, with the given compile cache."""
    t0 = time.perf_counter()
    from worker.engine import cache, compile_log
    from worker.engine.engine import Engine

    folder = cache.enable(args.cache_dir)
    counter = compile_log.install()
    m = from_preset(args.preset, _dtype(args.dtype))
    h, w = args.hw
    engine = Engine(m, [(h, w)], args.batch, aot_dir=folder / "executables")  # as worker/main.py does
    engine.compile()
    print(
        json.dumps(
            {
                "ready_s": time.perf_counter() - t0,
                "xla_compiles": counter.compiles,
                "executables_loaded": engine.aot_loaded,
            }
        )
    )


def measure_start(args: argparse.Namespace) -> dict[str, float]:
    cache_dir = tempfile.mkdtemp(prefix="bench-xla-")
    out = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--start-only", "--cache-dir", cache_dir, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"{label}_start_s"] = time.perf_counter() - t0
        out[f"{label}_ready_in_process_s"] = child["ready_s"]
        out[f"{label}_xla_compiles"] = child["xla_compiles"]
        out[f"{label}_executables_loaded"] = child["executables_loaded"]
    out["warm_over_cold"] = out["warm_start_s"] / out["cold_start_s"]
    return out


def flops_per_image(m, hw: tuple[int, int], batch: int, steps: int) -> float | None:
    """XLA's FLOP count for one image: `steps` UNet calls on the guided pair, the VAE decode, both text
    encoders (for prompt and negative). Only shapes are used (weights as abstract arguments, never
    constants), so `m.params` may be ShapeDtypeStructs. None where the backend counts only after compiling
    (JAX 0.11's CUDA backend): the count is the same on any backend, so take it from a CPU run."""
    import jax
    import jax.numpy as jnp

    b = batch
    f = m.vae_scale_factor
    c, lh, lw = m.latent_channels, hw[0] // f, hw[1] // f
    spec = jax.ShapeDtypeStruct
    params = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype), m.params)
    unet, vae = m.configs.module("unet", m.dtype), m.configs.module("vae", m.dtype_of("vae"))
    te1, te2 = m.configs.module("text_encoder", m.dtype), m.configs.module("text_encoder_2", m.dtype)
    u = jax.jit(lambda p, *x: unet.apply({"params": p}, *x)).lower(
        params["unet"],
        spec((2 * b, c, lh, lw), m.dtype),
        spec((2 * b,), jnp.float32),
        spec((2 * b, 77, m.unet.cross_attention_dim), m.dtype),
        spec((2 * b, m.unet.pooled_width), m.dtype),
        spec((2 * b, m.unet.time_ids), jnp.float32),
    )
    v = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode")).lower(
        params["vae"], spec((b, c, lh, lw), m.dtype)
    )
    te = jax.jit(lambda p1, p2, i: (te1.apply({"params": p1}, i), te2.apply({"params": p2}, i))).lower(
        params["text_encoder"], params["text_encoder_2"], spec((2 * b, 77), jnp.int32)
    )
    costs = [lowered.cost_analysis() for lowered in (u, v, te)]
    if any(cost is None or "flops" not in cost for cost in costs):
        return None
    unet_flops, vae_flops, te_flops = (float(cost["flops"]) for cost in costs)
    return (steps * unet_flops + vae_flops + te_flops) / b


def step_counts(args: argparse.Namespace, m: Any) -> dict[str, object]:
    """XLA's count of one advance step (guided) before and after the lighter step, and the saving the shapes
    predict; lowered only, so `m` may hold shapes for weights (from_preset(shapes_only=True))."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from worker.engine import attention, convert
    from worker.engine.executables import Executables
    from worker.engine.program_kind import Part, ProgramKind, Role

    out: dict[str, object] = {}
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    for name, light in (("before", False), ("after", True)):
        exe = Executables({Role.base: m}, mesh, args.batch, "einsum", attention.einsum, light_step=light)
        for part in (Part.advance, Part.begin):
            cost = exe.lower(ProgramKind(part), *args.hw).cost_analysis()
            out[f"{name}_{part}_gflop"] = float(cost["flops"]) / 1e9
    text = [
        leaf.shape
        for path, leaf in convert.flatten(m.params["unet"]).items()
        if path[-3:] in (("attn2", "to_k", "kernel"), ("attn2", "to_v", "kernel"))
    ]
    unet_rows = 2 * args.batch  # guided
    out["predicted_saving_gflop"] = sum(2 * unet_rows * 77 * d_context * inner for d_context, inner in text) / 1e9
    out["measured_saving_gflop"] = out["before_advance_gflop"] - out["after_advance_gflop"]
    out["advance_after_over_before"] = out["after_advance_gflop"] / out["before_advance_gflop"]
    return out


def compare_step(args: argparse.Namespace, m: Any) -> dict[str, object]:
    """--compare-step (see the module's docstring)."""
    import numpy as np

    from worker.engine.engine import Engine, Programs, Row

    rows = [Row(f"a photo of thing number {i}", "blurry", seed=i, steps=args.steps) for i in range(args.batch)]
    out = step_counts(args, m)
    engines, images = {}, {}
    for name, light in (("before", False), ("after", True)):
        engine = Engine(m, [args.hw], args.batch, attention=args.attention, light_step=light)
        t0 = time.perf_counter()
        engine.compile(Programs.guided | Programs.uint8)
        images[name] = engine.generate(rows, *args.hw).images
        out[f"{name}_compile_and_first_run_s"] = time.perf_counter() - t0
        engines[name] = engine
    out["max_pixel_difference"] = int(np.abs(images["before"].astype(int) - images["after"].astype(int)).max())
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):  # alternating, one batch each
        for name, engine in engines.items():
            t = time.perf_counter()
            engine.generate(rows, *args.hw)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        out[f"{name}_batch_s"] = statistics.median(ts)
        out[f"{name}_rounds_s"] = ts
    out["before_over_after"] = out["before_batch_s"] / out["after_batch_s"]
    return out


REFERENCE_PYTHON = ROOT / ".venv-reference" / "bin" / "python"


class SeedPath:
    """bench/seed_path.py in .venv-reference, on the same folder of weights, driven one call at a time."""

    def __init__(self, folder: Path, args: argparse.Namespace, dtype: str):
        if not REFERENCE_PYTHON.exists():
            raise SystemExit("no .venv-reference: run `scripts/setup.sh reference` first (or pass --no-reference)")
        cmd = [
            str(REFERENCE_PYTHON),
            str(ROOT / "bench" / "seed_path.py"),
            "--folder",
            str(folder),
            "--size",
            args.size,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--dtype",
            dtype,
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self._line()
        if not line.startswith("ready "):
            raise SystemExit(f"seed path did not start: {line}")
        self.ready = json.loads(line.removeprefix("ready "))

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"seed path exited with {self.proc.wait()}")
        return line.strip()

    def __call__(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._line())["batch_s"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "mid", "sdxl"])
    parser.add_argument("--size", default="512x512", help="HEIGHTxWIDTH")
    parser.add_argument("--batch", type=int, default=4, help="images per call (rows)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for the fraction")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--attention", default="auto", help="our engine's attention (worker/engine/attention.py)")
    parser.add_argument("--no-start", action="store_true", help="skip the cold/warm start measurement")
    parser.add_argument("--compare-step", action="store_true", help="the step before / after issue 30 part 2 only")
    parser.add_argument("--count-only", action="store_true", help="with --compare-step: XLA's counts, nothing run")
    parser.add_argument("--start-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    h, _, w = args.size.partition("x")
    args.hw = (int(h), int(w))
    if args.start_only:
        return start_only(args)

    import jax
    import numpy as np

    from worker.engine import model
    from worker.engine.engine import Engine, Row

    # commit, versions and devices: its environment; hw is size parsed, the other two the start child's
    result_file = harness.start("engine", args, __doc__, omit=("hw", "start_only", "cache_dir"))
    result: dict[str, object] = {}
    if not args.no_start and not args.compare_step:
        result.update(measure_start(args))
    dtype = _dtype(args.dtype)
    dtype_name = np.dtype(dtype).name
    result["dtype"] = dtype_name
    if args.compare_step and args.count_only:  # shapes only: the full SDXL is counted in a minute on a CPU
        result.update(step_counts(args, from_preset(args.preset, dtype, shapes_only=True)))
        return _report(result, result_file)
    # Both paths read the same weights: the preset written once as a diffusers folder of safetensors.
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{args.preset}-"))
    from worker.engine import tiny

    tiny.write(folder, preset=args.preset, precision=np.float32, threads=os.cpu_count() or 1)
    m = model.load_folder(folder, model.LoadOptions(dtype))
    if args.compare_step:
        result.update(compare_step(args, m))
        return _report(result, result_file)
    engine = Engine(m, [args.hw], args.batch, attention=args.attention)
    result["attention"] = engine.attention
    t0 = time.perf_counter()
    engine.compile()
    rows = [Row(f"a photo of thing number {i}", "blurry", seed=i, steps=args.steps) for i in range(args.batch)]
    engine.generate(rows, *args.hw)
    result["ours_compile_and_first_run_s"] = time.perf_counter() - t0

    def ours() -> float:
        t = time.perf_counter()
        engine.generate(rows, *args.hw)
        return time.perf_counter() - t

    runners = {"ours": ours}
    seed = None
    if not args.no_reference:
        seed = SeedPath(folder, args, dtype_name)
        result["reference_compile_and_first_run_s"] = seed.ready["compile_and_first_run_s"]
        runners["reference"] = seed
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):  # alternating, one call each: both see the same machine noise
        for name, run in runners.items():
            times[name].append(run())
    if seed is not None:
        seed.close()
    for name, ts in times.items():
        timing = harness.Timing.of(ts)
        med = timing.median_s
        result[f"{name}_timing"] = timing.to_json()
        result[f"{name}_batch_s"] = med
        result[f"{name}_s_per_image"] = med / args.batch
        result[f"{name}_images_per_s"] = args.batch / med
    if "reference" in times:
        result["speedup_vs_reference"] = result["reference_batch_s"] / result["ours_batch_s"]
        result["compile_ratio_reference_over_ours"] = (
            result["reference_compile_and_first_run_s"] / result["ours_compile_and_first_run_s"]
        )
    flops = flops_per_image(m, args.hw, args.batch, args.steps)
    if flops:
        result["tflop_per_image"] = flops / 1e12
        result["achieved_tflops"] = flops * result["ours_images_per_s"] / 1e12
        if args.peak_tflops:
            result["fraction_of_peak"] = result["achieved_tflops"] / args.peak_tflops
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_device_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    _report(result, result_file)


def _report(result: dict[str, object], result_file: harness.ResultFile) -> None:
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
