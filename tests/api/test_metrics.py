"""GET /metrics against a real Redis, with worker heartbeat records written as a worker writes them (no worker
runs here; tests/test_end_to_end.py reads a real worker's)."""

from __future__ import annotations

import redis
from pydantic import SecretStr

from common.keys import Keys
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerCounters, WorkerStatus
from tests.helpers.metrics import samples

GOOD = {"prompt": "a fox", "width": 96, "height": 64}
HANDSHAKES = tuple(f"cmdstat_{c}" for c in ("hello", "client|", "subscribe", "script|", "config|", "info"))


def test_metrics_show_the_queue_and_each_live_workers_counters(client, settings):
    r = redis.Redis.from_url(settings.redis_url)
    jobs = {"succeeded": 9, "failed": 1, "canceled": 0, "requeued": 0}
    counters = WorkerCounters(batches=3, rows=10, padding_rows=2, device_s=6.99, jobs=jobs)
    busy = WorkerStatus("host-a-1", "tiny", [(64, 96)], 4, 1, started_at=1000.0, at=1010.0, counters=counters)
    idle = WorkerStatus('odd "name"', "tiny", [(64, 96)], 4, 1, started_at=1005.0, at=1010.0)
    workers = WorkerRegistry(r, settings.key_prefix)
    workers.beat(busy, ttl_s=60)
    workers.beat(idle, ttl_s=60)
    r.set(Keys(settings.key_prefix).worker("from-an-older-version"), '{"model": "tiny"}', ex=60)  # skipped, not a 500
    for _ in range(3):
        assert client.post("/v1/jobs", json=GOOD).status_code == 202
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(r.text)
    assert got["sdxl_jobs_queued"] == 3 and got["sdxl_jobs_running"] == 0 and got["sdxl_workers"] == 2
    assert got['sdxl_worker_batches_total{worker="host-a-1"}'] == 3
    assert got['sdxl_worker_rows_total{worker="host-a-1"}'] == 10
    assert got['sdxl_worker_padding_rows_total{worker="host-a-1"}'] == 2
    assert got['sdxl_worker_device_seconds_total{worker="host-a-1"}'] == 6.99
    assert got['sdxl_worker_jobs_total{outcome="failed",worker="host-a-1"}'] == 1
    assert got['sdxl_worker_start_time_seconds{worker="host-a-1"}'] == 1000
    assert got['sdxl_worker_rows_total{worker="odd \\"name\\""}'] == 0  # label values escaped
    assert "api key" not in r.text.lower()


def test_metrics_and_healthz_answer_during_a_redis_outage(tmp_path, settings):
    """Redis killed under the API: /healthz stays 200, and /metrics stays 200 with the process' own figures
    and the last Redis figures marked stale (sdxl_redis_up 0, their age)."""
    import time

    from fastapi.testclient import TestClient

    from api.main import create_app
    from common import redis_server
    from tests.helpers.servers import authorize, free_port

    port = free_port()
    server = redis_server.start_embedded(tmp_path / "valkey", port)
    local = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    try:
        with TestClient(create_app(local)) as client:
            authorize(client, local)
            assert client.post("/v1/jobs", json=GOOD).status_code == 202
            before = samples(client.get("/metrics").text)
            assert before["sdxl_redis_up"] == 1 and before["sdxl_jobs_queued"] == 1
            server.terminate()
            time.sleep(0.2)
            assert client.get("/healthz").status_code == 200
            r = client.get("/metrics")
            assert r.status_code == 200
            during = samples(r.text)
            assert during["sdxl_redis_up"] == 0 and during["sdxl_jobs_queued"] == 1  # stale, and said so
            assert during["sdxl_redis_figures_age_seconds"] >= 0.2
            assert "sdxl_api_waiting_requests" in during
            assert client.post("/v1/jobs", json=GOOD).status_code == 503  # the job API itself refuses
    finally:
        server.terminate()


