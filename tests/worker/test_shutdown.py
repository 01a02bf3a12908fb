"""SIGTERM and SIGKILL on a real worker process. The worker runs the fixed-duration stand-in engine: these
tests are about delivery (Celery, Redis, the device loop), not the model."""

from __future__ import annotations

import signal
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.keys import Keys
from tests.helpers.servers import WorkerPool, authorize, settings_from, standin_env, wait_for

BODY = {"prompt": "a boat", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def stack(redis_url, tmp_path, request):
    prefix, env = standin_env(redis_url, tmp_path, "sd", **request.param)
    settings = settings_from(env)
    pool = WorkerPool(env, redis_url, prefix, tmp_path)
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        yield client, pool.start
    pool.close()


def statuses(client, ids):
    return [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]


@pytest.mark.parametrize("stack", [{"SDXL_BATCH_TIMEOUT_S": "15"}], indirect=True)
def test_sigterm_finishes_the_batch_in_flight_and_requeues_the_rest(stack):
    client, start_worker = stack
    worker = start_worker()
    running = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(4)]  # a full batch: on the device
    wait_for(lambda: statuses(client, running) == ["running"] * 4)
    buffered = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(2)]  # waits for company (15 s)
    time.sleep(1)
    t0 = time.monotonic()
    assert worker.stop(signal.SIGTERM, timeout_s=60) == 0
    assert time.monotonic() - t0 < 10  # did not wait out the 15 s batch timeout
    assert statuses(client, running) == ["succeeded"] * 4  # the batch in flight finished and was recorded
    assert statuses(client, buffered) == ["queued"] * 2  # given back, not lost, not failed
    start_worker()
    wait_for(lambda: statuses(client, buffered) == ["succeeded"] * 2, timeout_s=90)


# A short visibility timeout, so the test need not wait 5 minutes; it still exceeds what a live worker
# holds a job here (1 s batch timeout + two 3 s batches), as the settings demand.
@pytest.mark.parametrize("stack", [{"SDXL_BATCH_TIMEOUT_S": "1", "SDXL_VISIBILITY_TIMEOUT_S": "10"}], indirect=True)
def test_sigkill_mid_batch_loses_no_job(stack):
    client, start_worker = stack
    doomed = start_worker()
    ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(4)]
    wait_for(lambda: statuses(client, ids) == ["running"] * 4)
    doomed.stop(signal.SIGKILL)  # mid-batch: nothing recorded, nothing acknowledged
    t0 = time.monotonic()
    start_worker()
    # Redelivered after the visibility timeout (10 s here, + up to 5 s for kombu's sweep) and run again:
    # each job ends once, on attempt 2.
    wait_for(lambda: statuses(client, ids) == ["succeeded"] * 4, timeout_s=120)
    recovered_s = time.monotonic() - t0
    jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
    assert all(j["attempts"] == 2 and len(j["images"]) == 1 for j in jobs)
    assert recovered_s < 60, recovered_s


@pytest.mark.parametrize("stack", [{"SDXL_STANDIN_BATCH_S": "8"}], indirect=True)  # default delivery settings
def test_sigkill_mid_batch_with_a_second_worker_recovers_within_30_s(stack, redis_url):
    """The dead worker's jobs are sent again once its heartbeat lapses (15 s), not after Celery's visibility
    timeout (300 s by default): the second worker runs them, each once more, and the dead worker's own
    messages, redelivered late, would find them superseded (a newer generation)."""
    import redis

    client, start_worker = stack
    workers = [start_worker(), start_worker()]
    ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(4)]
    wait_for(lambda: statuses(client, ids) == ["running"] * 4)
    r = redis.Redis.from_url(redis_url)
    keys = Keys(client.app.state.services.settings.key_prefix)
    holders = {r.hget(keys.job(i), "worker").decode() for i in ids}
    doomed = next(w for w in workers if any(f"-{w.proc.pid}-" in name for name in holders))
    doomed.stop(signal.SIGKILL)  # mid-batch: nothing recorded, nothing acknowledged
    t0 = time.monotonic()
    wait_for(lambda: statuses(client, ids) == ["succeeded"] * 4, timeout_s=60)
    recovered_s = time.monotonic() - t0
    assert recovered_s < 30, recovered_s
    killed = [i for i in ids if f"-{doomed.proc.pid}-" in r.hget(keys.job(i), "worker").decode()]
    assert not killed  # each one finished on the live worker
    jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
    assert all(len(j["images"]) == 1 for j in jobs)
    gens = [int(r.hget(keys.job(i), "generation") or 0) for i in ids]
    moved = [j for j, g in zip(jobs, gens, strict=True) if g == 1]  # those the dead worker held
    assert moved and all(j["attempts"] == 2 for j in moved)
    print(f"recovered {recovered_s:.1f} s after the kill")
