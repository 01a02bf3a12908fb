"""Worker start-up: cold (empty compile cache) against warm (the cache the cold start wrote), in one run.

    python bench/start.py --model tiny --size 512x512 --batch 4
    python bench/start.py --model mid --size 256x256 --batch 4      # writes the mid preset as a folder once

Method (docs/benchmarks.md): the real `python -m worker` process, a fresh embedded Valkey, local storage.
Time from process start to ready (Celery's "ready." line and the worker's heartbeat in Redis), the first with
a new `SDXL_COMPILE_CACHE_DIR`, the second with the same folder; the worker's own log line gives model load
and compile (or executable load) seconds. `--model mid` writes the `mid` preset (SDXL's topology at about a
third of its widths, random weights) as a diffusers folder of safetensors once, and the worker loads it like
any folder: the load and the compile are the real ones for a model of that size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import redis_server  # noqa: E402
from tests.servers import WorkerProcess  # noqa: E402


def model_spec(name: str) -> str:
    if name in ("tiny",) or Path(name).exists():
        return name
    from worker.engine import tiny

    folder = tiny.default_dir(name)
    if not (folder / "model_index.json").exists():
        print(f"writing the {name} preset to {folder} (once) ...", flush=True)
        tiny.write(folder, preset=name)
    return str(folder)


def start_once(env: dict[str, str], url: str, log: Path) -> dict[str, float]:
    worker = WorkerProcess(env, log)
    t0 = time.perf_counter()
    worker.start(url, "sdxl", timeout_s=1800)
    wall = time.perf_counter() - t0
    worker.stop()
    line = re.search(r"load ([\d.]+) s, compile ([\d.]+) s", log.read_text())
    return {"ready_s": round(wall, 2), "model_load_s": float(line[1]) if line else -1,
            "compile_s": float(line[2]) if line else -1}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", default="512x512")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    spec = model_spec(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        work = Path(tmp)
        server = redis_server.start_embedded(work / "valkey")
        url = f"redis://127.0.0.1:{server.port}/0"
        env = {
            "SDXL_REDIS_URL": url, "SDXL_MODEL": spec, "SDXL_SIZES": args.size, "SDXL_BATCH_ROWS": str(args.batch),
            "SDXL_DTYPE": "auto", "SDXL_COMPILE_CACHE_DIR": str(work / "cache"),
            "SDXL_LOCAL_STORAGE_DIR": str(work / "images"), "SDXL_DATASET_FEEDER": "false",
        }  # fmt: skip
        try:
            cold = start_once(env, url, work / "cold.log")
            print("cold", cold, flush=True)
            warm = start_once(env, url, work / "warm.log")
            print("warm", warm, flush=True)
        finally:
            server.stop()
    result = {"machine": f"{os.cpu_count()} cores", "model": args.model, "size": args.size, "batch": args.batch,
              "cold": cold, "warm": warm, "warm_over_cold": round(warm["ready_s"] / cold["ready_s"], 3)}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
