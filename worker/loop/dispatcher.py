"""The dispatcher: the device thread. Messages from the Celery threads are admitted (admission.py) into the
batcher; each due batch's jobs move queued -> running, and the batch is dispatched on its model's engine (JAX
dispatch is asynchronous) and handed to the finisher, with at most MAX_IN_FLIGHT batches dispatched and not yet
recorded. The device thread also writes the heartbeat and runs the sweep (presence.py), between batches and
while it waits for a free slot, so that a busy worker never looks dead.

A job is taken from the fair queue (admitted) only when the batch it goes into can start soon: messages wait in
`waiting`, unadmitted, while the batcher holds a batch ready to start, while no slot is free, and until the batches
in flight are about to leave the device (device_clock.py). A wake-up names no job, and the job it is answered with
is picked at admission, in fair order; a job picked early waits in this worker behind batches already formed,
where a tenant arriving later cannot pass it and another worker cannot take it. Taking every message as it came,
a busy worker held three batches (one running, one queued, one formed waiting for a slot), and an honest tenant's
next job waited behind all three under a flood from another tenant (docs/reliability.md)."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import NamedTuple

from common.job_store import JobStore
from common.jobs import JobStatus
from worker import metrics
from worker.batcher import Batcher
from worker.loop.admission import Admission
from worker.loop.batch import Admitted, BatchKey, LoopBatch
from worker.loop.device_clock import DeviceClock
from worker.loop.engine_port import Engines
from worker.loop.finisher import Finisher, Started
from worker.loop.outcome import JobOutcome
from worker.loop.presence import Presence
from worker.loop.recorder import Recorder
from worker.loop.retry import RedisRetry
from worker.loop.slots import Slots

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 2  # batches dispatched but not yet recorded: one running, one queued behind it


class Message(NamedTuple):
    """A job's message as a Celery thread hands it over."""

    job_id: str | None  # None: an interactive job's wake-up, answered by the next job in fair order
    generation: int | None  # the message's (None: a data set feeder's, taken as current)
    future: Future[JobOutcome]  # answered once the job's outcome is recorded
    model: str | None = None  # a wake-up's: whose ready jobs it takes (None: the default model's)


