"""This worker as the fleet sees it, through the worker registry and the batch log (common/worker_registry.py,
common/batch_log.py): its heartbeat (what it serves, its counters), the jobs it holds, the sweep it runs at most
once per heartbeat period across all workers, and one line per engine run in the batch log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from common.batch_log import BatchLog, BatchRecord
from common.job_store import JobStore
from common.jobs import Job
from common.outage import REDIS_DOWN
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerCounters, WorkerStatus
from worker import metrics, sweeper
from worker.loop.batch import BatchKey
from worker.loop.engine_port import Engines
from worker.loop.retry import RedisRetry

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0
# A worker whose heartbeat has been gone this many periods is dead (its key lives as long): the sweep sends its
# held jobs again at once instead of waiting for Celery's visibility timeout.
DEAD_AFTER_PERIODS = 3


def heartbeat_record(
    name: str, engines: Engines, counters: WorkerCounters, started_at: float, at: float
) -> WorkerStatus:
    """The record a heartbeat writes: what this worker serves (the default model's sizes and rows, every model
    it holds) and its counters."""
    engine = engines.default
    return WorkerStatus(
        name=name,
        model=engine.model.name,
        sizes=engine.sizes,
        batch_rows=engine.batch_rows,
        devices=engine.mesh.devices.size,
        started_at=started_at,
        at=at,
        counters=counters,
        models=[
            {"name": name, "source": e.model.name, "bytes": e.model.nbytes, "weights_sha256": e.model.weights_hash}
            for name, e in engines.items()
        ],
    )


def batch_record(
    worker: str, key: BatchKey, jobs: list[Job], batch_rows: int, device_s: float, batch_id: str, at: float
) -> BatchRecord:
    """The batch log's line for one engine run."""
    rows = sum(j.request.num_images for j in jobs)
    return BatchRecord(
        batch_id=batch_id,
        worker=worker,
        height=key.height,
        width=key.width,
        jobs=[j.id for j in jobs],
        rows=rows,
        padding=batch_rows - rows,
        device_s=round(device_s, 6),
        at=at,
    )


