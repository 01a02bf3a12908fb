"""Admission: a job's message, taken off the queue by a Celery thread, checked against the job's record before the
job may wait for a batch. The job is held first (should this worker die now, the sweep finds it), then read;
`judge` decides from the record alone; what an admitted job needs from storage (its adapter files, its input
images) is fetched now, with the storage backoff, so that a batch never waits on storage."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from common import inputs
from common.job_store import JobStore
from common.jobs import TERMINAL, ControlPreprocess, Job
from common.loras import Registry
from common.storage import Storage
from worker.engine import canny
from worker.loop.batch import Admitted, InputPixels
from worker.loop.engine_port import Engines
from worker.loop.outcome import JobOutcome
from worker.loop.presence import Presence
from worker.loop.recorder import Recorder
from worker.loop.retry import RedisRetry, StorageRetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Admission's decision on one message: admit the job (`outcome` None), or answer now with `outcome`; with
    `error`, the job is failed with it first (it must never run)."""

    outcome: JobOutcome | None = None
    error: str | None = None


ADMIT = Verdict()


class Gone(Exception):
    """Something the job needs is no longer in storage (or no longer served): it never runs."""


def judge(job: Job | None, generation: int | None, max_attempts: int, engines: Engines) -> Verdict:
    """From the job's record and this worker's models alone. `generation`: the message's; an older one than the
    record's was superseded (its worker died and the sweep sent the job again); None (a data set feeder's
    message) is taken as current."""
    if job is None:
        return Verdict(JobOutcome.missing)  # expired or never stored: nothing to do
    if job.status in TERMINAL:  # canceled while queued, or a redelivery of a finished job
        return Verdict(JobOutcome(job.status.value))
    if generation is not None and generation < job.generation:
        return Verdict(JobOutcome.stale)
    if job.attempts >= max_attempts:  # it keeps coming back: a worker died on it each time
        reason = f"gave up after {job.attempts} attempts (the worker running it stopped each time)"
        return Verdict(JobOutcome.failed, reason)
    if not engines.holds(job.request.model):
        return Verdict(JobOutcome.not_here)
    return ADMIT


