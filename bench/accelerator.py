"""The accelerator run (issue 30, part 1), built around its time: one command, at most 420 s on one H200, every
figure added to $OUT/results.json the moment it is measured. bench/accelerator.sh installs the carried wheels
and runs this; docs/benchmarks.md has the exact device command.

    python bench/accelerator.py --out $OUT/results.json --budget-s 395          # the run (SDXL, 1024x1024)
    python bench/accelerator.py --dry-run --out /tmp/results.json               # the same, CPU, tiny size
    python bench/accelerator.py count --out bench/results/accelerator-flops-sdxl-1024.json   # on the CPU

The figures, in this order (bench/accelerator_parts.py runs them):
 a. ours, bf16, 1024x1024, 20 Euler steps, guidance 5, batch 8: s/image, fraction of bf16 peak, memory;
 b. ours at batch 1 and 4;
 c. ours guidance-free, 4 trailing Euler steps (a Lightning-class job), batch 8;
 d. FP8 (SDXL_QUANTIZE=fp8), batch 8, its pixel difference against (a) on the same seeds;
 e. PyTorch diffusers on the same random weights (the same folder), batch 8: a process of its own, so the two
    frameworks' allocators never share the device;
 f. the seed's Flax path (bench/seed_path.py) at batch 8, only if SEED_MIN_S remain.
a-d run in one JAX process; this one (the orchestrator) never touches the device: it writes the model folder
(random fp16 safetensors, as SDXL base's fp16 variant is downloaded), starts each process with its deadline,
and writes a `skipped` entry, with the reason, for every figure that did not come.

results.json is a bench/harness.py result file: the scenario is the plan and the budget, the environment is
gathered here when the run starts (on the device, which has no .git, the commit and dirty flag come from
.wheels/provenance.json, written by `bench/accelerator.sh prepare`; the JAX process fills in the devices), and
`results` holds, in the order written, each figure as FIGURE_KEYS (after the harness' `figure` name) and the
run's own records: `setup` (nvidia-smi, the model folder), `flops`, `jax`, `stage 2`, `jax process`, `torch`,
`processes` (how each ended, the total). Each process reopens the file (ResultFile.resume) and adds to it; they
run one after another, never at once.

The budget (BUDGET_S, the worst case; the parts' deadlines are computed from the clock, so a part that starts late
gets less and one that cannot fit is skipped, never run over): the wheels' install is cut at 20 s by the shell
wrapper, this process is given what is left of the 420 s (less 5 s for the kill), and inside it the JAX process
ends by the time TORCH_S is left for PyTorch, which ends by its own deadline; the seed's path runs only if
SEED_MIN_S are left after that, and ends by the budget's end.

FLOPs are never counted on the device: XLA's cost analysis of the compiled programs' lowering on the CPU
(`count`: begin, one step of advance (a while loop's body is counted once), finish; batch 1), kept as a result
file, bench/results/accelerator-flops-<preset>-<size>.json, by `bench/accelerator.sh prepare`; per image = steps x
advance + begin + finish (the dry run's: bench/results/accelerator-flops-tiny-64.json). Where no file matches the
run, the JAX process counts on its CPU backend before anything is timed.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

TOTAL_S = 420  # the whole command, wheels included (the `run` tool's timeout_s leaves room above it)
# The worst case, stage by stage; it sums to TOTAL_S (tests/bench/test_accelerator.py checks it).
BUDGET_S = {
    "install the carried wheels (accelerator.sh: timeout 20)": 20,
    "the model folder, then the JAX process (a-d) until TORCH_S are left (more when the install was quicker)": 315,
    "the PyTorch process (e): TORCH_S - MARGIN_S; after it the seed's path (f), if SEED_MIN_S are left": 75,
    "this process' last writes (skipped entries, `processes`) after the last child's deadline: MARGIN_S": 5,
    "the kill's grace if this process overruns its own timeout (accelerator.sh: timeout -k 5)": 5,
}
TORCH_S = 80  # left for (e) and the last writes: imports, the fp16 folder loaded, 1 untimed + 2 timed calls at batch 8
# (H200 run 2: its PyTorch process took 48 s for batches 1, 4 and 8, 3 calls each, weights drawn on the GPU)
MARGIN_S = 5  # kept after the last child's deadline for this process' own last writes
CHILD_SLACK_S = 5  # a child plans to end this long before its deadline (its clock starts after its imports)
SEED_MIN_S = 90  # (f) starts only with this much left: the pipeline's load, its pmap compile, 3 calls
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100/H200 SXM dense, from NVIDIA's datasheet (sparsity halved)
PARTS = ("a", "b", "c", "d", "e", "f")
FLOPS_DIR = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Plan:
    """What a run measures; the dry run is the same plan at the tiny size."""

    preset: str = "sdxl"
    size: tuple[int, int] = (1024, 1024)
    steps: int = 20  # (a), (b), (d), (e), (f): Euler, guidance 5
    fast_steps: int = 4  # (c): trailing Euler, no guidance
    batch: int = 8  # (a), (c), (d), (e), (f)
    other_batches: tuple[int, ...] = (1, 4)  # (b)
    rounds: int = 3  # timed calls after one untimed call; their median is the figure
    torch_rounds: int = 2
    dtype: str = "bfloat16"  # every part's; the FP8 figure's too, below its quantized layers
    torch_s: float = TORCH_S  # the dry run's CPU needs longer for PyTorch's imports than the device's whole part

    @property
    def size_name(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


DEVICE_PLAN = Plan()
# One batch size throughout: (b) then reuses (a)'s engine, and the dry run compiles 10 programs, not 14 (the FP8
# engine still goes through the same path as (b)'s engines do on the device).
DRY_PLAN = Plan(
    preset="tiny",
    size=(64, 64),
    steps=2,
    fast_steps=2,
    batch=1,
    other_batches=(1, 1),
    rounds=1,
    torch_rounds=1,
    dtype="float32",
    torch_s=240,
)

# Every figure has these keys (null where they do not apply), so results from any run read the same way.
FIGURE_KEYS = (
    "part",  # a-f
    "name",  # what ran: ours/bf16/guided, ours/fp8/guided, torch/diffusers, ...
    "batch",
    "steps",
    "guided",
    "first_call_s",  # the untimed call (the seed's path: its compile)
    "rounds_s",
    "batch_s",  # median of rounds_s
    "s_per_image",
    "images_per_s",
    "tflop_per_image",  # XLA's count (see the module's docstring)
    "fraction_of_bf16_peak",  # tflop_per_image x images/s / PEAK_TFLOPS["bf16"]
    "peak_memory_gib",  # the process' peak device memory so far (it only grows)
    "program_memory_gib",  # XLA's memory analysis per compiled program: arguments + temporaries + outputs
    "compile_s",  # per program (those this figure compiled)
    "max_pixel_difference",  # (d): against (a)'s images, same rows and seeds, of 255
    "rms_pixel_difference",
    "skipped",  # why the figure is missing; null when measured
)


def figure(part: str, name: str, **values: Any) -> dict[str, Any]:
    unknown = set(values) - set(FIGURE_KEYS)
    if unknown:
        raise KeyError(f"not figure keys: {sorted(unknown)}")
    return {key: None for key in FIGURE_KEYS} | {"part": part, "name": name} | values


def add(results: harness.ResultFile, entry: dict[str, Any]) -> None:
    """A figure (FIGURE_KEYS) into the run's result file, named by its part, what ran and its batch."""
    batch = f", batch {entry['batch']}" if entry["batch"] else ""
    record(results, f"({entry['part']}) {entry['name']}{batch}", entry)


