"""Webhooks delivered by a real worker process to a real HTTP receiver on loopback (allowed by the test's
configuration), with failures and retries. The worker runs the stand-in engine: this is about delivery."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common import webhooks
from tests.helpers.servers import WorkerProcess, authorize, free_port, settings_from, standin_env, wait_for

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtMDEyMzQ1Njc4OQ=="
BODY = {"prompt": "a bell", "width": 64, "height": 64, "steps": 2}


class Receiver(BaseHTTPRequestHandler):
    got: ClassVar[list[tuple[dict[str, str], bytes, int]]] = []  # what the receiver saw, in order
    fail_first = 2

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        code = 500 if len(Receiver.got) < Receiver.fail_first else 200
        Receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body, code))
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def stack(redis_url, tmp_path):
    server = HTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.got = []
    prefix, env = standin_env(
        redis_url,
        tmp_path,
        "wh",
        SDXL_STANDIN_BATCH_S="0.2",
        SDXL_BATCH_TIMEOUT_S="0.2",
        SDXL_WEBHOOK_SECRET=SECRET,
        SDXL_WEBHOOK_ALLOW_PRIVATE="true",
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start(redis_url, prefix, timeout_s=120)
    settings = settings_from(env)
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        yield client, f"http://127.0.0.1:{server.server_port}/hook"
    worker.stop(signal.SIGKILL)
    server.shutdown()


def test_succeeded_job_is_delivered_signed_after_retries(stack):
    client, hook = stack
    job_id = client.post("/v1/jobs", json={**BODY, "webhook_url": hook}).json()["id"]
    wait_for(lambda: len(Receiver.got) >= 3)  # 500, 500, then 200 (backoff 2 s, 4 s)
    time.sleep(3)
    assert [code for _, _, code in Receiver.got] == [500, 500, 200]  # no more tries after a 2xx
    ids = {h["webhook-id"] for h, _, _ in Receiver.got}
    assert ids == {f"{job_id}.succeeded"}  # one event, the same id on every try
    headers, body, _ = Receiver.got[-1]
    assert webhooks.verify(SECRET, headers, body)
    event = json.loads(body)
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
    assert event["data"]["status_url"].endswith(f"/v1/jobs/{job_id}")


def test_canceled_queued_job_is_delivered(stack):
    client, hook = stack
    Receiver.fail_first = 0
    try:
        job_id = client.post("/v1/jobs", json={**BODY, "webhook_url": hook}).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")
        wait_for(lambda: any(h["webhook-id"] == f"{job_id}.canceled" for h, _, _ in Receiver.got))
    finally:
        Receiver.fail_first = 2
