"""Two ways to serve LoRA adapters without compiling, side by side on one workload: many adapters with Zipf
popularity, each job naming one.

    python bench/lora.py --preset mid --size 256x256 --batch 4 --jobs 24 --adapters 20 --rank 16 --slots 8 \
        --json bench/results/lora-cpu-mid-256.json

Method (docs/benchmarks.md, "LoRA adapters"): the preset's random weights (float32), `--adapters` random adapters
of rank `--rank` (kohya's layout, UNet and both text encoders), and `--jobs` jobs in a fixed arrival order, job j
naming adapter k with probability proportional to 1/k^1.1 (Zipf), at scale 0.8. The same jobs run four ways:
- `none`: no adapters, an engine without a bank: batches of `--batch` jobs in arrival order (the baseline);
- `bank_idle`: the same rows on an engine with the adapter bank but no row naming one (the bank's own cost);
- `bank`: what the engine does (worker/engine/lora.py): per-row low-rank factors (`--per-row` slots a row, the
  service's default SDXL_MAX_LORAS_PER_JOB, one used here) from a device-resident bank of `--slots` adapters
  (fewer than there are adapters, so the least recently used are replaced as the workload goes), batches in
  arrival order, full;
- `merged`: the other way: weights merged per adapter (W + scale * up @ down, on the host) and placed on the
  devices, a least-recently-used set of `--merged` merged weight sets kept there, and the jobs grouped by adapter
  so that a batch shares one: every job is known at once (a burst: the grouping's best case; jobs arriving over
  time would make smaller groups and more padding).
Each way runs once first (compiles, first loads), then `--rounds` rounds alternate them; the median time for the
whole workload and images/s are reported, with the ratio to `none`. Switch costs, timed alone: reading and
writing one adapter into a bank slot; merging one adapter into the weights and placing them. The `bank` and
`merged` images of each job are compared (largest uint8 difference).
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from tests.helpers.variants import write_random_lora  # noqa: E402  (the tests' random adapters)


def merge(params: dict[str, Any], chosen: Sequence[tuple[Any, float]]) -> dict[str, Any]:
    """The model's weights with adapters merged in (W + scale * up @ down), on the host: the other way to serve
    adapters (one weight set per adapter combination), measured against the bank here."""
    from worker.engine import convert

    flat = {part: convert.flatten(params[part]) for part in params}
    for adapter, scale in chosen:
        for (part, path), (down, up) in adapter.factors.items():
            kernel = flat[part][(*path, "kernel")]
            flat[part][(*path, "kernel")] = (kernel + scale * (up @ down).T.astype(kernel.dtype)).astype(kernel.dtype)
    return {part: convert.unflatten(tree) for part, tree in flat.items()}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--per-row", type=int, default=2, help="adapter slots per row (SDXL_MAX_LORAS_PER_JOB)")
    p.add_argument("--merged", type=int, default=2, help="merged weight sets kept on the devices")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    result_file = harness.start("lora", args, __doc__)

    import jax
    import numpy as np

    from bench.side_by_side import alternate, random_model
    from worker.engine import lora
    from worker.engine.engine import Adapters, Engine, Row

    w, h = (int(v) for v in args.size.split("x"))
    m = random_model(args.preset, "lora")
    folder = Path(tempfile.mkdtemp(prefix="lora-adapters-"))
    names = [f"adapter{k:02d}" for k in range(args.adapters)]
    for k, name in enumerate(names):
        write_random_lora(m, folder / f"{name}.safetensors", "kohya", args.rank, 1000 + k, alpha=args.rank / 2)
    rng = np.random.default_rng(7)
    popularity = 1 / np.arange(1, args.adapters + 1) ** 1.1
    chosen = [names[i] for i in rng.choice(args.adapters, args.jobs, p=popularity / popularity.sum())]
    scale = 0.8
    plain = Engine(m, [(h, w)], args.batch)
    path_of = lambda n: folder / f"{n}.safetensors"  # noqa: E731
    banked = Engine(m, [(h, w)], args.batch, adapters=Adapters(path_of, args.rank, args.slots, args.per_row))
    plain.compile()
    banked.compile()

    def row(j: int, adapter: str | None) -> Row:
        return Row(f"a picture number {j}", seed=j, steps=args.steps, loras=((adapter, scale),) if adapter else ())

    def in_order(engine: Engine, with_adapters: bool) -> list:
        out = []
        for start in range(0, args.jobs, args.batch):
            js = range(start, min(start + args.batch, args.jobs))
            out += list(engine.generate([row(j, chosen[j] if with_adapters else None) for j in js], h, w).images)
        return out

    host = m.params  # the weights the merged sets start from
    read = {name: lora.read(folder / f"{name}.safetensors", name, m) for name in set(chosen)}
    resident: collections.OrderedDict[str, object] = collections.OrderedDict()
    counts = {"merges": 0, "batches": 0}
    base_params = plain.params

    def merged() -> list:
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for j, name in enumerate(chosen):
            groups[name].append(j)
        out: dict[int, object] = {}
        for name, js in groups.items():
            if name in resident:
                resident.move_to_end(name)
            else:
                if len(resident) >= args.merged:
                    resident.popitem(last=False)
                # placed as the engine places its own (its projections fused: Engine.place)
                resident[name] = jax.block_until_ready(plain.place(merge(host, [(read[name], scale)])))
                counts["merges"] += 1
            # the engine's own weights swapped for the merged set (the plain program takes weights as an input)
            plain.params = resident[name]
            for start in range(0, len(js), args.batch):
                part = js[start : start + args.batch]
                out.update(zip(part, plain.generate([row(j, None) for j in part], h, w).images, strict=True))
                counts["batches"] += 1
        plain.params = base_params
        return [out[j] for j in range(args.jobs)]

    variants = {
        "none": lambda: in_order(plain, False),
        "bank_idle": lambda: in_order(banked, False),
        "bank": lambda: in_order(banked, True),
        "merged": merged,
    }
    result = alternate(variants, args.rounds)
    loads_before = banked.bank.loads
    # switch costs, timed alone
    fresh = [n for n in names if n not in banked.bank._resident][:3] or names[:3]
    t0 = time.perf_counter()
    for name in fresh:
        banked.adapter(name)
    jax.block_until_ready(banked.bank.tree)
    slot_s = (time.perf_counter() - t0) / len(fresh)
    t0 = time.perf_counter()
    for name in fresh:
        lora.read(folder / f"{name}.safetensors", name, m)
    read_s = (time.perf_counter() - t0) / len(fresh)
    t0 = time.perf_counter()
    for name in fresh[:2]:
        adapter = lora.read(folder / f"{name}.safetensors", name, m)
        jax.block_until_ready(plain.place(merge(host, [(adapter, scale)])))
    merge_s = (time.perf_counter() - t0) / 2
    diff = max(
        int(np.abs(a.astype(int) - b.astype(int)).max())
        for a, b in zip(result["outputs"]["bank"], result["outputs"]["merged"], strict=True)
    )
    median = result["median_s"]
    report = {
        "distinct_adapters_used": len(set(chosen)),
        "median_s": median,
        "timing": result["timing"],
        "images_per_s": {k: args.jobs / v for k, v in median.items()},
        "vs_none": {k: v / median["none"] for k, v in median.items()},
        "batches": {"in_order": -(-args.jobs // args.batch), "merged": counts["batches"] // (1 + args.rounds)},
        "merged_weight_sets_made": counts["merges"],
        "bank_slot_writes": loads_before,
        "switch_s": {"bank_read_and_write_slot": slot_s, "read_adapter_file": read_s, "merge_and_place": merge_s},
        "bank_vs_merged_max_uint8_diff": diff,
        "batch_s": result["batch_s"],
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("batch_s", "timing")}, indent=2))
    result_file.add("summary", report)


if __name__ == "__main__":
    main()