class Presence:
    def __init__(
        self,
        name: str,
        engines: Engines,
        workers: WorkerRegistry,
        batches: BatchLog,
        redis: RedisRetry,
        heartbeat_s: float = HEARTBEAT_S,
        sweep: Callable[[bool], None] | None = None,
        reissue: Callable[[str, list[str]], object] | None = None,
    ):
        self.name = name
        self.engines = engines
        self.workers = workers
        self.batches = batches
        self.redis = redis
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = DEAD_AFTER_PERIODS * heartbeat_s  # the heartbeat key's life
        self._sweep = sweep  # sweep(dead_workers_too); None: this worker never sweeps
        self._reissue = reissue  # reissue(worker, job ids): orphans sent again (worker/sweeper.py); None: left
        # The jobs this worker has taken and not yet answered, as it knows them: what its held set in Redis should
        # be. Added before (hold) or as (took) Redis holds them, removed after Redis lets them go.
        self._holding: set[str] = set()
        self._holding_lock = threading.Lock()  # the device thread adds, the finisher's thread removes
        self._suspects: set[str] = set()  # held in Redis but not here at the last look
        self.started_at = time.time()
        self.counters = WorkerCounters()  # sent with every heartbeat (common/worker_status.py, /metrics)
        self._counting = threading.Lock()  # the finisher and the device thread both add to them
        # Since when this worker has seen Redis answer without a break (monotonic): the sweep declares other
        # workers dead by their missing heartbeat only after it has itself been able to see them for a while.
        self._redis_ok_since: float | None = time.monotonic()

    # ------------------------------------------------------------------ held jobs

    def hold(self, job_id: str) -> None:
        """Noted before the job is read: should this worker die now, the sweep finds it."""
        self.took(job_id)
        self.redis(self.workers.hold, self.name, job_id)

    def took(self, job_id: str) -> None:
        """A job the store's take put in this worker's held set (or hold is about to)."""
        with self._holding_lock:
            self._holding.add(job_id)

    def release(self, job_ids: Iterable[str]) -> None:
        """Their messages are answered (or given back)."""
        job_ids = list(job_ids)
        self.redis(self.workers.release, self.name, job_ids)
        with self._holding_lock:
            self._holding.difference_update(job_ids)

    def reconcile(self) -> list[str]:
        """Jobs in this worker's held set that it does not know it holds, at two looks in a row (a heartbeat
        apart: one look may read the set just before a release), are sent again; returns their ids. A failover
        can undo a worker's last writes: a job recorded `succeeded` and released came back `running` and held,
        or a job taken twice by a retried take came back held; the worker had moved on, and nothing but the
        running deadline (15 minutes) would have moved the job (a chaos run found ten so)."""
        if self._reissue is None:
            return []
        try:
            in_redis = set(self.workers.held(self.name))
        except REDIS_DOWN as exc:
            self.redis.outage.failed(exc)
            return []
        with self._holding_lock:
            unknown = in_redis - self._holding
        orphans = sorted(unknown & self._suspects)
        self._suspects = unknown - set(orphans)
        if orphans:
            try:
                self._reissue(self.name, orphans)
            except REDIS_DOWN as exc:
                self.redis.outage.failed(exc)
                self._suspects |= set(orphans)  # looked at again at the next beat
                return []
        return orphans

    def forget(self) -> None:
        """A clean exit: nothing is held, and /readyz need not wait for the heartbeat to lapse."""
        self.workers.forget(self.name)

    # ------------------------------------------------------------------ counters and the batch log

    def count_job(self, label: str) -> None:
        if label in self.counters.jobs:
            with self._counting:
                self.counters.jobs[label] += 1

    def log_batch(self, key: BatchKey, jobs: list[Job], device_s: float, batch_id: str = "") -> None:
        """One engine run: its device time observed and counted, its line in the batch log (tests and benches
        read it)."""
        metrics.DEVICE.labels(metrics.size_label(key.height, key.width)).observe(device_s)
        record = batch_record(self.name, key, jobs, self.engines.default.batch_rows, device_s, batch_id, time.time())
        with self._counting:
            self.counters.batches += 1
            self.counters.rows += record.rows
            self.counters.padding_rows += record.padding
            self.counters.device_s += device_s
        self.redis(self.batches.append, record)

    # ------------------------------------------------------------------ heartbeat and sweep

    def status(self) -> WorkerStatus:
        with self._counting:
            counters = replace(self.counters, jobs=dict(self.counters.jobs))  # a copy, read whole
        return heartbeat_record(self.name, self.engines, counters, self.started_at, time.time())

    def beat(self) -> bool:
        """Write the heartbeat; False (and noted as an outage) when Redis is away: the loop goes on regardless
        and tries again at the next beat, so /readyz sees this worker within one period of Redis' return."""
        try:
            self.workers.beat(self.status(), ttl_s=self.dead_after_s)
        except REDIS_DOWN as exc:
            self._redis_ok_since = None
            self.redis.outage.failed(exc)
            return False
        if self._redis_ok_since is None:
            self._redis_ok_since = time.monotonic()
        self.redis.outage.ok()
        return True

    def sees_the_fleet(self, now: float) -> bool:
        """Another worker's missing heartbeat means it is dead only if this one could have seen it: after an
        outage every heartbeat has lapsed, and live workers need one period to write theirs again."""
        return self._redis_ok_since is not None and now - self._redis_ok_since >= self.dead_after_s

    def sweep(self) -> None:
        """At most one sweep per heartbeat period across all workers (a Redis lock that expires): stuck jobs,
        dead workers' jobs, and submits whose message was never sent."""
        if self._sweep is None:
            return
        try:
            if not self.workers.take_sweep(self.name, ttl_s=max(1, round(self.heartbeat_s))):
                return
            self._sweep(self.sees_the_fleet(time.monotonic()))
        except REDIS_DOWN as exc:
            self.redis.outage.failed(exc)  # the next heartbeat tries again
        except Exception:
            log.exception("stuck-job sweep failed")


def fleet_sweep(
    store: JobStore,
    workers: WorkerRegistry,
    max_attempts: int,
    enqueue: Callable[[Job], None],
    models: Sequence[str] = (),
    waiting_messages: Callable[[str], int] | None = None,
) -> Callable[[bool], None]:
    """The sweep a worker runs when it holds the lock (worker/sweeper.py): overdue jobs, dead workers' jobs (when
    this worker can tell them dead), the outbox, and (given the length of a model's queue) the ready jobs of
    `models` that no message would take."""

    def sweep(dead_workers_too: bool) -> None:
        sweeper.sweep(store, max_attempts, enqueue)
        if dead_workers_too:
            sweeper.reissue_dead_workers(store, workers, enqueue)
            sweeper.reissue_unheld(store, workers, enqueue)
        sweeper.relay_outbox(store, enqueue)
        if waiting_messages is not None:
            sweeper.wake_stranded(store, models, waiting_messages, enqueue)

    return sweep
