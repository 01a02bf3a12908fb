"""GET /metrics against a real Redis, with worker heartbeat records written as a worker writes them (no worker
runs here; tests/test_end_to_end.py reads a real worker's)."""

from __future__ import annotations

import re

import redis

from common.worker_status import WorkerCounters, WorkerStatus, key

GOOD = {"prompt": "a fox", "width": 96, "height": 64}
LABEL = r'[a-z_]+="(?:[^"\\\n]|\\.)*"'  # Prometheus' text format: \\, \" and \n escaped


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} for every sample line; checks each family is declared before its samples."""
    declared, found = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert re.match(rf"^[a-z_]+(\{{{LABEL}(,{LABEL})*\}})?$", name), line
            assert name.split("{")[0] in declared, line
            found[name] = float(value)
    return found


def test_metrics_show_the_queue_and_each_live_workers_counters(client, settings):
    r = redis.Redis.from_url(settings.redis_url)
    jobs = {"succeeded": 9, "failed": 1, "canceled": 0, "requeued": 0}
    counters = WorkerCounters(batches=3, rows=10, padding_rows=2, device_s=6.99, jobs=jobs)
    busy = WorkerStatus("host-a-1", "tiny", [(64, 96)], 4, 1, started_at=1000.0, at=1010.0, counters=counters)
    idle = WorkerStatus('odd "name"', "tiny", [(64, 96)], 4, 1, started_at=1005.0, at=1010.0)
    r.set(key(settings.key_prefix, busy.name), busy.to_json(), ex=60)
    r.set(key(settings.key_prefix, idle.name), idle.to_json(), ex=60)
    r.set(key(settings.key_prefix, "from-an-older-version"), '{"model": "tiny"}', ex=60)  # skipped, not a 500
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
    assert got['sdxl_worker_jobs_total{worker="host-a-1",outcome="failed"}'] == 1
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
    from tests.servers import authorize, free_port

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
