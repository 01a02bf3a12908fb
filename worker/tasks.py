"""The Celery task: thin on purpose. The device loop does the work; the task waits for its job's result so
that the message is acknowledged (acks_late) only once the result is recorded."""

from __future__ import annotations

import time

from celery.exceptions import Reject

from common.outage import Outage
from common.queue import TASK_GENERATE, TASK_WEBHOOK, make_celery
from common.settings import get_settings
from worker import webhook
from worker.device_loop import DeviceLoop
from worker.loop.outcome import JobOutcome

NOT_HERE_PAUSE_S = 1.0
app = make_celery(get_settings())
_loop: DeviceLoop | None = None
_webhook_redis = Outage("webhook sender: Redis")


def bind(loop: DeviceLoop) -> None:
    """Called once by worker.main after the engine is compiled, before Celery consumes anything."""
    global _loop
    _loop = loop


@app.task(name=TASK_GENERATE)
def generate(job_id: str, generation: int | None = None) -> str:
    """Run one job; returns its final status. `generation`: the message's (None: whatever the record's is);
    an older one than the record's was superseded and is dropped."""
    if _loop is None:
        raise RuntimeError("the device loop is not running in this process; start workers with `python -m worker`")
    outcome = _loop.submit(job_id, generation).result()
    if outcome is JobOutcome.requeue:  # given back before its run ended (shutting down, storage away): another
        raise Reject("job given back", requeue=True)  # worker, or this one later, takes it
    if outcome is JobOutcome.not_here:  # a model this worker does not hold, and its message could not be sent on
        time.sleep(NOT_HERE_PAUSE_S)  # to the model's queue (common/queue.py): back after a pause, not a hot loop
        raise Reject("model not held by this worker", requeue=True)
    return outcome.value


@app.task(name=TASK_WEBHOOK)
def deliver_webhook(job_id: str, attempt: int = 1) -> bool:
    """One delivery try; on failure the next is queued with exponential backoff (2, 4, 8 ... s)."""
    if _loop is None:
        raise RuntimeError("the device loop is not running in this process; start workers with `python -m worker`")
    settings = get_settings()
    # Redis away: wait it out here (the message cannot be acknowledged or re-sent meanwhile anyway)
    if _webhook_redis.call(webhook.deliver, settings, _loop.store, job_id):
        return True
    if attempt < settings.webhook_attempts:
        app.send_task(TASK_WEBHOOK, args=[job_id, attempt + 1], countdown=2**attempt, queue=settings.queue_name)
    return False
