"""The whole service: the API (in-process), a real Redis, a real `python -m worker` process running the tiny
JAX engine on this CPU, and a real S3 server (SeaweedFS). Nothing is faked."""

from __future__ import annotations

import io
import re
import time
import uuid

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from common.batch_log import BatchLog, BatchRecord
from common.settings import Settings
from common.storage import S3Storage
from tests.helpers.metrics import samples
from tests.helpers.servers import WorkerProcess, authorize, settings_from, wait_for
from worker import images
from worker.image_retention import hour

BATCH_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def service(redis_url, s3, tiny_dir, compile_cache, tmp_path_factory):
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_MODEL": "tiny",
        "SDXL_TINY_DIR": str(tiny_dir),
        "SDXL_DTYPE": "float32",
        "SDXL_IMAGE_SIZES": "64x64,96x64",
        "SDXL_BATCH_ROWS": "4",
        "SDXL_BATCH_TIMEOUT_S": str(BATCH_TIMEOUT_S),
        "SDXL_COMPILE_CACHE_DIR": str(compile_cache),
        "SDXL_IMAGE_SWEEP_INTERVAL_S": "1",
        **s3.env(),
        "SDXL_S3_PREFIX": prefix,  # this module's objects alone: the image sweep lists them
    }
    worker = WorkerProcess(env, tmp_path_factory.mktemp("worker") / "worker.log")
    worker.start(redis_url, prefix)
    settings = settings_from(env)
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        yield client, settings, worker
    worker.stop()


