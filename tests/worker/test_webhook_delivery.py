"""Webhooks delivered by a real worker process to a real HTTP receiver on loopback (allowed by the test's
configuration), with failures and retries, and receivers too slow to finish beside jobs that must not wait for
them. The worker runs the stand-in engine: this is about delivery."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import ClassVar

import psutil
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
        yield client, f"http://127.0.0.1:{server.server_port}/hook", worker
    worker.stop(signal.SIGKILL)
    server.shutdown()


def test_succeeded_job_is_delivered_signed_after_retries(stack):
    client, hook, _ = stack
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
    client, hook, _ = stack
    Receiver.fail_first = 0
    try:
        job_id = client.post("/v1/jobs", json={**BODY, "webhook_url": hook}).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")
        wait_for(lambda: any(h["webhook-id"] == f"{job_id}.canceled" for h, _, _ in Receiver.got))
    finally:
        Receiver.fail_first = 2


def test_a_sender_that_dies_is_replaced_and_deliveries_go_on(stack):
    client, hook, worker = stack
    Receiver.fail_first = 0
    try:
        (sender,) = psutil.Process(worker.proc.pid).children()  # the webhook sender, the worker's one child
        sender.kill()
        sender.wait(10)
        wait_for(lambda: len(psutil.Process(worker.proc.pid).children()) == 1, timeout_s=30)
        assert psutil.Process(worker.proc.pid).children()[0].pid != sender.pid
        job_id = client.post("/v1/jobs", json={**BODY, "webhook_url": hook}).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")
        wait_for(lambda: any(h["webhook-id"] == f"{job_id}.canceled" for h, _, _ in Receiver.got), timeout_s=30)
        assert worker.proc.poll() is None  # the worker went on taking jobs all along
    finally:
        Receiver.fail_first = 2


class Trickle(BaseHTTPRequestHandler):
    """A receiver that never finishes answering: its status line, then a header byte every 2 s for 40 s."""

    open_now = 0  # requests being answered
    lock = threading.Lock()
    stop = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        with Trickle.lock:
            Trickle.open_now += 1
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            until = time.monotonic() + 40
            while not Trickle.stop.wait(2.0) and time.monotonic() < until:
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:
            pass  # the sender hung up
        finally:
            with Trickle.lock:
                Trickle.open_now -= 1

    def log_message(self, *args):
        pass


BATCH_TIMEOUT_S = 1.0


@pytest.fixture
def slow_stack(redis_url, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Trickle.open_now = 0
    Trickle.stop.clear()
    prefix, env = standin_env(
        redis_url,
        tmp_path,
        "whslow",
        SDXL_STANDIN_BATCH_S="0.2",
        SDXL_BATCH_TIMEOUT_S=str(BATCH_TIMEOUT_S),
        SDXL_WEBHOOK_SECRET=SECRET,
        SDXL_WEBHOOK_ALLOW_PRIVATE="true",
        SDXL_WEBHOOK_ATTEMPTS="1",
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start(redis_url, prefix, timeout_s=120)
    settings = settings_from(env)
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        yield client, f"http://127.0.0.1:{server.server_port}/hook"
    Trickle.stop.set()
    worker.stop(signal.SIGKILL)
    server.shutdown()


def test_a_job_starts_within_a_batch_timeout_while_slow_receivers_hold_every_delivery(slow_stack):
    client, hook = slow_stack
    threads = 8  # the worker's job threads: two batches of SDXL_BATCH_ROWS=4 (worker/main.py)
    for i in range(threads):
        client.post("/v1/jobs", json={**BODY, "seed": i, "webhook_url": hook})
    wait_for(lambda: Trickle.open_now >= threads, timeout_s=30)  # as many slow deliveries as job threads
    job_id = client.post("/v1/jobs", json={**BODY, "prompt": "another tenant's job"}).json()["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["started_at"] is not None, timeout_s=60)
    job = client.get(f"/v1/jobs/{job_id}").json()
    waited_s = job["started_at"] - job["created_at"]
    assert waited_s < BATCH_TIMEOUT_S + 1.0, f"the job waited {waited_s:.1f} s to start"
    assert Trickle.open_now >= threads  # the receivers were still answering all along