def record(results: harness.ResultFile, name: str, values: dict[str, Any]) -> None:
    """A record the moment it is measured: the harness rewrites the whole file through a rename."""
    results.add(name, values)
    print(f"{name}: " + json.dumps(values, default=str), flush=True)


def figures(results: harness.ResultFile) -> list[dict[str, Any]]:
    """The records of parts a-f (the others are the run's own: the model folder, the FLOP count, the stages)."""
    return [r for r in results.results if "part" in r]


def run_record(results: harness.ResultFile, name: str) -> dict[str, Any] | None:
    return next((r for r in results.results if r["figure"] == name), None)


def flops_file(plan: Plan) -> Path:
    return FLOPS_DIR / f"accelerator-flops-{plan.preset}-{plan.size[0]}.json"


# ---------------------------------------------------------------------------------------------- FLOPs


def count_gflop(m: Any, size: tuple[int, int]) -> dict[str, float]:
    """XLA's cost analysis of each program's lowering for one image (batch 1) on a CPU device: GFLOP of begin,
    one advance step and finish, guided and guidance-free. Only shapes are read (m's weights may be pending)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from worker.engine import attention
    from worker.engine.executables import Executables
    from worker.engine.program_kind import Part, ProgramKind, Role

    mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("data",))
    exe = Executables({Role.base: m}, mesh, 1, "einsum", attention.einsum)
    kinds = [ProgramKind(p, g) for g in (True, False) for p in (Part.begin, Part.advance)] + [ProgramKind(Part.finish)]
    return {str(kind): float(exe.lower(kind, *size).cost_analysis()["flops"]) / 1e9 for kind in kinds}


def tflop_per_image(gflop: dict[str, float], steps: int, guided: bool) -> float:
    suffix = "" if guided else "-free"
    return (steps * gflop[f"advance{suffix}"] + gflop[f"begin{suffix}"] + gflop["finish-uint8"]) / 1e3


def shapes_model(preset: str, dtype: Any) -> Any:
    """A preset's model with shapes for weights (nothing drawn): enough to lower and count."""
    import jax

    from worker.engine import model, tiny
    from worker.engine.model_source import SDXL_SCHEDULER

    root = Path(tempfile.mkdtemp(prefix=f"count-{preset}-"))
    tiny.write_configs(root, preset)
    configs = model.Configs.from_dicts(tiny.configs(preset), preset)

    def weights(part: str, shapes: Any, dt: Any) -> tuple[Any, str]:
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), shapes), "shapes"

    source = model.Source(f"shapes-{preset}", configs, root, SDXL_SCHEDULER, True, weights)
    return model.assemble(source, model.LoadOptions(dtype))


