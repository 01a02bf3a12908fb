"""Load: 5,000 jobs from 50 concurrent clients over HTTP through the real API (uvicorn), Redis and a Celery
worker process. The engine is the fast stand-in (1 ms per 16-image batch, real 64x64 PNGs): this test is
about the queue, not the model. Every job must succeed exactly once."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import httpx
import redis

from common.api_keys import ApiKeyStore
from common.batch_log import BatchLog
from common.keys import Keys
from tests.helpers.servers import ApiProcess, WorkerProcess

JOBS, CLIENTS = 5000, 50


def test_5000_jobs_from_50_clients_each_succeed_exactly_once(redis_url, tmp_path):
    prefix = f"ld{uuid.uuid4().hex[:8]}"
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_MODEL": "standin",
        "SDXL_STANDIN_BATCH_S": "0.001",
        "SDXL_IMAGE_SIZES": "64x64",
        "SDXL_BATCH_ROWS": "16",
        "SDXL_BATCH_TIMEOUT_S": "0.05",
        "SDXL_LOCAL_STORAGE_DIR": str(tmp_path / "images"),
        "SDXL_URL_SIGNING_SECRET": "x" * 32,
        "SDXL_RATE_LIMIT_PER_MIN": "1000000",
        "SDXL_MAX_QUEUED_PER_TENANT": "100000",
    }
    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    _, key = ApiKeyStore(r, prefix).create("load")
    api = ApiProcess(env, tmp_path / "api.log")  # it sets SDXL_PUBLIC_BASE_URL to its own address
    api.start()
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.start(redis_url, prefix, timeout_s=120)
        base = api.url
        ids: list[str] = []
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                for i in range(n):
                    t0 = time.perf_counter()
                    resp = c.post("/v1/jobs", json={"prompt": f"p{i}", "width": 64, "height": 64, "steps": 1})
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if resp.status_code == 202:
                            ids.append(resp.json()["id"])
                        else:
                            errors.append(f"{resp.status_code} {resp.text[:100]}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(JOBS // CLIENTS,)) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submit_s = time.perf_counter() - t0
        assert not errors, errors[:3]
        assert len(ids) == len(set(ids)) == JOBS

        def unfinished() -> int:
            pipe = r.pipeline()
            for job_id in ids:
                pipe.hget(keys.job(job_id), "status")
            return sum(s != b"succeeded" for s in pipe.execute())

        deadline = time.monotonic() + 600
        while unfinished():
            assert time.monotonic() < deadline, f"{unfinished()} jobs not done"
            time.sleep(1)
        done_s = time.perf_counter() - t0

        pipe = r.pipeline()
        for job_id in ids:
            pipe.hmget(keys.job(job_id), "attempts", "created_at", "finished_at")
        records = pipe.execute()
        assert all(a == b"1" for a, _, _ in records)  # each ran once
        runs = [j for b in BatchLog(r, prefix).recent() for j in b.jobs]
        assert sorted(runs) == sorted(ids)  # each on the device exactly once, none lost
        latencies.sort()
        first = min(float(c) for _, c, _ in records)
        last = max(float(f) for _, _, f in records)
        report = {
            "jobs": JOBS,
            "clients": CLIENTS,
            "submit_p50_ms": 1000 * latencies[len(latencies) // 2],
            "submit_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "submits_per_s": JOBS / submit_s,
            "jobs_per_s_end_to_end": JOBS / (last - first),
            "wall_s": done_s,
        }
        print("\nload:", json.dumps({k: round(v, 1) for k, v in report.items()}))
    finally:
        worker.stop(signal.SIGKILL)
        api.stop()
