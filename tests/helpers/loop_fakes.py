"""In-memory fakes for the stages' unit tests, stated as such: a job store, a worker registry and a batch log
that keep their records in dicts and lists and note every call, so that a test says what a stage asked of Redis
without a Redis. The store follows common/jobs.py's transition table and counts attempts as the real one does,
and nothing more: the real store, its Lua and its outages are tested against a real Redis
(tests/common/test_job_store.py) and run under the loop in tests/worker/test_device_loop.py. Also here: an
executor that runs each call at once (the upload pool without threads), a fixed pending batch, jobs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from common.batch_log import BatchRecord
from common.jobs import TERMINAL, TRANSITIONS, ImageRecord, Job, JobRequest, JobStatus, Progress
from common.outage import Outage
from common.storage import LocalStorage
from common.worker_status import WorkerStatus
from worker.engine.engine import Output
from worker.engine.standin import StandInEngine
from worker.loop.engine_port import EnginePort, Engines
from worker.loop.presence import Presence
from worker.loop.recorder import Recorder
from worker.loop.results import ImageWriter
from worker.loop.retry import RedisRetry, StorageRetry


def make_job(prompt: str = "a cat", status: JobStatus = JobStatus.queued, n: int = 1, **fields: Any) -> Job:
    """A job record as the API stores it (size and seed filled in); `fields` go to the request or the record."""
    record_fields = {k: fields.pop(k) for k in list(fields) if k in Job.model_fields}
    request = JobRequest(
        **{"width": 64, "height": 64, "seed": 7, "steps": 4, **fields, "prompt": prompt, "num_images": n}
    )
    return Job(
        id=record_fields.pop("id", f"job-{prompt.replace(' ', '-')}"),
        status=status,
        request=request,
        created_at=time.time(),
        **record_fields,
    )


class FakeStore:
    def __init__(self, *jobs: Job):
        self.jobs = {job.id: job for job in jobs}
        self.calls: list[tuple[str, str]] = []  # (method, job id), in order
        self.progress: list[dict[str, Progress]] = []
        self.ready: list[str] = []  # job ids in the order take() answers them

    def get(self, job_id: str) -> Job | None:
        self.calls.append(("get", job_id))
        return self.jobs.get(job_id)

    def status(self, job_id: str) -> JobStatus | None:
        self.calls.append(("status", job_id))
        job = self.jobs.get(job_id)
        return job.status if job else None

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        return [self.jobs[i].status if i in self.jobs else None for i in job_ids]  # not in `calls`: a poll

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        allowed_from: Iterable[JobStatus] | None = None,
        tenant: str | None = None,
        model: str | None = None,
        replicated: bool = False,  # the real store's WAIT: tests/common/test_job_store.py
        **fields: Any,
    ) -> tuple[bool, JobStatus | None]:
        self.calls.append((f"transition:{to.value}", job_id))
        job = self.jobs.get(job_id)
        if job is None:
            return False, None
        allowed = set(allowed_from) if allowed_from is not None else {s for s, n in TRANSITIONS.items() if to in n}
        before = job.status
        if before not in allowed or to not in TRANSITIONS[before]:
            return False, before
        update: dict[str, Any] = {"status": to, **fields}
        if to is JobStatus.running:
            update["attempts"] = job.attempts + 1
        self.jobs[job_id] = job.model_copy(update=update)
        return True, before

    def succeed(self, job_id: str, images: list[ImageRecord], truncated: bool, tenant: str | None = None) -> bool:
        ok, _ = self.transition(job_id, JobStatus.succeeded, [JobStatus.running], images=images, truncated=truncated)
        return ok

    def fail(
        self,
        job_id: str,
        error: str,
        allowed_from: Iterable[JobStatus] = (JobStatus.running,),
        tenant: str | None = None,
        model: str | None = None,
    ) -> bool:
        ok, _ = self.transition(job_id, JobStatus.failed, allowed_from, error=error)
        return ok

    def take(self, worker: str, model: str | None = None) -> str | None:
        """The first of `ready`, the test's fair order (the real store's fair take is tested in
        tests/common/test_job_store.py); None when it is empty. Noted."""
        self.calls.append(("take", str(model)))
        return self.ready.pop(0) if self.ready else None

    def give_back(self, job: Job) -> bool:
        """Ready again (the real store's ready set is tested in tests/common/test_job_store.py): noted only."""
        self.calls.append(("give_back", job.id))
        return self.jobs.get(job.id) is not None and self.jobs[job.id].status is JobStatus.queued

    def record_progress(self, steps_done: dict[str, Progress]) -> None:
        self.progress.append(steps_done)

    def ended(self) -> dict[str, JobStatus]:
        return {i: j.status for i, j in self.jobs.items() if j.status in TERMINAL}


class FakeRegistry:
    def __init__(self) -> None:
        self.held_sets: dict[str, set[str]] = {}  # worker -> the jobs it holds
        self.beats: list[tuple[WorkerStatus, float]] = []
        self.sweeps_taken: list[tuple[str, int]] = []
        self.sweep_free = True
        self.down = False  # beat() raises as a lost connection does
        self.released: list[list[str]] = []

    def hold(self, worker: str, job_id: str) -> None:
        self.held_sets.setdefault(worker, set()).add(job_id)

    def held(self, worker: str) -> list[str]:
        return sorted(self.held_sets.get(worker, set()))

    def release(self, worker: str, job_ids: Iterable[str]) -> None:
        job_ids = list(job_ids)
        self.released.append(job_ids)
        self.held_sets.get(worker, set()).difference_update(job_ids)

    def beat(self, status: WorkerStatus, ttl_s: float) -> None:
        if self.down:
            raise redis.exceptions.ConnectionError("Redis is away")
        self.beats.append((status, ttl_s))

    def take_sweep(self, owner: str, ttl_s: int) -> bool:
        self.sweeps_taken.append((owner, ttl_s))
        return self.sweep_free

    def forget(self, name: str) -> None:
        self.held_sets.pop(name, None)


@dataclass
class FakeBatchLog:
    records: list[BatchRecord] = field(default_factory=list)

    def append(self, record: BatchRecord) -> None:
        self.records.append(record)


def redis_retry() -> RedisRetry:
    """The stages' Redis calls as the loop makes them (an Event: no thread waits on it here)."""
    return RedisRetry(Outage("test: Redis"), threading.Event())


class InlineExecutor(Executor):
    """Runs each call at once on the caller's thread: the finisher's upload pool without threads."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


@dataclass
class FixedPending:
    """A batch that has already run: `output` (or `error`, raised by fetch) and its progress marks."""

    output: Output | None = None
    error: Exception | None = None
    steps: int = 4
    marks: list[int] = field(default_factory=list)

    def progress(self) -> Iterator[int]:
        yield from self.marks

    def cancel(self) -> bool:
        return False  # it has already run

    def preview(self, done: int, row: int) -> np.ndarray | None:
        """A mid-grey 8x8 preview at each mark, for each of the output's rows."""
        if done not in self.marks or self.output is None or not 0 <= row < len(self.output.finite):
            return None
        return np.full((8, 8, 3), 128, np.uint8)

    def fetch(self) -> Output:
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output


def output(rows: int, finite: list[bool] | None = None, truncated: list[bool] | None = None) -> Output:
    """A batch's output of `rows` 64x64 images."""
    images = np.full((rows, 64, 64, 3), 90, np.uint8)
    return Output(images, truncated or [False] * rows, finite or [True] * rows)


@dataclass
class Rig:
    """The stages that write (presence, image writer, recorder) wired to the fakes and a local-folder storage."""

    store: FakeStore
    registry: FakeRegistry
    batch_log: FakeBatchLog
    storage: LocalStorage
    engines: Engines
    presence: Presence
    writer: ImageWriter
    recorder: Recorder
    notified: list[str]
    sleeps: list[float]


def rig(tmp_path: Path, *jobs: Job, engine: EnginePort | None = None, storage: LocalStorage | None = None) -> Rig:
    store, registry, batch_log = FakeStore(*jobs), FakeRegistry(), FakeBatchLog()
    storage = storage or LocalStorage(tmp_path, "http://x", b"k" * 32)
    engines = Engines(engine or StandInEngine([(64, 64)], 4, 0.0))
    presence = Presence("w1", engines, registry, batch_log, redis_retry())  # type: ignore[arg-type]
    sleeps: list[float] = []
    writer = ImageWriter(storage, StorageRetry(3, 0.5, 8.0, Outage("test: storage"), sleeps.append))
    notified: list[str] = []
    recorder = Recorder(store, redis_retry(), presence, writer, max_attempts=3, notify=notified.append)  # type: ignore[arg-type]
    return Rig(store, registry, batch_log, storage, engines, presence, writer, recorder, notified, sleeps)
