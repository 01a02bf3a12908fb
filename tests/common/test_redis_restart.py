"""Redis restarts, for real: an embedded Valkey with an append-only file, stopped and started again on the
same port and data. Accepted jobs survive; a running worker, and the API's job-event subscription,
reconnect. The worker runs the stand-in engine (this is about the broker and the job store, not the model)."""

from __future__ import annotations

import signal

from fastapi.testclient import TestClient

from api.main import create_app
from common import redis_server
from tests.servers import WorkerProcess, authorize, free_port, settings_from, standin_env, wait_for

BODY = {"prompt": "a barn", "width": 64, "height": 64, "steps": 2}


def test_accepted_jobs_survive_a_redis_restart(tmp_path):
    port, data = free_port(), tmp_path / "valkey"
    server = redis_server.start_embedded(data, port)
    url = f"redis://127.0.0.1:{port}/0"
    prefix, env = standin_env(url, tmp_path, "rr", SDXL_STANDIN_BATCH_S="0.5", SDXL_BATCH_TIMEOUT_S="0.5")
    settings = settings_from(env)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            authorize(client, settings)
            status = lambda ids: [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]  # noqa: E731
            accepted = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(3)]  # no worker yet
            server.stop()
            assert client.post("/v1/jobs", json=BODY).status_code == 503  # down: refused, not lost
            server = redis_server.start_embedded(data, port)
            assert status(accepted) == ["queued"] * 3  # records and queue came back from the AOF
            worker.start(url, prefix, timeout_s=120)
            wait_for(lambda: status(accepted) == ["succeeded"] * 3)
            server.stop()  # again, under a running worker
            server = redis_server.start_embedded(data, port)
            later = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(2)]
            wait_for(lambda: status(later) == ["succeeded"] * 2)  # the worker reconnected by itself
            waited = client.post("/v1/jobs", json=BODY, headers={"Prefer": "wait=30"})
            assert waited.json()["status"] == "succeeded"  # the API's job-event subscription did too
    finally:
        worker.stop(signal.SIGKILL)
        server.stop()
