"""Webhook deliveries, apart from jobs: a process of their own, started and watched by each worker.

    python -m worker.webhook_sender WORKER_PID   (each worker starts it: worker/webhook_sender_process.py; no
                                                   engine, only Redis; it stops when WORKER_PID is gone)

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
import sys
import threading
import time

from common import logs, redis_connection
from common.job_store import JobStore
from common.outage import Outage
from common.queue import TASK_WEBHOOK, make_celery
from common.settings import get_settings
from worker import webhook

log = logging.getLogger("worker.webhooks")
PARENT_CHECK_S = 1.0  # how often the sender looks for its worker (gone: it stops too)
STOP_GRACE_S = 5.0  # beyond a try's own deadline (SDXL_WEBHOOK_TIMEOUT_S), before a sender without worker exits

app = make_celery(get_settings())
_store: JobStore | None = None
_redis = Outage("webhook sender: Redis")


@app.task(name=TASK_WEBHOOK, shared=False)  # this app's only (Celery shares tasks with every app by default)
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


def _stop_with_parent(parent_pid: int, grace_s: float) -> None:
    """The worker that started this process is gone (even SIGKILLed): stop too, as Celery's warm shutdown, and
    for good after `grace_s`. The warm shutdown waits for the tries under way, and a try waits out a Redis outage
    (so that its result is recorded): with Redis gone for good as well, a sender outlived its worker by minutes."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    log.warning("webhook sender: its worker (pid %d) is gone; stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    log.warning("webhook sender: still stopping %.0f s after its worker went; exiting now", grace_s)
    logging.shutdown()
    os._exit(1)  # unacknowledged tries come back after the visibility timeout


def main() -> None:
    global _store
    settings = get_settings()
    logs.configure(settings.log_format)
    client = redis_connection.sync_client(settings)
    _store = JobStore(
        client,
        settings.key_prefix,
        settings.job_ttl_s,
        settings.running_deadline_s,
        default_model=settings.model_entries[0].name,
    )
    # the worker's pid as it gave it: had the worker died before this line, os.getppid() would name another process
    parent = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    grace_s = settings.webhook_timeout_s + STOP_GRACE_S
    threading.Thread(target=_stop_with_parent, args=(parent, grace_s), name="parent-watch", daemon=True).start()
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


if __name__ == "__main__":
    main()
