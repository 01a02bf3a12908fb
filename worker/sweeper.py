"""The stuck-job sweep: running jobs far past their deadline go back to the queue, or fail.

Celery redelivers a dead worker's messages after the visibility timeout; this is the net under that: a job
whose record says running long after any worker could still be on it (its message lost, its worker hung)
is requeued with a fresh message while it has attempts left, else failed with the reason. Running it twice
is harmless: status changes are compare-and-set, and a duplicate message finds the job already ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from common.job_store import JobStore
from common.jobs import Job, JobStatus

log = logging.getLogger(__name__)


def sweep(store: JobStore, max_attempts: int, enqueue: Callable[[Job], None], now: float | None = None) -> dict:
    """One pass; returns {"requeued": [...], "failed": [...]}. `enqueue` sends a job's message again (to its
    lane's queue)."""
    done: dict[str, list[str]] = {"requeued": [], "failed": []}
    for job_id in store.overdue(now):
        job = store.get(job_id)
        if job is None:  # the record expired: drop it from the index
            store.r.zrem(store.key("running"), job_id)
            continue
        if job.attempts < max_attempts:
            if store.transition(job_id, JobStatus.queued, [JobStatus.running])[0]:
                enqueue(job)
                done["requeued"].append(job_id)
        elif store.fail(job_id, f"stuck: still running {store.running_deadline_s:.0f} s after it started, "
                                f"after {job.attempts} attempts"):  # fmt: skip
            done["failed"].append(job_id)
    if done["requeued"] or done["failed"]:
        log.warning("stuck-job sweep: %s", done)
    return done
