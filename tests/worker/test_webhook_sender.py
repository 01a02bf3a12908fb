"""The webhook sender process (worker/webhook_sender.py) on its own: a real Valkey, a parent process standing in for
its worker (the sender watches the pid it is given), and the sender itself. The worker's side (start, restart,
deliveries beside jobs) is tests/worker/test_webhook_delivery.py."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import redis

from common import redis_server
from common.job_store import JobStore
from common.jobs import JobRequest, JobStatus
from common.queue import TASK_WEBHOOK, make_celery
from tests.helpers.servers import free_port, settings_from, standin_env, wait_for
from worker.webhook_sender import PARENT_CHECK_S, STOP_GRACE_S

REPO = Path(__file__).resolve().parents[2]
# a stand-in for the worker: starts the sender with its own pid, says the sender's, and sleeps until killed
PARENT = (
    "import os, subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-m', 'worker.webhook_sender', str(os.getpid())])\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(600)\n"
)


class Failing(http.server.BaseHTTPRequestHandler):
    """A receiver that answers 500 after a while: the try fails, and the sender queues the next one."""

    reached = threading.Event()

    def do_POST(self) -> None:
        self.reached.set()
        time.sleep(1.0)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_sender_whose_worker_and_redis_are_gone_exits_within_its_grace(tmp_path):
    """A try under way as Redis stops answering (SIGSTOP: no reply, no closed connection) fails, queuing the next try
    waits on Redis, and Celery's warm shutdown waits for the try: a sender outlived its worker by minutes after a
    chaos run was stopped. Now it exits a try's deadline plus STOP_GRACE_S after its worker went. (With Redis
    SIGKILLed instead, connections refused, the warm shutdown ends by itself in about 3 s, old code or new.)"""
    port = free_port()
    server = redis_server.start_embedded(tmp_path / "valkey", port)
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    timeout_s = 3.0
    _, env = standin_env(
        f"redis://127.0.0.1:{port}/0",
        tmp_path,
        "ws",
        SDXL_WEBHOOK_TIMEOUT_S=str(timeout_s),
        SDXL_WEBHOOK_SECRET="whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=",
        SDXL_WEBHOOK_ALLOW_PRIVATE="1",
    )
    settings = settings_from(env)
    store = JobStore(redis.Redis(port=port), settings.key_prefix, 60)
    webhook_url = f"http://127.0.0.1:{receiver.server_port}/hook"
    job_id, _ = store.create(JobRequest(prompt="x", webhook_url=webhook_url))
    store.transition(job_id, JobStatus.running)
    store.transition(job_id, JobStatus.succeeded)
    log = (tmp_path / "sender.log").open("w")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=log
    )
    sender, redis_pid = None, 0
    try:
        assert parent.stdout is not None
        sender = psutil.Process(int(parent.stdout.readline()))

        def consuming() -> bool:  # Celery's consumer and its event loop: connected to Valkey
            return sum(c.raddr and c.raddr.port == port for c in sender.net_connections()) >= 2

        wait_for(consuming, timeout_s=60)
        make_celery(settings).send_task(TASK_WEBHOOK, args=[job_id, 1], queue=settings.webhook_queue)
        assert Failing.reached.wait(30)
        # Redis stops answering, the try under way: it neither comes back nor closes a connection
        (redis_pid,) = {c.pid for c in psutil.net_connections() if c.laddr and c.laddr.port == port and c.pid}
        os.kill(redis_pid, signal.SIGSTOP)
        parent.kill()
        gone_at = time.monotonic()
        limit_s = PARENT_CHECK_S + timeout_s + STOP_GRACE_S + 5  # 5: the interpreter's own exit on a loaded machine
        try:
            sender.wait(limit_s)
        except psutil.TimeoutExpired:
            raise AssertionError(f"the sender was still running {limit_s:.0f} s after its worker went") from None
        print(f"the sender exited {time.monotonic() - gone_at:.1f} s after its worker was killed")
    finally:
        parent.kill()
        if sender is not None and sender.is_running():
            sender.kill()
        if redis_pid:
            os.kill(redis_pid, signal.SIGCONT)
        server.terminate()
        receiver.shutdown()
        log.close()