COUNT_METHOD = "XLA cost_analysis()['flops'] of each program lowered for one CPU device; advance: one step"


def count(plan: Plan, out: Path) -> None:
    """`count`: the FLOP file a run reads (`--dry-run`: the dry run's), one record, `count`."""
    import jax.numpy as jnp

    scenario = {"command": "count", "preset": plan.preset, "size": plan.size_name, "dtype": plan.dtype, "batch": 1}
    results = harness.ResultFile("accelerator", scenario, COUNT_METHOD, out)
    t0 = time.perf_counter()
    gflop = count_gflop(shapes_model(plan.preset, jnp.dtype(plan.dtype)), plan.size)
    values = {
        "gflop": gflop,
        "tflop_per_image_guided_20_steps": tflop_per_image(gflop, 20, True),
        "tflop_per_image_free_4_steps": tflop_per_image(gflop, 4, False),
        "count_s": time.perf_counter() - t0,
    }
    record(results, "count", values)


def counted_gflop(plan: Plan) -> dict[str, float] | None:
    """The kept count for the plan's size and dtype, if there is one."""
    path = flops_file(plan)
    if not path.exists():
        return None
    document = harness.load(path)
    scenario = document["scenario"]
    if (scenario["size"], scenario["dtype"]) != (plan.size_name, plan.dtype):
        return None
    return document["results"][0]["gflop"]


# ---------------------------------------------------------------------------------------------- orchestration


def model_folder(plan: Plan) -> tuple[Path, float]:
    """The preset as a diffusers folder of random fp16 safetensors in PyTorch's layout (what every part loads:
    the same weights for ours, PyTorch's and the seed's path), drawn in float32 on every core; not part of any
    figure."""
    import numpy as np

    from worker.engine import tiny

    folder = Path(tempfile.mkdtemp(prefix=f"sdxl-{plan.preset}-")) / "model"
    t0 = time.perf_counter()
    tiny.write(
        folder, preset=plan.preset, dtype=np.float16, variant="fp16", precision=np.float32, threads=os.cpu_count() or 1
    )
    return folder, time.perf_counter() - t0


