"""Webhook deliveries, apart from jobs: a process of their own, started and watched by each worker.

    python -m worker.webhook_sender   (worker/main.py starts it; it needs no engine, only Redis)

Why apart: a delivery waits on somebody else's server. On the job threads (Celery's pool in the worker, two
batches' worth), receivers that answer slowly held every thread, and another tenant's job stayed queued behind
them. Here deliveries have a queue of their own (settings.webhook_queue), consumed by this process only,
on its own SDXL_WEBHOOK_CONCURRENCY threads; the job threads and the API only put a message on that queue.
A slow or failing receiver delays other webhooks at most (each try ends within SDXL_WEBHOOK_TIMEOUT_S),
never a job, and a huge reply costs this process at most SDXL_WEBHOOK_MAX_RESPONSE_BYTES a delivery.

Delivery stays at least once: each try is a Celery message, acknowledged after the try (acks_late), and a
failed try queues the next with backoff 2, 4, 8 ... s. A sender that dies leaves its messages unacknowledged:
Redis hands them out again after the visibility timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import redis

from common import logs
from common.job_store import JobStore
from common.outage import Outage
from common.queue import TASK_WEBHOOK, make_celery
from common.settings import Settings, get_settings
from worker import webhook

log = logging.getLogger("worker.webhooks")
PARENT_CHECK_S = 1.0  # how often the sender looks for its worker (gone: it stops too)
RESTART_PAUSE_S = 1.0  # between a sender's death and its replacement

app = make_celery(get_settings())
_store: JobStore | None = None
_redis = Outage("webhook sender: Redis")


@app.task(name=TASK_WEBHOOK)
def deliver_webhook(job_id: str, attempt: int = 1) -> bool:
    """One delivery try; on failure the next is queued with exponential backoff (2, 4, 8 ... s)."""
    if _store is None:
        raise RuntimeError("webhooks are delivered by `python -m worker.webhook_sender`, which a worker starts")
    settings = get_settings()
    # Redis away: wait it out here (the message cannot be acknowledged or re-sent meanwhile anyway)
    if _redis.call(webhook.deliver, settings, _store, job_id):
        return True
    if attempt < settings.webhook_attempts:
        app.send_task(TASK_WEBHOOK, args=[job_id, attempt + 1], countdown=2**attempt, queue=settings.webhook_queue)
    return False


def _stop_with_parent(parent_pid: int) -> None:
    """The worker that started this process is gone (even SIGKILLed): stop too, as Celery's warm shutdown."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    log.warning("webhook sender: its worker (pid %d) is gone; stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    global _store
    settings = get_settings()
    logs.configure(settings.log_format)
    client = redis.Redis.from_url(settings.redis_url)
    _store = JobStore(client, settings.key_prefix, settings.job_ttl_s, settings.running_deadline_s)
    parent = int(os.environ.get("SDXL_WEBHOOK_SENDER_PARENT", os.getppid()))
    threading.Thread(target=_stop_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    app.conf.worker_hijack_root_logger = False
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.webhook_concurrency}",
            f"--queues={settings.webhook_queue}",
            f"--hostname=webhooks@{os.getpid()}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
    )


class SenderProcess:
    """The worker's side: starts the sender, starts another if it dies, stops it with the worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.watch: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _spawn(self) -> None:
        env = {**os.environ, "SDXL_WEBHOOK_SENDER_PARENT": str(os.getpid())}
        # stdout and stderr are the worker's: one log per worker, the sender's lines named worker.webhooks
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.webhook_sender"], env=env)
        log.info("webhook sender started (pid %d, %d threads)", self.proc.pid, self.settings.webhook_concurrency)

    def start(self) -> None:
        with self.lock:
            self._spawn()
        self.watch = threading.Thread(target=self._watch, name="webhook-sender-watch", daemon=True)
        self.watch.start()

    def _watch(self) -> None:
        while not self.stopping.wait(RESTART_PAUSE_S):
            with self.lock:
                if self.stopping.is_set() or self.proc is None or self.proc.poll() is None:
                    continue
                log.warning("webhook sender exited with %s; starting another", self.proc.returncode)
                self._spawn()

    def begin_stop(self) -> None:
        """Warm shutdown: the sender takes no more messages and finishes the tries under way."""
        with self.lock:
            self.stopping.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.begin_stop()
        if self.proc is None:
            return
        try:  # the tries under way end by their deadline
            self.proc.wait(timeout=self.settings.webhook_timeout_s + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    main()
