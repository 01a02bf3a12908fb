"""Redis killed (SIGKILL) under a running worker, idle and busy, for 10 s and for 60 s: the worker rides it
out without a restart, /readyz is ready again within 15 s of Redis' return, and every accepted job and
every new one succeeds. Real processes: an embedded Valkey with its append-only file, a worker, the API.
The worker runs the stand-in engine: this is about surviving the outage, not the model."""

from __future__ import annotations

import signal
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common import redis_server
from tests.helpers.servers import WorkerProcess, authorize, free_port, settings_from, standin_env, wait_for

BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
AOF_FSYNC_S = 1.5  # appendfsync everysec: a SIGKILL may lose the last second of writes (docs/reliability.md)


def _ready_within(client: TestClient, timeout_s: float) -> float:
    """Seconds until /readyz answers 200; fails after timeout_s."""
    t0 = time.monotonic()
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=timeout_s, every_s=0.25)
    return time.monotonic() - t0


@pytest.mark.parametrize("down_s", [10, pytest.param(60, marks=pytest.mark.slow)])
def test_worker_rides_out_a_redis_outage(tmp_path, down_s):
    port, data = free_port(), tmp_path / "valkey"
    server = redis_server.start_embedded(data, port)
    url = f"redis://127.0.0.1:{port}/0"
    prefix, env = standin_env(url, tmp_path, "ro", SDXL_STANDIN_BATCH_S="2", SDXL_BATCH_TIMEOUT_S="0.2")
    settings = settings_from(env)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start(url, prefix, timeout_s=120)
    try:
        with TestClient(create_app(settings)) as client:
            authorize(client, settings)

            def status(ids: list[str]) -> list[str]:
                return [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]

            def outage() -> float:
                nonlocal server
                server.terminate()  # SIGKILL: no goodbye to any client
                assert client.get("/healthz").status_code == 200  # the API process itself is fine
                time.sleep(down_s)
                server = redis_server.start_embedded(data, port)
                return _ready_within(client, 15)

            # 1. busy: four batches' worth queued, Redis killed while the first runs on the "device" and the
            # worker holds 8 delivered, unacknowledged messages (Celery's concurrency: two batches). kombu
            # used to restore those as the lost connection closed, fail, and stop Celery for good: first,
            # as in the chaos run that found it (the worker's first outage).
            busy = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(16)]
            wait_for(lambda: "running" in status(busy), timeout_s=30)
            time.sleep(AOF_FSYNC_S)
            busy_ready_s = outage()
            later = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(2)]
            wait_for(lambda: status(busy + later) == ["succeeded"] * 18, timeout_s=120)

            # 2. idle
            ready_s = outage()
            fresh = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(2)]
            wait_for(lambda: status(fresh) == ["succeeded"] * 2, timeout_s=60)

            assert worker.proc is not None and worker.proc.poll() is None, "the worker must not have exited"
            log = worker.log_tail(200_000)
            assert "Exception in thread" not in log and "Unrecoverable error" not in log, log[-3000:]
            # one warning when the outage starts and one summary when it ends, per component: not a flood
            assert log.count("device loop: Redis unreachable") == 2, log[-3000:]
            assert log.count("device loop: Redis is back") == 2, log[-3000:]
            print(f"ready again {ready_s:.1f} s (idle) and {busy_ready_s:.1f} s (busy) after Redis returned")
    finally:
        worker.stop(signal.SIGKILL)
        server.terminate()
