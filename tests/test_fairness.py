"""Fair queues across tenants: one tenant's backlog delays another's next job by at most a batch or two.

A real Redis, a real `python -m worker` process and the API in this process; the worker runs the fixed-duration
stand-in engine, because this test is about the order jobs are scheduled in, not the model."""

from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from common.api_keys import ApiKeyStore
from tests.helpers.servers import WorkerPool, settings_from, standin_env, wait_for

BODY = {"prompt": "a boat", "width": 64, "height": 64, "steps": 2}
BATCH_ROWS = 4
BACKLOG = 200


@pytest.fixture
def stack(redis_url, tmp_path):
    prefix, env = standin_env(
        redis_url,
        tmp_path,
        "fair",
        SDXL_STANDIN_BATCH_S="0.4",
        SDXL_BATCH_TIMEOUT_S="0.2",
        SDXL_BATCH_ROWS=str(BATCH_ROWS),
        SDXL_RATE_LIMIT_PER_MIN="100000",
    )
    settings = settings_from(env)
    pool = WorkerPool(env, redis_url, prefix, tmp_path)
    keys = ApiKeyStore(redis.Redis.from_url(redis_url), prefix)
    with TestClient(create_app(settings)) as client:
        yield client, pool.start, {t: keys.create(t, "tests")[1] for t in ("a", "b")}
    pool.close()


def test_one_tenants_backlog_delays_anothers_job_by_at_most_two_batches(stack):
    client, start_worker, key = stack
    a, b = ({"Authorization": f"Bearer {key[t]}"} for t in ("a", "b"))
    backlog = [client.post("/v1/jobs", json=BODY, headers=a).json()["id"] for _ in range(BACKLOG)]
    start_worker()  # the backlog is all queued when the worker starts taking jobs
    wait_for(lambda: client.get(f"/v1/jobs/{backlog[0]}", headers=a).json()["status"] == "succeeded", 60)
    submitted = time.time()
    late = client.post("/v1/jobs", json=BODY, headers=b).json()["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{late}", headers=b).json()["status"] == "succeeded", 60)
    started = client.get(f"/v1/jobs/{late}", headers=b).json()["started_at"]
    before = [client.get(f"/v1/jobs/{i}", headers=a).json() for i in backlog]
    ahead = [j for j in before if j["started_at"] is not None and submitted < j["started_at"] < started]
    # The worker holds two batches' worth of jobs when b submits (one on the device, one gathering): those go
    # first, then b's, taken in turn with a's; FIFO would start every job of a's backlog first.
    assert len(ahead) <= 2 * BATCH_ROWS, f"{len(ahead)} of tenant a's jobs started first"
    assert sum(j["status"] == "queued" for j in before) > BACKLOG // 2  # and the backlog was still there
