"""What live progress costs: the engine reporting every step against the same steps in one piece.

    python bench/progress.py --preset mid --size 256x256 --batch 4 --steps 20 \
        --json bench/results/progress-cpu-mid-256.json

Method (docs/benchmarks.md): the preset's random weights, float32, one engine per variant on the same
model, same rows (the same prompts and seeds), 20 Euler steps:
- `per_step`: progress_every_steps=1, the default: the steps run as 20 dispatches of the steps' program,
  and the progress of each is read (Pending.progress()) as the worker does;
- `one_chunk`: progress_every_steps=steps: one dispatch for all the steps (no progress until the end);
- `fused`: text encoders, every step and the decode in one jit (the engine before live progress existed).
Each is compiled and run once, then rounds alternate the three so that all see the same machine noise; the
median batch time of each is reported, with the ratios per_step / fused and one_chunk / fused (the cost of
progress, and of the three-part program alone). The images of the three are checked equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    result_file = harness.start("progress", args, __doc__)

    import jax
    import numpy as np

    from bench.side_by_side import alternate, random_model
    from worker.engine.arguments import AdvanceInputs, BeginInputs, Start
    from worker.engine.engine import Engine, Row
    from worker.engine.program_kind import Part, ProgramKind

    w, h = (int(v) for v in args.size.split("x"))
    m = random_model(args.preset, "progress")
    rows = [Row(f"a picture number {i}", seed=i, steps=args.steps) for i in range(args.batch)]
    per_step = Engine(m, [(h, w)], args.batch, progress_every_steps=1)
    one_chunk = Engine(m, [(h, w)], args.batch, progress_every_steps=args.steps)

    # The fused program: the same three parts composed in one jit (what the engine ran before).
    exe = one_chunk.executables
    parts = exe.program(ProgramKind(Part.begin))
    params, _, begin_args = exe.arguments(ProgramKind(Part.begin), h, w)
    *_, advance_args, _, stop_arg = exe.arguments(ProgramKind(Part.advance), h, w)
    r = one_chunk.rows_sharding

    def whole(params, begin, time_ids, tables, stop):
        state, text = parts.begin(params, None, begin)
        state, _ = parts.advance(params, None, state, AdvanceInputs(text, begin.scalars, time_ids, tables), 0, stop)
        return parts.finish(params, state, begin.scalars)

    fused_exe = (
        jax.jit(whole, out_shardings=(r, r))
        .lower(params, begin_args, advance_args.time_ids, advance_args.tables, stop_arg)
        .compile()
    )

    def run_fused() -> np.ndarray:
        e = one_chunk
        batch = e.inputs.build(rows, h, w)
        seeds = jax.device_put(batch.seeds, r)
        noise = e.executable(h, w, ProgramKind(Part.noise))(seeds)
        base = jax.device_put(batch.base, r)
        init, mask = e.constants.placeholder("init", h, w), e.constants.placeholder("mask", h, w)
        begin = BeginInputs(base.prompts, Start(noise, init, mask, init, seeds), base.scalars)
        stop = jax.device_put(np.int32(batch.base.steps), e.replicated)
        images, _ = fused_exe(e.params, begin, base.time_ids, base.tables, stop)
        return np.asarray(images)

    def run_per_step() -> np.ndarray:
        pending = per_step.dispatch(rows, h, w)
        seen = list(pending.progress())  # as the worker reads it
        assert seen == list(range(1, args.steps + 1)), seen
        return pending.fetch().images

    def run_one_chunk() -> np.ndarray:
        return one_chunk.generate(rows, h, w).images

    variants = {"per_step": run_per_step, "one_chunk": run_one_chunk, "fused": run_fused}
    ran = alternate(variants, args.rounds)
    first, images, times, med = ran["first_s"], ran["outputs"], ran["batch_s"], ran["median_s"]
    result = {
        "dtype": "float32",
        "compile_and_first_run_s": first,
        "batch_s": times,
        "median_batch_s": med,
        "timing": ran["timing"],
        "per_step_over_fused": med["per_step"] / med["fused"],
        "one_chunk_over_fused": med["one_chunk"] / med["fused"],
        "progress_cost_pct": 100 * (med["per_step"] / med["fused"] - 1),
        "images_equal": all(np.array_equal(images["fused"], images[n]) for n in variants),
    }
    print(json.dumps(result, indent=2))
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
