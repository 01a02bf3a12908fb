"""The S3 server stopped during uploads, for real (SeaweedFS). The worker runs the fixed-duration stand-in
engine: these tests are about retries and delivery, not the model."""

from __future__ import annotations

import signal
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.helpers.servers import SeaweedS3, WorkerProcess, authorize, settings_from, standin_env, wait_for

BODY = {"prompt": "a kite", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def stack(redis_url, tmp_path, request):
    s3 = SeaweedS3(tmp_path / "s3", bucket="outage")
    s3.start()
    prefix, env = standin_env(
        redis_url, tmp_path, "so", SDXL_STANDIN_BATCH_S="2", SDXL_BATCH_TIMEOUT_S="1", **s3.env(), **request.param
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start(redis_url, prefix, timeout_s=120)
    settings = settings_from(env)
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        yield client, s3, worker
    worker.stop(signal.SIGKILL)
    s3.stop()


def jobs(client, ids):
    return [client.get(f"/v1/jobs/{i}").json() for i in ids]


@pytest.mark.parametrize("stack", [{"SDXL_UPLOAD_ATTEMPTS": "6", "SDXL_UPLOAD_BACKOFF_S": "0.5"}], indirect=True)
def test_a_short_outage_is_ridden_out_by_retries(stack):
    client, s3, _ = stack
    ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(4)]
    wait_for(lambda: {j["status"] for j in jobs(client, ids)} == {"running"})
    s3.stop()  # down before the batch's 2 s on the device end: every upload meets it
    time.sleep(5)
    s3.start()
    wait_for(lambda: {j["status"] for j in jobs(client, ids)} == {"succeeded"})
    assert all(j["attempts"] == 1 for j in jobs(client, ids))


@pytest.mark.parametrize(
    "stack",
    [{"SDXL_UPLOAD_ATTEMPTS": "2", "SDXL_UPLOAD_BACKOFF_S": "0.2", "SDXL_MAX_ATTEMPTS": "2"}],
    indirect=True,
)
def test_a_long_outage_fails_the_job_with_the_reason_and_never_leaves_it_running(stack):
    client, s3, _ = stack
    s3.stop()
    (job_id,) = [client.post("/v1/jobs", json=BODY).json()["id"]]
    wait_for(lambda: jobs(client, [job_id])[0]["status"] == "failed", timeout_s=120)
    (job,) = jobs(client, [job_id])
    assert job["attempts"] == 2  # requeued once after the first failed upload, then given up
    assert "upload failed" in job["error"] and "attempt 2 of 2" in job["error"]


@pytest.mark.slow
@pytest.mark.parametrize("stack", [{}], indirect=True)  # the default retry settings
def test_a_60_s_outage_under_load_loses_nothing_and_leaves_nothing_running(stack):
    """SeaweedFS down for 60 s while two batches upload: with the default settings every job succeeds once
    storage is back (uploads back off to 8 s between tries; a run that runs out of tries goes back to the
    queue), none is left running, and the worker logs the outage once, not once per retry."""
    client, s3, worker = stack
    ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(8)]
    wait_for(lambda: "running" in {j["status"] for j in jobs(client, ids)})
    s3.stop()
    time.sleep(60)
    s3.start()
    wait_for(lambda: {j["status"] for j in jobs(client, ids)} == {"succeeded"}, timeout_s=120)
    assert all(j["attempts"] <= 2 and len(j["images"]) == 1 for j in jobs(client, ids))
    log = worker.log_tail(200_000)
    assert log.count("uploads: storage unreachable") <= 2, log[-3000:]  # once per spell (a requeue may split it)