def submit(client, **body) -> str:
    r = client.post("/v1/jobs", json={"prompt": "a red bicycle", "width": 64, "height": 64, "steps": 3, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait(client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s")


def batches_of(settings: Settings, job_ids: set[str]) -> list[BatchRecord]:
    entries = BatchLog(redis.Redis.from_url(settings.redis_url), settings.key_prefix).recent()
    return [e for e in entries if job_ids & set(e.jobs)]


def test_submit_poll_download(service):
    client, settings, _ = service
    job_id = submit(client, width=96, height=64, num_images=2, seed=1234, prompt="a lighthouse", steps=4)
    job = wait(client, job_id)
    assert job["status"] == "succeeded", job
    assert [i["seed"] for i in job["images"]] == [1234, 1235]
    assert job["expires_at"] == job["finished_at"] + settings.job_ttl_s  # the record and images go then
    for index, image in enumerate(job["images"]):
        assert f"/images/{hour(job['created_at'])}/{job_id}/{index}.png?" in image["url"]
        r = httpx.get(image["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "PNG" and im.size == (96, 64)
        params = images.read_parameters(r.content)
        assert params["prompt"] == "a lighthouse" and params["seed"] == image["seed"] and params["steps"] == 4
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]


def test_submit_with_prefer_wait_answers_with_the_images(service):
    client, _, _ = service
    body = {"prompt": "a red bicycle", "width": 64, "height": 64, "steps": 3, "seed": 7}
    r = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=55"})
    assert r.status_code == 200 and r.headers["Preference-Applied"] == "wait=55", r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["images"][0]["seed"] == 7  # one request, no polling
    assert httpx.get(job["images"][0]["url"]).status_code == 200
    again = client.get(f"/v1/jobs/{job['id']}", params={"wait_s": 30}).json()  # an ended job: answered at once
    assert again["status"] == "succeeded" and again["images"][0]["sha256"] == job["images"][0]["sha256"]


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_formats(service, fmt, pil):
    client, _, _ = service
    job = wait(client, submit(client, output_format=fmt))
    r = httpx.get(job["images"][0]["url"])
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == pil and im.size == (64, 64)


def test_eight_jobs_make_two_full_batches(service):
    client, settings, _ = service
    ids = {submit(client, seed=i) for i in range(8)}
    assert all(wait(client, i)["status"] == "succeeded" for i in ids)
    runs = batches_of(settings, ids)
    assert len(runs) == 2 and all(r.rows == 4 and r.padding == 0 for r in runs), runs


def test_three_jobs_make_one_padded_batch_after_the_timeout(service):
    client, settings, _ = service
    t0 = time.time()
    ids = {submit(client, seed=i) for i in range(3)}
    jobs = [wait(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    (run,) = batches_of(settings, ids)
    assert run.rows == 3 and run.padding == 1
    assert min(j["started_at"] for j in jobs) - t0 >= BATCH_TIMEOUT_S * 0.9  # it waited for company


def test_two_sizes_run_separately(service):
    client, settings, _ = service
    square = {submit(client, seed=i) for i in range(2)}
    wide = {submit(client, seed=i, width=96) for i in range(2)}
    assert all(wait(client, i)["status"] == "succeeded" for i in square | wide)
    runs = batches_of(settings, square | wide)
    assert len(runs) == 2
    assert {(r.height, r.width, frozenset(r.jobs)) for r in runs} == {
        (64, 64, frozenset(square)),
        (64, 96, frozenset(wide)),
    }


def test_cancel_while_queued_never_runs(service):
    client, settings, _ = service
    job_id = submit(client)  # alone: it waits BATCH_TIMEOUT_S for company before it can run
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.json()["outcome"] == "never_ran"
    time.sleep(BATCH_TIMEOUT_S + 2)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["started_at"] is None and job["attempts"] == 0
    assert batches_of(settings, {job_id}) == []


def test_cancel_while_running_discards_results(service):
    client, settings, _ = service
    job_id = submit(client, steps=150, num_images=4)  # a full batch: starts at once, runs for a while
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["outcome"] == "results_discarded"
    assert wait_batch(settings, job_id).jobs == [job_id]  # it did run on the device
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["images"] == []
    # the objects the worker uploaded were deleted again
    s3 = S3Storage(settings)
    for i in range(4):
        assert httpx.get(s3.url(f"images/{hour(job['created_at'])}/{job_id}/{i}.png", 60)).status_code == 404
    # and so was their folder: SeaweedFS lists an emptied folder until its marker goes
    wait_for(lambda: job_id not in s3.folders(f"images/{hour(job['created_at'])}"), timeout_s=10)


def test_the_worker_deletes_the_images_of_expired_jobs(service):
    client, settings, _ = service
    live = wait(client, submit(client))
    s3 = S3Storage(settings)
    old = hour(time.time() - 2 * settings.job_ttl_s)  # an hour whose records have all expired
    expired = [f"images/{old}/{uuid.uuid4().hex}/{i}.png" for i in range(3)]  # no record: long gone
    for key in expired:
        s3.put(key, b"png", "image/png")
    wait_for(lambda: not [k for k in s3.keys("images") if k in expired], timeout_s=30)  # swept every 1 s
    assert httpx.get(live["images"][0]["url"]).status_code == 200  # a live job's image stays


def wait_batch(settings: Settings, job_id: str, timeout_s: float = 120) -> BatchRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = batches_of(settings, {job_id})
        if runs:
            time.sleep(2)  # the finisher records the batch, then uploads and records the job
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("the batch never ran")


def test_signed_urls_refuse_tampering_and_expiry(service):
    client, settings, _ = service
    job = wait(client, submit(client))
    url = job["images"][0]["url"]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url.replace("Signature=", "Signature=f")).status_code == 403
    short = settings.model_copy(update={"url_expiry_s": 1})
    with TestClient(create_app(short)) as c:
        c.headers["Authorization"] = client.headers["Authorization"]
        expiring = c.get(f"/v1/jobs/{job['id']}").json()["images"][0]["url"]
    time.sleep(2.5)
    assert httpx.get(expiring).status_code == 403


def test_idempotent_resubmit_returns_the_same_job(service):
    client, _, _ = service
    body = {"prompt": "same", "width": 64, "height": 64, "steps": 2}
    a = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    b = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    assert a["id"] == b["id"]
    assert wait(client, a["id"])["status"] == "succeeded"


def test_readyz_with_a_live_worker(service):
    client, _, _ = service
    assert client.get("/readyz").json()["ready"] is True


def test_metrics_count_what_the_worker_ran(service):
    client, settings, _ = service
    # The tests above ran their batches on this one worker; its heartbeat (every 5 s) carries the counts.
    logged = BatchLog(redis.Redis.from_url(settings.redis_url), settings.key_prefix).recent()
    (name,) = {e.worker for e in logged}
    want = {
        "batches": len(logged),
        "rows": sum(e.rows for e in logged),
        "padding_rows": sum(e.padding for e in logged),
    }
    label = f'{{worker="{name}"}}'

    def counted() -> dict[str, float]:
        got = samples(client.get("/metrics").text)
        return {k: got.get(f"sdxl_worker_{k}_total{label}") for k in want}

    wait_for(lambda: counted() == want, timeout_s=20)
    got = samples(client.get("/metrics").text)
    assert got["sdxl_workers"] == 1 and got[f'sdxl_worker_jobs_total{{outcome="succeeded",worker="{name}"}}'] > 0
    assert got[f"sdxl_worker_device_seconds_total{label}"] > 0


def test_worker_logs_its_start_without_errors(service):
    _, _, worker = service
    log = worker.log_tail(200_000)
    ready = r"engine ready in [\d.]+ s: model tiny \(float32, weights sha256 [0-9a-f]{16}\), 1 devices, "
    assert re.search(ready + r"sizes 64x64,96x64, batch 4;", log)
    weights = r"then weights [\d.]+ s \(unet (checkpoint|converted cache), .*\), placed in [\d.]+ s"
    assert re.search(weights + r", and programs [\d.]+ s side by side .*, then waited [\d.]+ s for the weights", log)
    assert "Logging error" not in log and "Traceback" not in log