def test_request_latency_by_route_template_and_submits_by_size(client):
    job = client.post("/v1/jobs", json=GOOD).json()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert client.get("/v1/jobs/no-such-job").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    got = samples(client.get("/metrics").text)
    count = "sdxl_http_request_duration_seconds_count"
    assert got[f'{count}{{method="GET",route="/v1/jobs/{{job_id}}",status="200"}}'] >= 1  # the template, not the id
    assert got[f'{count}{{method="GET",route="/v1/jobs/{{job_id}}",status="404"}}'] >= 1
    assert got[f'{count}{{method="GET",route="unmatched",status="404"}}'] >= 1
    assert got[f'{count}{{method="POST",route="/v1/jobs",status="202"}}'] >= 1
    assert not any(job["id"] in name for name in got)
    assert got['sdxl_api_jobs_submitted_total{size="96x64"}'] >= 1


def test_several_api_processes_answer_one_sum(tmp_path, redis_url, key_prefix):
    """uvicorn --workers 2 with PROMETHEUS_MULTIPROC_DIR: whichever process answers a scrape counts every
    process' requests (prometheus_client's multiprocess mode)."""
    import httpx

    from common.api_keys import ApiKeyStore
    from tests.helpers.servers import ApiProcess

    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": key_prefix,
        "SDXL_QUEUE_NAME": f"{key_prefix}-queue",
        "SDXL_IMAGE_SIZES": "96x64",
        "SDXL_LOCAL_STORAGE_DIR": str(tmp_path / "images"),
        "SDXL_URL_SIGNING_SECRET": "s" * 32,
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
    }
    api = ApiProcess(env, tmp_path / "api.log", args=["--workers", "2"])
    api.start(timeout_s=60)
    try:
        _, key = ApiKeyStore(redis.Redis.from_url(redis_url), key_prefix).create("multi", "test")
        auth = {"Authorization": f"Bearer {key}"}
        for _ in range(12):  # a new connection each: the kernel spreads them over both processes
            assert httpx.post(f"{api.url}/v1/jobs", json=GOOD, headers=auth).status_code == 202
        writers = {f.stem.rsplit("_", 1)[1] for f in folder.glob("counter_*.db")}
        assert len(writers) == 2, writers  # both processes took submits
        for _ in range(6):
            got = samples(httpx.get(f"{api.url}/metrics").text)
            assert got['sdxl_api_jobs_submitted_total{size="96x64"}'] == 12
            assert got['sdxl_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"}'] == 12
            assert got["sdxl_jobs_queued"] == 12
    finally:
        api.stop()


def test_readyz_and_metrics_read_redis_in_a_few_commands_however_many_keys_it_holds(tmp_path, settings):
    """Anonymous endpoints must not cost O(keys in the database): with 30,000 keys under the prefix (a SCAN of
    the heartbeat keys took 300 SCAN calls a request here, 3,861 at 300k keys), /readyz and a /metrics scrape
    each run a handful of commands and no SCAN. Counted by the server itself (INFO commandstats), on a Redis of
    this test's own, so that nothing else's commands are counted."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from common import redis_server
    from tests.helpers.servers import free_port

    server = redis_server.start_embedded(tmp_path / "valkey", free_port())
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        r = redis.Redis.from_url(url)
        keys = Keys(settings.key_prefix)
        for start in range(0, 30_000, 5_000):
            r.mset({keys.job(f"filler-{i}"): b"x" for i in range(start, start + 5_000)})
        workers = WorkerRegistry(r, settings.key_prefix)
        for name in ("host-a-1", "host-b-1"):
            workers.beat(WorkerStatus(name, "tiny", [(64, 96)], 4, 1, started_at=1.0, at=2.0), ttl_s=60)
        with TestClient(create_app(settings.model_copy(update={"redis_url": url}))) as client:
            for path, most in (("/readyz", 6), ("/metrics", 20)):
                r.config_resetstat()
                answer = client.get(path)
                assert answer.status_code == 200, answer.text
                calls = {
                    name.removeprefix("cmdstat_"): stat["calls"]
                    for name, stat in r.info("commandstats").items()
                    if not name.startswith(HANDSHAKES)  # a new connection's (and this test's own)
                }
                assert "scan" not in calls and sum(calls.values()) <= most, f"{path}: {calls}"
    finally:
        server.stop()


def test_with_a_metrics_key_only_its_bearer_reads_metrics(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    key = "m" * 32
    with TestClient(create_app(settings.model_copy(update={"metrics_key": SecretStr(key)}))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200 and "sdxl_redis_up" in answer.text