def machine() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except subprocess.TimeoutExpired:
        return None


def left_s(budget_s: float) -> float:
    return budget_s - (time.perf_counter() - T0)


def child(args: argparse.Namespace, part: str, deadline_s: float, log: Path) -> str:
    """Run `--part part` in a process of its own, killed at deadline_s; returns how it ended."""
    if deadline_s < 2 * CHILD_SLACK_S:
        return f"not started: {deadline_s:.0f} s left"
    # the child plans to end CHILD_SLACK_S before it is killed: its clock starts after its own start-up
    cmd = [
        sys.executable,
        __file__,
        "--part",
        part,
        "--out",
        str(args.json),
        "--deadline-s",
        f"{deadline_s - CHILD_SLACK_S:.1f}",
    ]
    cmd += ["--dry-run"] if args.dry_run else []
    print(f"[{time.perf_counter() - T0:6.1f} s] {part}: {deadline_s:.0f} s", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            code = proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"killed at its deadline ({deadline_s:.0f} s)"
    return "ended" if code == 0 else f"exited {code} (see {log.name})"


def orchestrate(args: argparse.Namespace, plan: Plan) -> None:
    scenario = {
        "command": "run",
        "dry_run": args.dry_run,
        "plan": {**plan.__dict__, "size": plan.size_name},
        "budget_s": args.budget_s,
        "worst_case_s": BUDGET_S,
        "peak_tflops": PEAK_TFLOPS,
    }
    results = harness.ResultFile("accelerator", scenario, __doc__, args.json)  # commit, versions: gathered here
    folder, write_s = model_folder(plan)
    # the first record, so the file exists for the processes to resume: they read the folder's path from it
    record(results, "setup", {"nvidia_smi": machine(), "model_dir": str(folder), "model_folder_write_s": write_s})
    logs = args.json.parent
    ends: dict[str, str] = {}

    def after(process: str, parts: str, end: str) -> harness.ResultFile:
        """A `skipped` entry for each figure of `parts` that the process did not report, right after it ends."""
        ends[process] = end
        now = harness.ResultFile.resume(args.json)  # with what the process added
        done = [entry["part"] for entry in figures(now)]
        for part in parts:
            for _ in range(done.count(part), len(plan.other_batches) if part == "b" else 1):
                add(now, figure(part, f"part {part}", skipped=f"{process} process: {end}"))
        return now

    jax_s = left_s(args.budget_s) - plan.torch_s
    after("jax", "abcd", child(args, "jax", jax_s, logs / "jax.log"))
    after("torch", "e", child(args, "torch", min(plan.torch_s, left_s(args.budget_s)) - MARGIN_S, logs / "torch.log"))
    seed_s = left_s(args.budget_s) - MARGIN_S
    results = after(
        "seed",
        "f",
        child(args, "seed", seed_s, logs / "seed.log")
        if seed_s >= SEED_MIN_S
        else f"not started: {seed_s:.0f} s left of the {SEED_MIN_S} it needs",
    )
    record(results, "processes", {"ends": ends, "total_s": time.perf_counter() - T0})
    shutil.rmtree(folder.parent, ignore_errors=True)


def main() -> None:
    p = harness.parser(__doc__, output=("--out", "--json"))  # results.json (run) or the FLOP file (count)
    p.add_argument("command", nargs="?", default="run", choices=["run", "count"])
    p.add_argument("--dry-run", action="store_true", help="the same run on the CPU at the tiny size")
    p.add_argument("--budget-s", type=float, default=TOTAL_S - 25, help="this process' share of TOTAL_S")
    p.add_argument("--part", choices=["jax", "torch", "seed"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.json is None:
        p.error("--out is required")
    plan = DRY_PLAN if args.dry_run else DEVICE_PLAN
    if args.command == "count":
        return count(plan, args.json)
    if args.part:
        import accelerator_parts  # bench/ is on the path: this file's folder

        results = harness.ResultFile.resume(args.json)  # the orchestrator's, and the processes' before this one
        return accelerator_parts.run(args.part, plan, results, args.deadline_s)
    orchestrate(args, plan)


if __name__ == "__main__":
    main()
