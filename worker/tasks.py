"""The Celery task: thin on purpose. The device loop does the work; the task waits for its job's result so
that the message is acknowledged (acks_late) only once the result is recorded."""

from __future__ import annotations

import time

from celery.exceptions import Reject

from common.queue import TASK_GENERATE, TASK_WEBHOOK, make_celery
from common.settings import get_settings
from worker.device_loop import DeviceLoop
from worker.loop.outcome import JobOutcome

NOT_HERE_PAUSE_S = 1.0
app = make_celery(get_settings())
_loop: DeviceLoop | None = None


def bind(loop: DeviceLoop) -> None:
    """Called once by worker.main after the engine is compiled, before Celery consumes anything."""
    global _loop
    _loop = loop


@app.task(name=TASK_GENERATE)
def generate(job_id: str | None = None, generation: int | None = None, model: str | None = None) -> str:
    """Run one job; returns its final status. No `job_id` (an interactive job's message): a wake-up, and the
    worker runs the next interactive job for `model` in fair order (tenants in turn, common/job_store.py take),
    or nothing; a wake-up without `model` (sent before rings were per model) is the default model's.
    A data set line's message names its job. `generation`: the message's (None: whatever the record's is);
    an older one than the record's was superseded and is dropped."""
    if _loop is None:
        raise RuntimeError("the device loop is not running in this process; start workers with `python -m worker`")
    outcome = _loop.submit(job_id, generation, model).result()
    if outcome is JobOutcome.requeue:  # given back before its run ended (shutting down, storage away): another
        raise Reject("job given back", requeue=True)  # worker, or this one later, takes it
    if outcome is JobOutcome.not_here:  # a model this worker does not hold, and its message could not be sent on,
        time.sleep(NOT_HERE_PAUSE_S)  # or a wake-up for it: back after a pause, not a hot loop (common/queue.py)
        raise Reject("model not held by this worker", requeue=True)
    return outcome.value


@app.task(name=TASK_WEBHOOK)
def deliver_webhook(job_id: str, attempt: int = 1) -> None:
    """A delivery found on a job queue (sent there before deliveries had a queue of their own): passed on to the
    webhook queue at once, so that no job thread ever waits on a receiver (worker/webhook_sender.py)."""
    app.send_task(TASK_WEBHOOK, args=[job_id, attempt], queue=get_settings().webhook_queue)
