"""Worker start-up: cold (empty compile cache) against warm (the cache the cold start wrote), in one run.

    python bench/start.py --model tiny --size 512x512 --batch 4
    python bench/start.py --model mid --size 256x256 --batch 4      # writes the mid preset as a folder once
    python bench/start.py --model sdxl --size 1024x1024 --batch 4 --dtype bfloat16   # full SDXL, 6.3 GB fp16

Method (docs/benchmarks.md): the real `python -m worker` process, a fresh embedded Valkey, local storage.
Time from process start to ready (Celery's "ready." line and the worker's heartbeat in Redis), the first with
a new `SDXL_COMPILE_CACHE_DIR`, the second with the same folder; the worker's own log line gives the seconds of
building the modules, then of reading the weights and of compiling (or loading) the programs, which overlap.
`--model mid` writes the `mid` preset (SDXL's topology at about a third of its widths, random weights) as a
diffusers folder of safetensors once, and the worker loads it like any folder: the load and the compile are
the real ones for a model of that size. `--model sdxl` is SDXL base's
architecture, written once the way most users download it (the fp16 variant, `SDXL_MODEL_VARIANT=fp16`).
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


def model_spec(name: str) -> tuple[str, str]:
    """(SDXL_MODEL, SDXL_MODEL_VARIANT) for a preset name or a folder."""
    if name in ("tiny",) or Path(name).exists():
        return name, ""
    import numpy as np

    from worker.engine import tiny

    variant = "fp16" if name == "sdxl" else ""  # 2.6 B UNet parameters: half precision, as on the hub
    folder = tiny.default_dir(name)
    if not (folder / "model_index.json").exists():
        print(f"writing the {name} preset to {folder} (once) ...", flush=True)
    tiny.ensure(folder, preset=name, dtype=np.float16 if variant else np.float32, variant=variant)
    return str(folder), variant


def start_once(env: dict[str, str], url: str, log: Path) -> dict[str, float]:
    worker = WorkerProcess(env, log)
    t0 = time.perf_counter()
    worker.start(url, "sdxl", timeout_s=1800)
    wall = time.perf_counter() - t0
    worker.stop()
    line = re.search(
        r"engine ready in ([\d.]+) s: .*; modules ([\d.]+) s, then weights ([\d.]+) s and programs ([\d.]+) s "
        r"side by side .*, waited ([\d.]+) s for the weights",
        log.read_text(),
    )
    names = ("engine_s", "modules_s", "weights_s", "programs_s", "weights_wait_s")
    return {"ready_s": round(wall, 2), **{k: float(line[i + 1]) if line else -1.0 for i, k in enumerate(names)}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", default="512x512")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    spec, variant = model_spec(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        work = Path(tmp)
        server = redis_server.start_embedded(work / "valkey")
        url = f"redis://127.0.0.1:{server.port}/0"
        env = {
            "SDXL_REDIS_URL": url, "SDXL_MODEL": spec, "SDXL_MODEL_VARIANT": variant, "SDXL_SIZES": args.size,
            "SDXL_BATCH_ROWS": str(args.batch), "SDXL_DTYPE": args.dtype, "SDXL_COMPILE_CACHE_DIR": str(work / "cache"),
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
              "dtype": args.dtype, "cold": cold, "warm": warm,
              "warm_over_cold": round(warm["ready_s"] / cold["ready_s"], 3)}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
