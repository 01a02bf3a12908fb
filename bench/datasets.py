"""Data set benchmark: Redis memory while a large data set runs, against enqueuing every line at once.

    python bench/datasets.py --lines 100000            # ~15 minutes on a 2-core machine
    python bench/datasets.py --lines 20000 --small 2000

Method (docs/benchmarks.md):
- Each phase gets its own fresh embedded Valkey, so `used_memory_peak` (the server's own high-water mark)
  belongs to that phase alone; baseline = used_memory before anything is submitted (API keys included).
- Naive: the same N lines as N job records plus N Celery messages on a queue nobody consumes, which is
  what enqueuing a whole file at once would hold. Peak memory above baseline.
- Feeder: the real stack (the API in this process, one `python -m worker` with the fixed-duration stand-in
  engine at 64x64, local storage) runs the data set to completion: peak above baseline, lines/s, shards.
  Run twice, with --small and --lines lines: bounded memory means the two peaks are about equal.
- The stand-in engine holds a simulated device for --batch-s per batch: the bench is about the queue and
  the feeder, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from common import redis_server  # noqa: E402
from tests.helpers.servers import WorkerProcess  # noqa: E402


def memory(r: redis.Redis) -> tuple[int, int]:
    info = r.info("memory")
    return int(info["used_memory"]), int(info["used_memory_peak"])


def lines_file(n: int) -> bytes:
    return b"".join(
        json.dumps({"id": f"img-{i:07d}", "prompt": f"a photo, variant {i}"}).encode() + b"\n" for i in range(n)
    )


def naive(n: int, work: Path) -> dict:
    """Every line as a job record and a Celery message at once (nobody consumes them)."""
    from common.job_store import JobStore
    from common.jobs import JobRequest
    from common.queue import TASK_GENERATE, make_celery
    from common.settings import Settings

    server = redis_server.start_embedded(work / "valkey-naive")
    url = f"redis://127.0.0.1:{server.port}/0"
    try:
        r = redis.Redis.from_url(url)
        base, _ = memory(r)
        settings = Settings(redis_url=url, url_signing_secret="b" * 32)
        store = JobStore(r, "bench")
        celery = make_celery(settings)
        t0 = time.perf_counter()
        with celery.producer_pool.acquire(block=True) as producer:
            for i in range(n):
                request = JobRequest(prompt=f"a photo, variant {i}", width=64, height=64, steps=2, seed=i)
                job_id = f"run-{i}-0"
                store.create_bulk(
                    job_id,
                    request,
                    "bench",
                    f"datasets/run/images/img-{i:07d}.png",
                    {"run": "run", "index": i, "id": f"img-{i:07d}", "line": i + 1},
                )
                celery.send_task(TASK_GENERATE, args=[job_id], queue="naive-bulk", producer=producer)
        _, peak = memory(r)
        return {
            "lines": n,
            "baseline_bytes": base,
            "peak_above_baseline_bytes": peak - base,
            "enqueue_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        server.stop()


def feeder(n: int, work: Path, args: argparse.Namespace) -> dict:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize, settings_from

    server = redis_server.start_embedded(work / f"valkey-feeder-{n}")
    url = f"redis://127.0.0.1:{server.port}/0"
    env = {
        "SDXL_REDIS_URL": url,
        "SDXL_MODEL": "standin",
        "SDXL_STANDIN_BATCH_S": str(args.batch_s),
        "SDXL_IMAGE_SIZES": "64x64",
        "SDXL_BATCH_ROWS": str(args.batch),
        "SDXL_BATCH_TIMEOUT_S": "0.05",
        "SDXL_DATASET_FEED_DEPTH": str(args.depth),
        "SDXL_LOCAL_STORAGE_DIR": str(work / f"storage-{n}"),
        "SDXL_URL_SIGNING_SECRET": "b" * 32,
        "SDXL_RATE_LIMIT_PER_MIN": "100000",
    }
    worker = WorkerProcess(env, work / f"worker-{n}.log")
    samples: list[int] = []
    stop = threading.Event()
    try:
        r = redis.Redis.from_url(url)
        worker.start(url, "sdxl", timeout_s=120)
        settings = settings_from(env)
        with TestClient(create_app(settings)) as client:
            authorize(client, settings, tenant="bench")
            base, _ = memory(r)

            def sample() -> None:
                while not stop.is_set():
                    samples.append(memory(r)[0])
                    stop.wait(0.25)

            threading.Thread(target=sample, daemon=True).start()
            t0 = time.perf_counter()
            options = {"defaults": {"width": 64, "height": 64, "steps": 2}, "seed": 1, "shard_size": 1000}
            resp = client.post(
                "/v1/datasets", files={"input": ("b.jsonl", lines_file(n))}, data={"options": json.dumps(options)}
            )
            assert resp.status_code == 202, resp.text
            run_id = resp.json()["id"]
            submit_s = time.perf_counter() - t0
            last = 0.0
            while True:
                run = client.get(f"/v1/datasets/{run_id}").json()
                if run["status"] == "completed":
                    break
                if time.perf_counter() - last > 30:
                    print(f"  {n}: {run['counts']['succeeded']} done, {run['images_per_s']} img/s", flush=True)
                    last = time.perf_counter()
                time.sleep(1)
            total_s = time.perf_counter() - t0
            stop.set()
            _, peak = memory(r)
            keys = r.dbsize()
            assert run["counts"]["succeeded"] == n, run
        return {
            "lines": n,
            "baseline_bytes": base,
            "peak_above_baseline_bytes": peak - base,
            "sampled_peak_above_baseline_bytes": max(samples) - base,
            "submit_s": round(submit_s, 1),
            "total_s": round(total_s, 1),
            "lines_per_s": round(n / total_s, 1),
            "shards": run["shards"],
            "keys_after": keys,
        }
    finally:
        stop.set()
        worker.stop()
        server.stop()


def main() -> None:
    p = harness.parser(__doc__, output=("--out", "--json"))
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--naive-lines", type=int, default=None, help="default: --lines")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batch-s", type=float, default=0.01)
    p.add_argument("--depth", type=int, default=256)
    args = p.parse_args()
    result = harness.start("datasets", args, __doc__)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as tmp:
        work = Path(tmp)
        results = {}
        print("naive enqueue ...", flush=True)
        results["naive"] = naive(args.naive_lines or args.lines, work)
        result.add("naive", results["naive"])
        print(results["naive"], flush=True)
        for n, name in ((args.small, "feeder_small"), (args.lines, "feeder_large")):
            print(f"feeder, {n} lines ...", flush=True)
            results[name] = feeder(n, work, args)
            result.add(name, results[name])
            print(results[name], flush=True)
    large, small, nv = results["feeder_large"], results["feeder_small"], results["naive"]
    peak = "peak_above_baseline_bytes"
    results["ratios"] = {
        "feeder_peak_large_over_small": round(large[peak] / small[peak], 2),
        "naive_peak_over_feeder_peak": round(nv[peak] / large[peak], 1),
    }
    result.add("ratios", results["ratios"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
