"""Redis restarts, for real: an embedded Valkey with an append-only file, stopped and started again on the
same port and data. Accepted jobs survive; a running worker, and the API's job-event subscription,
reconnect. The worker runs the stand-in engine (this is about the broker and the job store, not the model)."""

from __future__ import annotations

import signal

from fastapi.testclient import TestClient

from api.main import create_app
from common import redis_server
from common.keys import Keys
from tests.helpers.servers import WorkerProcess, authorize, free_port, settings_from, standin_env, wait_for

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


def test_redis_gone_between_record_and_message_strands_nothing(tmp_path):
    """The failure injected at the exact point: Redis stops inside the submit's send_task, after the record
    was stored. The answer is 202 (the job was stored, so it will run), the record waits in the outbox with
    no message, and once Redis is back a worker's sweep sends it: the job succeeds, the outbox is empty.
    (A submit that Redis refuses outright is a 503 with nothing stored: test_accepted_jobs_survive_...)"""
    import redis

    port, data = free_port(), tmp_path / "valkey"
    server = redis_server.start_embedded(data, port)
    url = f"redis://127.0.0.1:{port}/0"
    prefix, env = standin_env(url, tmp_path, "ob", SDXL_STANDIN_BATCH_S="0.5", SDXL_BATCH_TIMEOUT_S="0.2")
    settings = settings_from(env)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            authorize(client, settings)
            celery = client.app.state.services.celery
            send = celery.send_task

            def redis_dies_first(*args, **kwargs):
                nonlocal server
                server.stop()  # SIGTERM: the append-only file is flushed, as the record was stored
                return send(*args, **kwargs)

            celery.send_task = redis_dies_first  # this test's injection point, on this app's own producer
            answer = client.post("/v1/jobs", json=BODY)
            celery.send_task = send
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            server = redis_server.start_embedded(data, port)
            r = redis.Redis.from_url(url)
            assert r.zscore(Keys(prefix).outbox, job_id) is not None  # stored, its message never sent
            assert not any(job_id.encode() in m for m in r.lrange(f"{prefix}-q", 0, -1))
            worker.start(url, prefix, timeout_s=120)
            wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", timeout_s=60)
            assert r.zcard(Keys(prefix).outbox) == 0
            assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1
    finally:
        worker.stop(signal.SIGKILL)
        server.terminate()


def test_a_data_set_run_refused_mid_create_leaves_nothing_and_its_key_works_again(tmp_path):
    """Redis stops between the run's Idempotency-Key claim and its record (the failure injected there): the
    answer is 503, the input stored for the run is deleted, and the same request with the same key, once
    Redis is back, creates the run (the stranded claim does not answer 409 "expired")."""
    import json

    port, data = free_port(), tmp_path / "valkey"
    server = redis_server.start_embedded(data, port)
    url = f"redis://127.0.0.1:{port}/0"
    _, env = standin_env(url, tmp_path, "dr")
    settings = settings_from(env)
    lines = b"".join(json.dumps({"id": f"l{i}", "prompt": f"a hill {i}"}).encode() + b"\n" for i in range(3))
    files = {"input": ("prompts.jsonl", lines, "application/x-ndjson")}
    options = {"options": json.dumps({"seed": 5})}
    try:
        with TestClient(create_app(settings)) as client:
            authorize(client, settings)
            datasets = client.app.state.services.datasets
            create = datasets.create

            def redis_dies_first(*args, **kwargs):
                server.stop()
                return create(*args, **kwargs)

            datasets.create = redis_dies_first  # this test's injection point, on this app's own store
            refused = client.post("/v1/datasets", files=files, data=options, headers={"Idempotency-Key": "k1"})
            datasets.create = create
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            left = [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
            assert left == []  # the input chunks and the original upload were deleted
            server = redis_server.start_embedded(data, port)
            again = client.post("/v1/datasets", files=files, data=options, headers={"Idempotency-Key": "k1"})
            assert again.status_code == 202, again.text
            assert client.get("/v1/datasets").json()["total"] == 1
    finally:
        server.terminate()
