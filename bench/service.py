"""Service benchmark: the real stack (API over HTTP, Redis, a Celery worker process, an S3 server) measured
against its own engine alone, in one run.

    python bench/service.py --engine standin --size 1024x1024 --batch 4 --batch-s 2.33 --jobs 48
    python bench/service.py --engine tiny --size 256x256 --batch 4 --steps 4 --jobs 24
    python bench/service.py --engine /path/to/sdxl --variant fp16 --size 1024x1024 --steps 20 --jobs 32 \
        --cache-dir /path/to/warm/cache       # an accelerator: the real SDXL architecture, started warm

Method (docs/benchmarks.md):
- Servers: an embedded Valkey, SeaweedFS (`weed mini`; or a local folder behind the API's signed URLs with
  `--storage local`), the API under uvicorn, one `python -m worker` (any model: --engine).
- Engine alone: the same engine class, in this process, runs back-to-back full batches (dispatch the next
  before fetching the previous, as the worker does); images/s over the last N-1 batches.
- Saturation: N submitter threads post one-image PNG jobs as fast as the API answers until `--jobs` are
  in; throughput = images / (last finished_at - first started_at), from the job records' timestamps.
  Device busy fraction and batch fill from the worker's batch log over the same window.
- Low load: one job at a time, each submitted after the previous finished: latency = finished_at -
  created_at (server clocks, no polling error). A lone job waits `batch_timeout_s` for company. Its phases
  (medians): created -> running (delivery, admission, the batch timeout), running -> device done (dispatch
  and the device; the batch log's `at`), device done -> succeeded (copy off, encode, upload, record).
- What a client sees at low load, two ways alternating job by job: submit, then poll every --poll-s until
  the job has ended (the first poll at a random point of the first interval, as a real client's polls fall
  anywhere in a job's run); or submit with `Prefer: wait=55` (one request, answered when the job ends). Client
  latency = from sending the submit to holding the ended job's URLs; overhead = that minus the server's
  finished_at - created_at for the same job.
- Redis commands per job: INFO commandstats over the saturation phase / jobs (API with auth, Celery,
  worker), minus the benchmark's own waiting; a client's status polls come on top (~5 commands each).
- The stand-in engine (SDXL_MODEL=standin) is about the queue, not the model: it holds a simulated device
  for --batch-s per batch and returns real images, so encoding and upload are real work.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from common import redis_server  # noqa: E402
from common.api_keys import ApiKeyStore  # noqa: E402
from common.batch_log import BatchLog  # noqa: E402
from common.keys import Keys  # noqa: E402
from tests.helpers.servers import SeaweedS3, WorkerProcess, free_port  # noqa: E402

ENDED = ("succeeded", "failed", "canceled")


def percentile(values: list[float], q: float) -> float:
    # nearest rank, not harness.percentile's interpolation: the latencies reported since the first run used it
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def engine_alone(args: argparse.Namespace, batches: int) -> tuple[float, float]:
    """(images/s of the engine by itself, pipelined like the worker with 2 batches in flight; seconds for
    one batch alone, which is what a lone job waits for)."""
    from common.settings import Settings
    from worker.engine.engine import Row
    from worker.main import build_engine

    # the worker's own start (dtype and attention auto, its compile cache), in this process
    engine = build_engine(
        Settings(
            model=args.engine,
            model_variant=args.variant,
            image_sizes=args.size,
            batch_rows=args.batch,
            standin_batch_s=args.batch_s,
            compile_cache_dir=str(args.cache_dir),
        )
    )
    rows = [Row(f"prompt {i}", seed=i, steps=args.steps) for i in range(args.batch)]
    engine.generate(rows, *args.hw)  # warm
    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.generate(rows, *args.hw)
        alone.append(time.perf_counter() - t0)
    in_flight = [engine.dispatch(rows, *args.hw)]  # the worker keeps up to two batches in flight
    t0 = time.perf_counter()
    for _ in range(batches):
        in_flight.append(engine.dispatch(rows, *args.hw))
        in_flight.pop(0).fetch()
    in_flight.pop(0).fetch()
    batches += 1
    return batches * args.batch / (time.perf_counter() - t0), statistics.median(alone)


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--engine", default="standin", help="standin, tiny, or a diffusers model folder")
    p.add_argument("--variant", default="", help="the folder's weight files' variant (fp16), as SDXL_MODEL_VARIANT")
    p.add_argument("--cache-dir", type=Path, default=None, help="a compile cache to start from (default: a new one)")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batch-s", type=float, default=2.33, help="stand-in device seconds per batch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-timeout-s", type=float, default=0.5)
    p.add_argument("--jobs", type=int, default=48, help="jobs in the saturation phase")
    p.add_argument("--submitters", type=int, default=8)
    p.add_argument("--low-load-jobs", type=int, default=8, help="per client kind (polling, waiting)")
    p.add_argument("--poll-s", type=float, default=1.0, help="the polling client's interval")
    p.add_argument("--storage", choices=["s3", "local"], default="s3", help="s3: a SeaweedFS server (default)")
    args = p.parse_args()
    result_file = harness.start("service", args, __doc__)
    h, _, w = args.size.partition("x")
    args.hw = (int(h), int(w))

    if args.engine not in ("standin", "tiny") and not Path(args.engine).is_dir():
        p.error(f"--engine {args.engine!r}: neither standin, tiny, nor a model folder")
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    args.cache_dir = args.cache_dir or tmp / "xla"  # the worker's; the engine-alone run then starts warm
    valkey = redis_server.start_embedded(tmp / "valkey")
    redis_url = f"redis://127.0.0.1:{valkey.port}/0"
    s3 = SeaweedS3(tmp / "s3") if args.storage == "s3" else None
    if s3:
        s3.start()
        storage_env = s3.env()
    else:  # a local folder behind the API's signed URLs: PNG encoding stays real work, the upload a file write
        storage_env = {
            "SDXL_STORAGE": "local",
            "SDXL_LOCAL_STORAGE_DIR": str(tmp / "images"),
            "SDXL_URL_SIGNING_SECRET": "bench-secret-not-for-production",
        }
    api_port = free_port()
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_MODEL": args.engine,
        "SDXL_MODEL_VARIANT": args.variant,
        "SDXL_IMAGE_SIZES": args.size,
        "SDXL_BATCH_ROWS": str(args.batch),
        "SDXL_BATCH_TIMEOUT_S": str(args.batch_timeout_s),
        "SDXL_STANDIN_BATCH_S": str(args.batch_s),
        "SDXL_COMPILE_CACHE_DIR": str(args.cache_dir),
        "SDXL_PUBLIC_BASE_URL": f"http://127.0.0.1:{api_port}",
        **storage_env,
        # this measures throughput and latency, not the abuse limits (submitters post as fast as answered)
        "SDXL_RATE_LIMIT_PER_MIN": "1000000",
        "SDXL_MAX_QUEUED_PER_TENANT": "1000000",
    }
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(api_port), "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = WorkerProcess(env, tmp / "worker.log")
    result: dict[str, object] = {
        "engine": args.engine,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "storage": args.storage,
    }
    try:
        worker.start(redis_url, "sdxl")
        base = f"http://127.0.0.1:{api_port}"
        r = redis.Redis.from_url(redis_url)
        _, key = ApiKeyStore(r, "sdxl").create("bench")
        auth = {"Authorization": f"Bearer {key}"}
        client = httpx.Client(base_url=base, timeout=30, headers=auth)
        body = {"prompt": "a lighthouse", "width": args.hw[1], "height": args.hw[0], "steps": args.steps}

        def ended(job: dict) -> dict:
            """The job once it has ended: long polls (`?wait_s=`), each answered when it ends."""
            while job["status"] not in ENDED:
                response = client.get(f"/v1/jobs/{job['id']}", params={"wait_s": 55}, timeout=70)
                if response.status_code != 200:
                    raise RuntimeError(f"GET job {job['id']}: {response.status_code} {response.text[:200]}")
                job = response.json()
            return job

        def wait(ids: list[str]) -> list[dict]:
            return [ended({"id": job_id, "status": "unknown"}) for job_id in ids]

        phase = random.Random(0)

        def polled() -> dict:
            job = client.post("/v1/jobs", json=body).json()
            # A real client's polls fall at any point of a job's run (its wait in the queue varies); here every
            # job takes the same time, so the first poll comes at a random point of the first interval.
            time.sleep(phase.uniform(0, args.poll_s))
            job = client.get(f"/v1/jobs/{job['id']}").json()
            while job["status"] not in ENDED:
                time.sleep(args.poll_s)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            return job

        def waited() -> dict:
            return ended(client.post("/v1/jobs", json=body, headers={"Prefer": "wait=55"}, timeout=70).json())

        wait([client.post("/v1/jobs", json=body).json()["id"]])  # warm the whole path
        waited()

        # ---- low load: one job at a time, a polling client and a waiting client by turns
        low: list[float] = []
        low_jobs: list[dict] = []
        seen: dict[str, list[float]] = {"poll": [], "wait": []}
        overhead: dict[str, list[float]] = {"poll": [], "wait": []}
        for i in range(args.low_load_jobs):
            for mode, run in (("poll", polled), ("wait", waited))[:: 1 if i % 2 == 0 else -1]:
                t0 = time.perf_counter()
                job = run()
                client_s = time.perf_counter() - t0
                assert job["status"] == "succeeded", job
                low.append(job["finished_at"] - job["created_at"])
                low_jobs.append(job)
                seen[mode].append(client_s)
                overhead[mode].append(client_s - low[-1])

        # ---- saturation
        r.config_resetstat()
        ids: list[str] = []
        lock = threading.Lock()
        submit_s: list[float] = []

        def submitter(n: int) -> None:
            with httpx.Client(base_url=base, timeout=30, headers=auth) as c:
                for _ in range(n):
                    t0 = time.perf_counter()
                    job_id = c.post("/v1/jobs", json=body).json()["id"]
                    with lock:
                        ids.append(job_id)
                        submit_s.append(time.perf_counter() - t0)

        per = [args.jobs // args.submitters + (i < args.jobs % args.submitters) for i in range(args.submitters)]
        threads = [threading.Thread(target=submitter, args=(n,)) for n in per]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Wait on Redis directly (one pipelined HGET per job per second) and subtract those commands, so the
        # count is what the service itself spends per job: API, Celery, worker. Clients' polls are extra.
        own = 0
        while True:
            pipe = r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(Keys("sdxl").job(job_id), "status")
            states = pipe.execute()
            own += len(ids)
            if all(st in (b"succeeded", b"failed", b"canceled") for st in states):
                break
            time.sleep(1)
        stats = r.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k.startswith("cmdstat_")}
        calls["hget"] -= own
        for name in [n for n in calls if n.startswith(("config", "info"))]:  # the bench's own RESETSTAT, INFO
            del calls[name]
        commands = sum(calls.values())
        jobs = wait(ids)  # now read the records through the API
        assert all(j["status"] == "succeeded" for j in jobs), [j for j in jobs if j["status"] != "succeeded"][:1]
        first, last = min(j["started_at"] for j in jobs), max(j["finished_at"] for j in jobs)
        images = sum(len(j["images"]) for j in jobs)
        batches = [asdict(b) for b in BatchLog(r, "sdxl").recent()]
        # Where a lone job's time goes, from its record and its batch's log line (`at`: when the device was done)
        batch_of = {job_id: b for b in batches for job_id in b["jobs"]}
        phases = {"to_running": [], "running_to_device_done": [], "device_done_to_succeeded": []}
        for job in low_jobs:
            b = batch_of[job["id"]]
            phases["to_running"].append(job["started_at"] - job["created_at"])
            phases["running_to_device_done"].append(b["at"] - job["started_at"])
            phases["device_done_to_succeeded"].append(job["finished_at"] - b["at"])
        window = [b for b in batches if set(b["jobs"]) & set(ids)]
        sat_latency = [j["finished_at"] - j["created_at"] for j in jobs]
        result.update(
            service_images_per_s=images / (last - first),
            device_busy_fraction=sum(b["device_s"] for b in window) / (last - first),
            batch_fill=sum(b["rows"] for b in window) / (len(window) * args.batch),
            batches=len(window),
            saturation_p50_s=percentile(sat_latency, 50),
            saturation_p95_s=percentile(sat_latency, 95),
            saturation_p99_s=percentile(sat_latency, 99),
            submit_p99_ms=percentile(submit_s, 99) * 1000,
            low_load_p50_s=percentile(low, 50),
            low_load_p95_s=percentile(low, 95),
            low_load_p99_s=percentile(low, 99),
            **{f"low_load_{name}_p50_s": percentile(values, 50) for name, values in phases.items()},
            poll_s=args.poll_s,
            client_polling_p50_s=percentile(seen["poll"], 50),
            client_waiting_p50_s=percentile(seen["wait"], 50),
            client_waiting_over_polling=percentile(seen["wait"], 50) / percentile(seen["poll"], 50),
            client_polling_overhead_p50_s=percentile(overhead["poll"], 50),
            client_waiting_overhead_p50_s=percentile(overhead["wait"], 50),
            redis_commands_per_job=commands / len(jobs),
            redis_commands_per_job_by_name={
                name: round(n / len(jobs), 2) for name, n in sorted(calls.items(), key=lambda c: -c[1]) if n
            },
        )
    finally:
        worker.stop()
        api.terminate()
        if s3:
            s3.stop()
        valkey.stop()
    alone, one_batch_s = engine_alone(args, batches=max(3, args.jobs // args.batch // 2))
    result["engine_alone_images_per_s"] = alone
    result["service_over_engine"] = result["service_images_per_s"] / alone
    result["one_batch_alone_s"] = one_batch_s
    result["low_load_p50_target_s"] = one_batch_s + args.batch_timeout_s + 0.1
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
