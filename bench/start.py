"""Worker start-up: cold (empty compile cache) against warm (the cache the cold start wrote), in one run.

    python bench/start.py --model tiny --size 512x512 --batch 4
    python bench/start.py --model mid --size 256x256 --batch 4      # writes the mid preset as a folder once
    python bench/start.py --model sdxl --size 1024x1024 --batch 4 --dtype bfloat16 --rounds 2   # full SDXL
    python bench/start.py --model sdxl-file --size 1024x1024 --batch 4 --dtype bfloat16 --starts cold,warm

Method (docs/benchmarks.md): the real `python -m worker` process, a fresh embedded Valkey, local storage.
Time from process start to ready (Celery's "ready." line and the worker's heartbeat in Redis), four starts:
- cold: a new `SDXL_COMPILE_CACHE_DIR` (kept running until its converted weights are written);
- warm: the same folder (executables and converted weights from it), every file in the page cache, as for a
  restart on the same host;
- warm from disk: the same, with the model's and the cache's files evicted from the page cache first, as
  after a reboot (posix_fadvise; the disk's speed then bounds the weights);
- warm, converting: `SDXL_WEIGHT_CACHE=false`, the checkpoint in the page cache: executables from the cache,
  weights converted as before the weight cache existed.
`--starts` picks some of them (the cold one always runs). The worker's own log line gives the seconds of
building the modules, then of reading the weights and of compiling (or loading) the programs, which overlap.
Each start also records the worker process's resident memory at ready and its peak (VmHWM, mapped files'
pages included), and the peak over the served weights' bytes (the converted files' size); a start the worker
refuses (its host-memory check) or that dies is recorded with its log's tail.
`--model mid` writes the `mid` preset (SDXL's topology at about a third of its widths, random weights) as a
diffusers folder of safetensors once, and the worker loads it like any folder: the load and the compile are
the real ones for a model of that size. `--model sdxl` is SDXL base's
architecture, written once the way most users download it (the fp16 variant, `SDXL_MODEL_VARIANT=fp16`);
`--model sdxl-file`, the same as one single-file checkpoint with the real one's names, shapes and vocabulary
(6.94 GB, bench/sdxl_file.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from common import redis_server  # noqa: E402
from tests.helpers.servers import WorkerProcess  # noqa: E402


def model_spec(name: str) -> tuple[str, str]:
    """(SDXL_MODEL, SDXL_MODEL_VARIANT) for a preset name or a folder. `sdxl-file`: a full-size single-file
    checkpoint of random weights, written once (bench/sdxl_file.py)."""
    if name in ("tiny",) or Path(name).exists():
        return name, ""
    if name == "sdxl-file":
        from bench import sdxl_file

        return str(sdxl_file.ensure()), ""
    import numpy as np

    from worker.engine import tiny

    variant = "fp16" if name == "sdxl" else ""  # 2.6 B UNet parameters: half precision, as on the hub
    folder = tiny.default_dir(name)
    if not (folder / "model_index.json").exists():
        print(f"writing the {name} preset to {folder} (once) ...", flush=True)
    tiny.ensure(folder, preset=name, dtype=np.float16 if variant else np.float32, variant=variant)
    return str(folder), variant


def start_once(env: dict[str, str], url: str, log: Path, cache: Path | None = None) -> dict[str, float]:
    """One worker start; with `cache`, wait for its converted weights to be written before stopping it."""
    worker = WorkerProcess(env, log)
    t0 = time.perf_counter()
    try:
        worker.start(url, "sdxl", timeout_s=1800)
    except RuntimeError as exc:  # refused (its memory check) or killed: what it said, and its peak
        return {"failed": str(exc)[-1500:], "returncode": worker.proc.returncode if worker.proc else None}
    wall = time.perf_counter() - t0
    at_ready = memory(worker.proc.pid)
    after_ready_s = wait_for_weight_cache(cache) if cache else 0.0
    peak = memory(worker.proc.pid)
    worker.stop()
    line = re.search(
        r"engine ready in ([\d.]+) s: .*; modules ([\d.]+) s, then weights ([\d.]+) s \((.*?)\), placed in "
        r"([\d.]+) s, and programs ([\d.]+) s side by side .*, then waited ([\d.]+) s for the weights",
        log.read_text(),
    )
    names = ("engine_s", "modules_s", "weights_s", "weights_from", "place_s", "programs_s", "weights_wait_s")
    rss = {
        "rss_at_ready_gb": at_ready["VmRSS"],
        "peak_rss_gb": peak["VmHWM"],
        "rss_file_at_ready_gb": at_ready["RssFile"],
    }
    if not line:
        return {"ready_s": round(wall, 2), **dict.fromkeys(names, -1.0), **rss}  # the log line changed: say so
    fields = {k: line[i + 1] if k == "weights_from" else float(line[i + 1]) for i, k in enumerate(names)}
    return {"ready_s": round(wall, 2), **fields, "weight_cache_written_after_ready_s": round(after_ready_s, 2), **rss}


def memory(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS, of which RssFile: mapped files) and at its peak (VmHWM), GB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssFile"):
            fields[key] = round(int(value.split()[0]) * 1024 / 1e9, 2)
    return fields


def page_cache(paths: list[Path], resident: bool) -> None:
    """Put the files in the page cache (read them through) or evict them (posix_fadvise DONTNEED, which needs
    no privileges for pages nobody maps): a restart finds them cached, the first start after a reboot not."""
    for path in paths:
        with open(path, "rb") as f:
            if resident:
                while f.read(64 << 20):
                    pass
            else:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def wait_for_weight_cache(folder: Path, timeout_s: float = 600) -> float:
    """Seconds until the cold start's background write of the converted weights is done (4 files, no
    temporary one): a worker that keeps running finishes it, one stopped at once would not."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        files = list(folder.rglob("weights/*.safetensors*"))
        if len(files) == 4 and not any(".tmp" in f.name for f in files):
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise TimeoutError(f"the converted weights were not written to {folder} in {timeout_s} s")


def main() -> None:
    p = harness.parser(__doc__, output=("--out", "--json"))
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", default="512x512")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=1, help="each round: a cold start, then the three warm ones")
    p.add_argument("--starts", default="cold,warm,warm_disk,warm_converting", help="which of the four, in order")
    args = p.parse_args()
    wanted = args.starts.split(",")
    result_file = harness.start("start", args, __doc__)
    spec, variant = model_spec(args.model)
    runs: dict[str, list[dict]] = {"cold": [], "warm": [], "warm_disk": [], "warm_converting": []}
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        work = Path(tmp)
        server = redis_server.start_embedded(work / "valkey")
        url = f"redis://127.0.0.1:{server.port}/0"
        source = [f for f in Path(spec).rglob("*") if f.suffix in (".safetensors", ".msgpack")]
        try:
            for r in range(args.rounds):
                cache = work / f"cache-{r}"
                env = {
                    "SDXL_REDIS_URL": url,
                    "SDXL_MODEL": spec,
                    "SDXL_MODEL_VARIANT": variant,
                    "SDXL_IMAGE_SIZES": args.size,
                    "SDXL_BATCH_ROWS": str(args.batch),
                    "SDXL_DTYPE": args.dtype,
                    "SDXL_COMPILE_CACHE_DIR": str(cache),
                    "SDXL_LOCAL_STORAGE_DIR": str(work / "images"),
                    "SDXL_DATASET_FEEDER": "false",
                }
                page_cache(source, resident=True)
                runs["cold"].append(start_once(env, url, work / f"cold-{r}.log", cache=cache))
                print(f"round {r} cold: {runs['cold'][-1]}", flush=True)
                converted = list(cache.rglob("weights/*.safetensors"))
                weights_gb = sum(f.stat().st_size for f in converted) / 1e9
                if "warm" in wanted:
                    page_cache(source + converted, resident=True)
                    runs["warm"].append(start_once(env, url, work / f"warm-{r}.log"))
                if "warm_disk" in wanted:
                    page_cache(source + converted, resident=False)
                    runs["warm_disk"].append(start_once(env, url, work / f"warm-disk-{r}.log"))
                if "warm_converting" in wanted:
                    page_cache(source, resident=True)
                    off = env | {"SDXL_WEIGHT_CACHE": "false"}
                    runs["warm_converting"].append(start_once(off, url, work / f"warm-converting-{r}.log"))
                for name, results in runs.items():
                    if results:
                        print(f"round {r} {name}: {results[-1]}", flush=True)
                shutil.rmtree(cache)
        finally:
            server.stop()
    runs = {name: results for name, results in runs.items() if results}
    done = {name: [x for x in results if "ready_s" in x] for name, results in runs.items()}
    ready = {name: statistics.median(x["ready_s"] for x in ok) for name, ok in done.items() if ok}
    peak = {name: max(x["peak_rss_gb"] for x in ok) for name, ok in done.items() if ok}
    ratios = {
        f"{k}_over_cold": round(v / ready["cold"], 3) for k, v in ready.items() if k != "cold" and "cold" in ready
    }
    result = {
        "machine": f"{os.cpu_count()} cores",
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "median_ready_s": ready,
        **ratios,
        # the worker process's peak resident memory (VmHWM: mapped files' pages included), the largest of the rounds
        "peak_rss_gb": peak,
        "weight_cache_gb": round(weights_gb, 2),
        "peak_over_served_weights": {k: round(v / weights_gb, 3) for k, v in peak.items()} if weights_gb else {},
        "starts": runs,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "starts"}, indent=2))
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
