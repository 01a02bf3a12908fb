"""The sweeps that make sure every stored job runs: one worker of the fleet runs them every heartbeat.

- dead workers (`reissue_dead_workers`): a worker notes each job it takes off the queue in {P}:held:<worker>.
  When its heartbeat has lapsed (3 periods, 15 s), its held jobs go back to queued with the next
  generation and a new message, at once: Celery would redeliver them only after the visibility timeout
  (300 s). The dead worker's own messages, when Celery does redeliver them, are older than the record's
  generation and are dropped (worker/loop/admission.py), so the job runs once more, not twice.
- unsent submits (`relay_outbox`): the API stores a job and its outbox entry in one script, then sends the
  message and clears the entry. An entry older than OUTBOX_GRACE_S lost its sender (the API died, or Redis
  went away in between): the sweep sends the message. So a job the API stored always runs.
- stuck jobs (`sweep`): a job whose record says running long after any worker could still be on it (its
  worker hung) is requeued with a fresh message while it has attempts left, else failed with the reason.
- jobs left behind by a failover: a job recorded running on a live worker that does not hold it
  (`reissue_unheld`, in the sweep), and a job a live worker holds without knowing it (`reissue_orphans`, called
  by that worker: worker/loop/presence.py reconcile) are sent again with the next generation.
- stranded ready jobs (`wake_stranded`): an interactive job waits in its ready set for a wake-up message, and each
  message takes one job. A Redis failover can keep the one and lose the other: replication is asynchronous, so
  the new primary may have the message's removal from the queue but not the take that followed it (or kombu's
  note of the unacknowledged message), and the job is ready with no message left to take it. A model whose
  queue is empty while a job of it has been ready longer than OUTBOX_GRACE_S gets a wake-up per such job
  (tests/common/test_redis_failover.py met it: 1 job of 250, queued for ever, before this).
Running any of them twice is harmless: status changes are compare-and-set, and a duplicate message finds
the job already ended (or superseded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from common.job_store import OUTBOX_GRACE_S, JobStore
from common.jobs import Job, JobStatus
from common.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)


def sweep(store: JobStore, max_attempts: int, enqueue: Callable[[Job], None], now: float | None = None) -> dict:
    """One pass; returns {"requeued": [...], "failed": [...]}. `enqueue` sends a job's message again (to its
    lane's queue)."""
    done: dict[str, list[str]] = {"requeued": [], "failed": []}
    for job_id in store.overdue(now):
        job = store.get(job_id)
        if job is None:  # the record expired: drop it from the index
            store.forget_running(job_id)
            continue
        if job.attempts < max_attempts:
            again = store.reissue(job) if job.status == JobStatus.running else None
            if again is not None:
                enqueue(again)
                done["requeued"].append(job_id)
        elif store.fail(
            job_id,
            f"stuck: still running {store.running_deadline_s:.0f} s after it started, after {job.attempts} attempts",
            tenant=job.tenant,
        ):
            done["failed"].append(job_id)
    if done["requeued"] or done["failed"]:
        log.warning("stuck-job sweep: %s", done)
    return done


def _send_again(store: JobStore, job_ids: list[str], enqueue: Callable[[Job], None]) -> list[str]:
    """Those of the jobs still queued or running, back to queued with the next generation and a new message;
    returns their ids (one that moved on meanwhile is left)."""
    sent: list[str] = []
    for job in store.get_many(job_ids):
        if job is None or job.status not in (JobStatus.queued, JobStatus.running):
            continue
        reissued = store.reissue(job)
        if reissued is not None:
            enqueue(reissued)
            sent.append(job.id)
    return sent


def reissue_dead_workers(store: JobStore, workers: WorkerRegistry, enqueue: Callable[[Job], None]) -> list[str]:
    """Send again the jobs held by workers whose heartbeat has lapsed; returns their ids. The caller makes
    sure it has seen Redis for a heartbeat's life (after an outage every heartbeat lapses at once)."""
    live = workers.live_names()  # alive while its heartbeat has not lapsed, readable or not
    again: list[str] = []
    for worker in workers.holders():
        if worker in live:
            continue
        held = workers.held(worker)  # may be empty: then it is only forgotten
        sent = _send_again(store, held, enqueue)
        workers.drop_held(worker)
        if held:
            log.warning("worker %s is gone (no heartbeat): sent its %d held jobs again: %s", worker, len(sent), sent)
        again += sent
    return again


