"""One-off: bench/results/*.json from before bench/harness.py rewritten with its fixed keys. Each file's figures
keep the keys the migrated script still writes; the arguments it no longer repeats go to "scenario", the
machine and versions it recorded to environment.recorded; commit stays null (never inferred)."""

import json
import re
import sys
from pathlib import Path

ROOT = Path(sys.argv[1])
sys.path.insert(0, str(ROOT))
from bench import harness  # noqa: E402

ENV = {"machine", "jax", "flax", "device", "devices", "platform", "date", "commit", "python", "torch"}
SCENARIO = {
    "convert": ["rounds"],
    "images": ["size", "rounds"],
    "precision": ["preset", "size"],
    "fp8": ["preset", "size"],
    "progress": ["preset", "size", "batch", "steps", "rounds"],
    "sampling": ["preset", "size", "batch", "rounds"],
    "lora": ["preset", "size", "batch", "jobs", "adapters", "rank", "slots", "per_row", "steps", "rounds"],
    "engine": ["preset", "size", "batch", "steps"],
    "imports": ["rounds"],
}
KEEPS_ENV = {"start": {"machine"}}  # start.py's record is unchanged (its result writing alone was swapped)


def bench_of(name: str) -> str:
    return "engine" if name.startswith("step-count") else name.split("-")[0]


def convert(path: Path) -> dict:
    old = json.loads(path.read_text())
    bench = bench_of(path.stem)
    env_keys = ENV - KEEPS_ENV.get(bench, set())
    recorded = {k: old.pop(k) for k in list(old) if k in env_keys}
    scenario = {k: old.pop(k) for k in SCENARIO.get(bench, []) if k in old}
    if bench in ("convert", "images"):
        rows = old.pop("rows")
        key = ("cast", "tensor") if bench == "convert" else ("image", "encoder")
        results = [{"figure": f"{r[key[0]]} {r[key[1]]}", **r} for r in rows]
    elif bench == "precision":
        results = [{"figure": k, **v} for k, v in old.items()]
        old = {}
    elif bench == "retention":
        results = [{"figure": k, **v} for k, v in old.items()]
        scenario = {"images": old["s3"]["images_per_round"], "rounds": old["s3"]["rounds"]}
        old = {}
    elif bench == "datasets":
        rows, seconds = re.fullmatch(r"(\d+) rows x ([\d.]+) s", old.pop("stand-in batch")).groups()
        scenario = {"batch": int(rows), "batch_s": float(seconds), "depth": old.pop("feed depth")}
        results = [{"figure": k, **old.pop(k)} for k in ("naive", "feeder_small", "feeder_large", "ratios")]
    else:
        results = [{"figure": "summary", **old}]
        old = {}
    assert not old, (path, old)
    return {
        "bench": bench,
        "scenario": scenario,
        "environment": harness.dataclasses.asdict(harness.Environment.before_harness(recorded)),
        "method": None,
        "results": results,
    }


for path in sorted((ROOT / "bench" / "results").glob("*.json")):
    doc = json.loads(path.read_text())
    if isinstance(doc, dict) and tuple(doc) == harness.KEYS:
        continue
    harness.write_atomically(path, convert(path))
    print("converted", path.name)