class Dispatcher:
    def __init__(
        self,
        engines: Engines,
        store: JobStore,
        redis: RedisRetry,
        admission: Admission,
        recorder: Recorder,
        presence: Presence,
        finisher: Finisher,
        hand_off: Callable[[Started], object],
        in_flight: Slots,
        batch_timeout_s: float,
        stop: threading.Event,
        draining: threading.Event,
        inbox: queue.Queue[Message | None] | None = None,
        clock: DeviceClock | None = None,
    ):
        self.engines = engines
        self.store = store
        self.redis = redis
        self.admission = admission
        self.recorder = recorder
        self.presence = presence
        self.finisher = finisher
        self.hand_off = hand_off  # queues a started batch for the finisher thread
        self.in_flight = in_flight
        self.stop = stop
        self.draining = draining  # SIGTERM: what has not reached the device goes back to the queue
        self.batcher = Batcher[BatchKey, Admitted](engines.default.batch_rows, batch_timeout_s)
        # None: wake up (to stop, to drain, or a slot came free)
        self.inbox: queue.Queue[Message | None] = queue.Queue() if inbox is None else inbox
        self.waiting: collections.deque[Message] = collections.deque()  # arrived, not yet admitted
        self.clock = DeviceClock() if clock is None else clock  # the finisher's too: it sees batches leave

    def run(self) -> None:
        """The device thread, until the loop stops."""
        heartbeat_s = self.presence.heartbeat_s
        next_beat = time.monotonic() + heartbeat_s
        while not self.stop.is_set():
            deadline = self.batcher.next_deadline_s()
            # no slot free: nothing can start before one comes free, which wakes this thread (a None in the inbox)
            idle = deadline is None or self.in_flight.free == 0
            wait_s = heartbeat_s if idle else max(0.0, deadline - time.monotonic())
            if self.waiting and self.in_flight.free > 0:  # messages wait for the batches ahead to near their end
                formable_s = self.clock.formable_in_s(time.monotonic())
                wait_s = min(wait_s, formable_s) if formable_s > 0 else wait_s
            self.take_messages(min(wait_s, heartbeat_s))
            if self.draining.is_set():
                self.recorder.give_back(item.payload for item in self.batcher.drain())
                continue
            self.start_due(time.monotonic())
            if time.monotonic() >= next_beat:
                if self.presence.beat():
                    self.presence.reconcile()
                    self.presence.sweep()
                next_beat = time.monotonic() + heartbeat_s

    def take_messages(self, timeout_s: float) -> None:
        """Wait up to timeout_s for a message (or a wake-up), then take everything that has arrived, so a burst
        fills one batch; admit as many as the free slots could start."""
        try:
            message = self.inbox.get(timeout=timeout_s)
            while True:
                if message is not None:
                    self.waiting.append(message)
                message = self.inbox.get_nowait()
        except queue.Empty:
            pass
        while self.waiting and self._room():
            self._admit(self.waiting.popleft())

    def _room(self) -> bool:
        """Whether another job may be taken: no batch is ready yet, a slot is free, and the batches in flight will
        have left the device within the lead (device_clock.py); draining: every message is answered at once."""
        if self.draining.is_set():
            return True
        if self.in_flight.free == 0 or self.batcher.ready_batches() > 0:
            return False
        return self.clock.formable_in_s(time.monotonic()) == 0

    def _admit(self, message: Message) -> None:
        if self.draining.is_set():  # not held yet: nothing to release
            message.future.set_result(JobOutcome.requeue)
            return
        admitted = self.admission.admit(message.job_id, message.generation, message.future, message.model)
        if admitted is not None:
            self.batcher.add(admitted.item(time.monotonic()))

    def start_due(self, now_s: float) -> None:
        """Start the due batches a free slot can take; the others wait in the batcher, their jobs still queued."""
        for batch in self.batcher.take_due(now_s, limit=self.in_flight.free):
            self.start(batch)

    def start(self, batch: LoopBatch) -> None:
        """Move the batch's jobs to running and dispatch them, once a slot is free."""
        running = [admitted for admitted in (item.payload for item in batch.items) if self._to_running(admitted)]
        if not running:
            return
        # Wait for a free slot (the batch before last to finish), heartbeating meanwhile: a batch may run
        # longer than the heartbeat's life, and a busy worker must not look dead to /readyz or probes.
        while not self.in_flight.acquire(timeout=self.presence.heartbeat_s):
            self.presence.beat()
        batch_id = uuid.uuid4().hex[:12]
        log.info(
            "batch of %d rows started: jobs %s",
            sum(a.job.request.num_images for a in running),
            ",".join(a.id for a in running),
            extra={"batch_id": batch_id},
        )
        try:
            pending = self.engines.dispatch(batch.shape, [row for a in running for row in a.rows])
        except Exception as exc:  # raised while tracing or validating: nothing reached the device
            log.exception("dispatch failed")
            self.finisher.failed_dispatch(batch, running, exc)
            return
        dispatched_s = time.monotonic()
        self.clock.dispatched(batch_id, batch.shape, pending.steps, dispatched_s)
        self.hand_off(Started(batch, running, pending, dispatched_s, batch_id))

    def _to_running(self, admitted: Admitted) -> bool:
        """queued -> running; a redelivered job (running after a worker died) keeps running here. False: it
        ended before it ran (canceled), and its message is answered: it never runs. Replicated (with
        SDXL_REDIS_WAIT_REPLICAS): a failover that lost this change, and the take before it, left the job ready
        with its attempts uncounted, and another worker ran it again (20 of 10,077 jobs in a chaos run)."""
        job = admitted.job
        ok, before = self.redis(
            self.store.transition,
            job.id,
            JobStatus.running,
            [JobStatus.queued, JobStatus.running],
            tenant=job.tenant,
            model=job.request.model,
            replicated=True,
            worker=self.presence.name,
        )
        if ok:
            metrics.QUEUE_WAIT.labels(*metrics.job_labels(job)).observe(max(0.0, time.time() - job.created_at))
        else:
            self.recorder.refuse(job.id, admitted.future, JobOutcome.of(before))
        return ok
