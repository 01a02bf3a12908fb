"""The device loop's composition root: its stages (worker/loop/) built from one settings object, its threads, its
start and its shutdown.

    Celery thread ── submit(job_id) ──> inbox ──> [device thread] admission -> batcher -> running -> dispatch
                                          ^ a slot come free         (a job taken only when a slot could start it)
                                                        │ (JAX dispatch is asynchronous)
                                                        v
                               [finisher thread] progress, fetch -> image writer (upload pool) -> recorder -> futures

The device thread only gathers and dispatches, so the next batch is queued on the device while the previous
one's images are copied off, encoded and uploaded. A Celery task waits on its job's future and returns (so its
message is acknowledged) only after the job's result is recorded.
"""

from __future__ import annotations

import functools
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

from common.batch_log import BatchLog
from common.job_store import JobStore
from common.jobs import Job
from common.loras import Registry
from common.outage import REDIS_DOWN, Outage, supervised
from common.settings import Settings
from common.storage import Storage
from common.worker_registry import WorkerRegistry
from worker import sweeper
from worker.loop.admission import Admission
from worker.loop.device_clock import DeviceClock
from worker.loop.dispatcher import MAX_IN_FLIGHT, Dispatcher, Message
from worker.loop.engine_port import EnginePort, Engines
from worker.loop.finisher import PREVIEW_EVERY_STEPS, Finisher
from worker.loop.outcome import JobOutcome
from worker.loop.presence import HEARTBEAT_S, Presence, fleet_sweep
from worker.loop.recorder import Recorder
from worker.loop.results import ImageWriter
from worker.loop.retry import RedisRetry, StorageRetry
from worker.loop.slots import Slots


@dataclass(frozen=True)
class LoopSettings:
    batch_timeout_s: float  # a short batch waits this long for company (SDXL_BATCH_TIMEOUT_S)
    upload_threads: int = 8  # images encoded and uploaded at once
    upload_attempts: int = 5  # the storage backoff (uploads, and the reads before a job is batched)
    upload_backoff_s: float = 0.5
    upload_backoff_max_s: float = 8.0
    max_attempts: int = 3  # runs of a job before it fails
    heartbeat_s: float = HEARTBEAT_S
    preview_every_steps: int = PREVIEW_EVERY_STEPS  # a `preview: true` job's preview after this many steps

    @classmethod
    def of(cls, settings: Settings) -> LoopSettings:
        return cls(
            batch_timeout_s=settings.batch_timeout_s,
            upload_threads=settings.upload_threads,
            upload_attempts=settings.upload_attempts,
            upload_backoff_s=settings.upload_backoff_s,
            upload_backoff_max_s=settings.upload_backoff_max_s,
            max_attempts=settings.max_attempts,
            preview_every_steps=settings.preview_every_steps,
        )


def _sweeps(
    store: JobStore,
    workers: WorkerRegistry,
    max_attempts: int,
    enqueue: Callable[[Job], None] | None,
    models: list[str],
    waiting_messages: Callable[[str], int] | None,
) -> tuple[Callable[[bool], None] | None, Callable[[str, list[str]], object] | None]:
    """The fleet's sweep, and what this worker does with the held jobs it does not know of (worker/sweeper.py);
    neither without a way to send messages."""
    if enqueue is None:
        return None, None
    sweep = fleet_sweep(store, workers, max_attempts, enqueue, models, waiting_messages)
    return sweep, functools.partial(sweeper.reissue_orphans, store, workers, enqueue)


class DeviceLoop:
    def __init__(
        self,
        engines: EnginePort | Mapping[str, EnginePort],
        store: JobStore,
        storage: Storage,
        settings: LoopSettings,
        *,
        workers: WorkerRegistry,
        batches: BatchLog,
        name: str | None = None,
        loras: Registry | None = None,
        # sends a job's message (again) to its model's queue (the sweep, admission); None: no sweeps
        enqueue: Callable[[Job], None] | None = None,
        notify: Callable[[str], None] | None = None,  # queues the webhook of a job that has ended
        # the messages waiting on a model's interactive queue (its length); None: no stranded-job sweep
        waiting_messages: Callable[[str], int] | None = None,
    ):
        self.store, self.storage, self.workers, self.batches = store, storage, workers, batches
        self.name = name or f"{socket.gethostname()}-{id(self):x}"
        served = Engines(engines)
        self._stop, self._draining = threading.Event(), threading.Event()
        redis = RedisRetry(Outage("device loop: Redis"), self._stop)  # shared by the device and finisher threads
        storage_retry = StorageRetry(
            settings.upload_attempts,
            settings.upload_backoff_s,
            settings.upload_backoff_max_s,
            Outage("uploads: storage"),  # one warning an outage, not one a retry
        )
        sweep, reissue = _sweeps(store, workers, settings.max_attempts, enqueue, list(served.by_name), waiting_messages)
        self.presence = Presence(self.name, served, workers, batches, redis, settings.heartbeat_s, sweep, reissue)
        writer = ImageWriter(storage, storage_retry)
        recorder = Recorder(store, redis, self.presence, writer, settings.max_attempts, notify)
        admission = Admission(
            store, redis, self.presence, recorder, served, storage, storage_retry, settings.max_attempts, loras, enqueue
        )
        self._finishing = ThreadPoolExecutor(1, thread_name_prefix="finish")  # records batches in order
        self._uploads = ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="upload")
        inbox: queue.Queue[Message | None] = queue.Queue()
        in_flight = Slots(MAX_IN_FLIGHT, wake=lambda: inbox.put(None))  # a slot come free: take jobs again
        clock = DeviceClock()  # when the batches in flight leave the device: the dispatcher forms the next one then
        finish = (self.presence, self._uploads, in_flight, self._stop, settings.preview_every_steps, clock)
        finisher = Finisher(store, redis, served, writer, recorder, *finish)
        self.dispatcher = Dispatcher(
            served,
            store,
            redis,
            admission,
            recorder,
            self.presence,
            finisher,
            lambda started: self._finishing.submit(finisher.finish, started),
            in_flight,
            settings.batch_timeout_s,
            self._stop,
            self._draining,
            inbox,
            clock,
        )
        # if the device thread dies, the process exits: never a silent worker
        self._thread = supervised(self.dispatcher.run, "device")

    def submit(self, job_id: str | None, generation: int | None = None, model: str | None = None) -> Future[JobOutcome]:
        """From a Celery thread: queue a job for the device; the future resolves to its outcome once recorded.
        `job_id` None (an interactive job's message): the next interactive job for `model` (None: the default
        model) in fair order, or `idle`.
        `generation` is the message's: a message older than the job's current one (re-sent after its worker
        died) is answered `stale` and never runs; None (a data set feeder's message) is taken as current."""
        future: Future[JobOutcome] = Future()
        self.dispatcher.inbox.put(Message(job_id, generation, future, model))
        return future

    def start(self) -> None:
        self.presence.beat()
        self._thread.start()

    def begin_shutdown(self) -> None:
        """SIGTERM: jobs not yet on the device go back to the queue; batches in flight finish and record."""
        self._draining.set()
        self.dispatcher.inbox.put(None)

    def stop(self) -> None:
        self._stop.set()
        self.dispatcher.inbox.put(None)  # wake the device thread now rather than at its next heartbeat
        self._thread.join(timeout=30)
        self._finishing.shutdown(wait=True)
        self._uploads.shutdown(wait=True)
        with suppress(*REDIS_DOWN):  # a clean exit: nothing is held, and /readyz need not wait for the heartbeat
            self.presence.forget()
