"""One delivery try (worker/webhook.py, worker/webhook_post.py) against real HTTP servers on loopback, in this
process: the address connected to is the one checked, a try ends by its deadline, a huge reply is not read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import psutil
import pytest
import redis

from common.job_store import JobStore
from common.jobs import JobRequest, JobStatus
from common.settings import Settings
from worker import webhook

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtMDEyMzQ1Njc4OQ=="
GIB = 1 << 30


class Recorder(BaseHTTPRequestHandler):
    """Answers 204 and notes which server (by its address) saw which Host header."""

    seen: ClassVar[list[tuple[str, str]]] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        Recorder.seen.append((self.server.server_address[0], self.headers["host"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


class Trickle(BaseHTTPRequestHandler):
    """Sends its status line, then one header byte a second, for 15 s or until stopped: no single read of the
    sender's ever times out."""

    stop = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        until = time.monotonic() + 15
        try:
            while not Trickle.stop.wait(1.0) and time.monotonic() < until:
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:
            pass  # the sender hung up

    def log_message(self, *args):
        pass


class Huge(BaseHTTPRequestHandler):
    """A 200 with a 1 GiB body, made as it is sent (zeros, 1 MiB at a time): costs nothing unless read."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", str(GIB))
        self.end_headers()
        block, sent = bytes(1 << 20), 0
        try:
            while sent < GIB:
                self.wfile.write(block)
                sent += len(block)
        except OSError:
            pass  # the sender hung up

    def log_message(self, *args):
        pass


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A threaded HTTP server on (host, port) for the block; yields its port."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def store(redis_url, key_prefix) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), key_prefix, ttl_s=600)


def settings(**overrides: object) -> Settings:
    return Settings(**{"webhook_secret": SECRET, "webhook_allow_private": True, **overrides})


def ended_job(store: JobStore, url: str) -> str:
    job_id, _ = store.create(JobRequest(prompt="x", seed=1, webhook_url=url))
    assert store.transition(job_id, JobStatus.canceled, [JobStatus.queued])[0]
    return job_id


def second_loopback() -> str:
    try:
        socket.socket().bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("no 127.0.0.2 on this host")
    return "127.0.0.2"


def test_the_address_connected_to_is_the_one_checked(store):
    """DNS rebinding: a name that answers one address at the check and another after. The try resolves once
    and connects to that answer, saying the name in the Host header. A server waits on the later answer, same
    port: a second look-up would reach it."""
    Recorder.seen = []
    with serve(Recorder, "127.0.0.1") as port, serve(Recorder, second_loopback(), port):
        answers = iter([["127.0.0.1"], ["127.0.0.2"]])
        asked = []

        def rebinding(host: str, port: int) -> list[str]:
            asked.append(host)
            return next(answers, ["127.0.0.2"])

        job_id = ended_job(store, f"http://hook.example:{port}/hook")
        assert webhook.deliver(settings(), store, job_id, resolve=rebinding)
        assert asked == ["hook.example"]  # one look-up
        assert Recorder.seen == [("127.0.0.1", f"hook.example:{port}")]


def test_a_name_that_answers_public_then_loopback_never_reaches_loopback(store):
    Recorder.seen = []
    with serve(Recorder, "127.0.0.1") as port:
        answers = iter([["93.184.215.14"], ["127.0.0.1"]])  # public at the check; loopback on any later look-up
        job_id = ended_job(store, f"http://hook.example:{port}/hook")
        strict = settings(webhook_allow_private=False, webhook_timeout_s=1.0)
        webhook.deliver(strict, store, job_id, resolve=lambda host, port: next(answers, ["127.0.0.1"]))
        assert Recorder.seen == []  # the public address was tried (or not reached), never loopback


def test_a_try_ends_by_its_deadline_however_slowly_the_receiver_answers(store):
    Trickle.stop.clear()
    with serve(Trickle) as port:
        job_id = ended_job(store, f"http://127.0.0.1:{port}/hook")
        t0 = time.monotonic()
        assert not webhook.deliver(settings(webhook_timeout_s=2.5), store, job_id)  # a try again later
        took_s = time.monotonic() - t0
        Trickle.stop.set()
        assert 2.4 < took_s < 3.5, took_s  # the receiver sent a byte every second all along


def test_a_1_gib_reply_is_not_read_past_the_cap(store):
    me = psutil.Process()
    before, peak = me.memory_info().rss, 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, me.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with serve(Huge) as port:
            job_id = ended_job(store, f"http://127.0.0.1:{port}/hook")
            t0 = time.monotonic()
            assert webhook.deliver(settings(), store, job_id)  # a 200: delivered, whatever followed
            took_s = time.monotonic() - t0
    finally:
        done.set()
        sampler.join()
    grown_mb = (max(peak, me.memory_info().rss) - before) / 1e6
    assert grown_mb < 100, f"the delivering process grew {grown_mb:.0f} MB"
    assert took_s < 5, took_s  # not the time to read 1 GiB