class Admission:
    def __init__(
        self,
        store: JobStore,
        redis: RedisRetry,
        presence: Presence,
        recorder: Recorder,
        engines: Engines,
        storage: Storage,
        storage_retry: StorageRetry,
        max_attempts: int,
        loras: Registry | None = None,
        reroute: Callable[[Job], None] | None = None,
    ):
        self.reroute = reroute  # sends a job's message to its model's queue
        self.store = store
        self.redis = redis
        self.presence = presence
        self.recorder = recorder
        self.engines = engines
        self.storage = storage
        self.storage_retry = storage_retry
        self.max_attempts = max_attempts
        self.loras = loras  # the adapter registry: a job's adapters are fetched (from storage) before it is batched

    def admit(
        self, job_id: str | None, generation: int | None, future: Future[JobOutcome], model: str | None = None
    ) -> Admitted | None:
        """The job, ready to wait for its batch; or None with its message answered. `job_id` None: a wake-up
        message (an interactive job's), answered by the next job for `model` (None: the default model) in fair
        order (common/job_store.py take); a worker takes only from its own models' ready sets."""
        if job_id is None:
            if model is not None and not self.engines.holds(model):  # on a queue of a model it does not hold
                log.warning("wake-up for model %r, which this worker does not hold: refused", model)
                future.set_result(JobOutcome.not_here)  # back on its queue after a pause (worker/tasks.py)
                return None
            job_id = self.redis(self.store.take, self.presence.name, model)  # held by the script that takes it
            if job_id is None:
                future.set_result(JobOutcome.idle)  # its job was taken by an earlier wake-up, or canceled
                return None
            self.presence.took(job_id)
        else:
            self.presence.hold(job_id)
        job = self.redis(self.store.get, job_id)
        verdict = judge(job, generation, self.max_attempts, self.engines)
        if verdict.outcome is None:
            assert job is not None
            return self._fetch(job, future)
        if verdict.error is not None and job is not None:
            self.recorder.fail_unrun(job, future, verdict.error)
            return None
        if verdict.outcome is JobOutcome.not_here and job is not None:
            if job.lane == "bulk":  # a data set line's message names its job: sent on to its model's queue
                self.recorder.refuse(job_id, future, self._send_on(job))
            else:  # an interactive job taken from the ready sets: ready again for a worker that holds its model
                model = job.request.model
                log.info("job for model %r, not held here: given back", model, extra={"job_id": job_id})
                self.recorder.hand_back(job, future, verdict.outcome)
            return None
        self.recorder.refuse(job_id, future, verdict.outcome)
        return None

    def _send_on(self, job: Job) -> JobOutcome:
        """A job for a model this worker does not hold (a message from before model queues, on a lane's own
        queue): sent to its model's queue, where only workers holding it look; handed back if it cannot be."""
        model = job.request.model
        if self.reroute is not None:
            try:
                self.reroute(job)
                log.info("job for model %r, not held here: sent to its model's queue", model, extra={"job_id": job.id})
                return JobOutcome.rerouted
            except Exception:
                log.warning("could not send job %s on to its model's queue", job.id, exc_info=True)
        log.info("job for model %r, which this worker does not hold: handed back", model, extra={"job_id": job.id})
        return JobOutcome.not_here

    def _fetch(self, job: Job, future: Future[JobOutcome]) -> Admitted | None:
        """What the job needs from storage, read now. An object that is missing fails the job; storage away
        beyond the backoff gives it back to the queue, to be read again later."""
        try:
            self._fetch_adapters(job)
            return Admitted(job, future, self._read_inputs(job))
        except Gone as gone:
            self.recorder.fail_unrun(job, future, str(gone))
        except Exception:
            log.warning("could not read what job %s needs from storage; requeued", job.id, exc_info=True)
            self.recorder.hand_back(job, future, JobOutcome.requeue)
        return None

    def _fetch_adapters(self, job: Job) -> None:
        """The job's adapter files, here (from a storage prefix they are copied into SDXL_LORA_CACHE_DIR)."""
        if self.loras is None:
            return
        for lora in job.request.loras:
            try:
                self.storage_retry(functools.partial(self.loras.path_of, lora.name))
            except KeyError as exc:  # removed from SDXL_LORA_DIR since the API took the job
                raise Gone(f"LoRA adapter {exc.args[0]!r} is no longer served") from None

    def _read_inputs(self, job: Job) -> InputPixels:
        """The job's input images as pixels; a ControlNet's image preprocessed as the request says (canny edges)."""
        read = {}
        r = job.request
        # every input at the job's size, which the engine takes: a job's were stored for it, in whichever encoding
        # the API found smallest that decodes, by this call, to exactly the job's pixels (common/inputs.stored_form);
        # a data set line may name an image a job of another size stored, brought to the line's the same way. The
        # IP-Adapter's image too (its encoder resizes it again): so its pixels are those its hash is of
        assert r.width is not None and r.height is not None  # filled in at submit, and for each line at ingest
        at = (r.width, r.height)
        for name in ("init_image", "mask_image"):
            key = getattr(r, name)
            if key is not None:
                read[name] = inputs.pixels(self._read(key), mask=name == "mask_image", size=at)
        controls = []
        for c in r.controlnets:
            image = inputs.pixels(self._read(c.image), mask=False, size=at)
            if c.preprocess is ControlPreprocess.canny:
                image = canny.edges(image, c.low_threshold, c.high_threshold)
            controls.append(image)
        ip = r.ip_adapter
        ip_image = inputs.pixels(self._read(ip.image), mask=False, size=at) if ip is not None else None
        return InputPixels(read.get("init_image"), read.get("mask_image"), tuple(controls), ip_image)

    def _read(self, key: str) -> bytes:
        try:
            return self.storage_retry(functools.partial(self.storage.get, key))
        except KeyError as exc:  # deleted by hand, or another deployment's key
            raise Gone(f"input image {exc.args[0]!r} is no longer in storage") from None