def reissue_orphans(
    store: JobStore, workers: WorkerRegistry, enqueue: Callable[[Job], None], worker: str, job_ids: list[str]
) -> list[str]:
    """Send again the jobs a live worker holds in Redis without knowing it (worker/loop/presence.py reconcile), and
    let them go; returns the ids sent. Those no longer queued or running (ended) are only let go."""
    sent = _send_again(store, job_ids, enqueue)
    workers.release(worker, job_ids)
    log.warning(
        "worker %s held %d jobs it did not know of (a failover undid its writes): sent again %s",
        worker,
        len(job_ids),
        sent,
    )
    return sent


def reissue_unheld(store: JobStore, workers: WorkerRegistry, enqueue: Callable[[Job], None]) -> list[str]:
    """Send again the jobs recorded running on a live worker that does not hold them; returns their ids. A worker
    holds a job before it starts it and lets go only after its end is written, so a running job on a live worker
    is always in that worker's held set, unless a failover mixed the two: a chaos run left a job `running` and held
    by nobody, its worker long past it, for the stuck-job deadline (15 minutes) to find. Read in this order, a
    job that ends meanwhile is not taken for one: the held sets after the running ones, then the record again."""
    running = store.running_on()
    live = workers.live_names()
    on_live = {job_id: w for job_id, w in running.items() if w in live}
    held = {w: set(workers.held(w)) for w in set(on_live.values())}
    suspects = [job_id for job_id, w in on_live.items() if job_id not in held[w]]
    sent: list[str] = []
    for job, worker in zip(store.get_many(suspects), store.workers_of(suspects), strict=True):
        if job is None or job.status != JobStatus.running or worker != on_live[job.id]:
            continue  # ended, or started again elsewhere, meanwhile
        again = store.reissue(job)
        if again is not None:
            enqueue(again)
            sent.append(job.id)
    if sent:
        log.warning(
            "jobs running on live workers that do not hold them (a failover undid a write): sent again %s", sent
        )
    return sent


def wake_stranded(
    store: JobStore,
    models: Iterable[str],
    waiting_messages: Callable[[str], int],
    enqueue: Callable[[Job], None],
    older_than_s: float = OUTBOX_GRACE_S,
    now: float | None = None,
) -> list[str]:
    """A wake-up for each job of `models` ready longer than `older_than_s` while its model's queue holds no message
    (`waiting_messages(model)`: its length); returns their ids. A wake-up too many (a message on its way to a
    worker as the queue was read) finds nothing to take, or takes the next job: harmless."""
    now = time.time() if now is None else now
    woken: list[str] = []
    for model in models:
        ids = store.ready_jobs(model)
        if not ids or waiting_messages(model) > 0:  # messages wait: each will take a ready job
            continue
        for job in store.get_many(ids):
            if job is not None and job.status == JobStatus.queued and job.created_at < now - older_than_s:
                enqueue(job)
                woken.append(job.id)
    if woken:
        log.warning("woke %d ready jobs that no message would take (lost in a Redis failover?): %s", len(woken), woken)
    return woken


def relay_outbox(store: JobStore, enqueue: Callable[[Job], None], older_than_s: float = OUTBOX_GRACE_S) -> list[str]:
    """Send the message of every stored job whose submit did not confirm it sent; returns their ids."""
    sent: list[str] = []
    ids = store.unsent(older_than_s)
    for job_id, job in zip(ids, store.get_many(ids), strict=True):
        if job is not None and job.status == JobStatus.queued:
            enqueue(job)
            sent.append(job_id)
        store.sent(job_id)
    if sent:
        log.warning("sent the messages of %d stored jobs whose submit stopped before sending: %s", len(sent), sent)
    return sent
