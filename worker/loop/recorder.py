"""Where a job's run ends: its end written to the job store (succeeded with its images, failed with the reason,
back to the queue after a failed upload, its images discarded when it was canceled while running), its message
answered (the future its Celery task waits on, released from this worker's held jobs), its metrics and counters,
and its webhook queued once it has ended. Every status change after queued -> running is made here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from common.job_store import JobStore
from common.jobs import ImageRecord, Job, JobStatus
from worker import metrics
from worker.loop.batch import Admitted
from worker.loop.outcome import JobOutcome
from worker.loop.presence import Presence
from worker.loop.results import ImageWriter
from worker.loop.retry import RedisRetry

log = logging.getLogger(__name__)
NON_FINITE = "the model produced non-finite values (NaN or inf) for this job"


def engine_error(exc: BaseException) -> str:
    return f"engine error: {type(exc).__name__}: {exc}"


class Recorder:
    def __init__(
        self,
        store: JobStore,
        redis: RedisRetry,
        presence: Presence,
        writer: ImageWriter,
        max_attempts: int,
        notify: Callable[[str], None] | None = None,
    ):
        self.store = store
        self.redis = redis
        self.presence = presence
        self.writer = writer
        self.max_attempts = max_attempts
        self.notify = notify  # queues the webhook of a job that has ended

    # ------------------------------------------------------------------ before a run

    def refuse(self, job_id: str, future: Future[JobOutcome], outcome: JobOutcome) -> None:
        """A message answered without running its job (ended already, superseded, not this worker's model, given
        back): released, then answered."""
        self.presence.release([job_id])
        future.set_result(outcome)

    def hand_back(self, job: Job, future: Future[JobOutcome], outcome: JobOutcome) -> None:
        """A job given back unrun (storage away, a model this worker does not hold): as `refuse`, once an
        interactive job is ready again for any worker to take (its message names no job, so putting the message
        back would not bring the job back); a data set line's message carries it back."""
        if job.lane != "bulk":
            self.redis(self.store.give_back, job)  # before the release: in the held set or ready, never neither
        self.refuse(job.id, future, outcome)

    def give_back(self, waiting: Iterable[Admitted]) -> None:
        """Shutting down: jobs still waiting for a batch go back to the queue (see hand_back)."""
        waiting = list(waiting)
        for admitted in waiting:
            if admitted.job.lane != "bulk":
                self.redis(self.store.give_back, admitted.job)
        if waiting:
            self.presence.release([a.id for a in waiting])
        for admitted in waiting:
            admitted.future.set_result(JobOutcome.requeue)

    def fail_unrun(self, job: Job, future: Future[JobOutcome], error: str) -> None:
        """A job that must never run (out of attempts, or what it needs is gone from storage): failed from queued
        or running, released, answered, its webhook queued."""
        self.redis(
            self.store.fail,
            job.id,
            error,
            allowed_from=[JobStatus.queued, JobStatus.running],
            tenant=job.tenant,
            model=job.request.model,
        )
        self.refuse(job.id, future, JobOutcome.failed)
        self._notify(job, JobOutcome.failed)

    # ------------------------------------------------------------------ after a run

    def fail(self, job: Job, error: str) -> None:
        """running -> failed with the reason (its message is answered when its batch resolves)."""
        self.redis(self.store.fail, job.id, error, tenant=job.tenant)

    def uploaded(self, job: Job, uploads: list[Future[ImageRecord]], truncated: bool) -> JobOutcome | None:
        """Record a job's run once its uploads end: succeeded with its images, or after a failed upload back to
        the queue (JobOutcome.requeue: its message goes back too) or, out of attempts, failed. None: the store
        holds the job's outcome."""
        try:
            written = [upload.result() for upload in uploads]
        except Exception as exc:
            return self._requeue_or_fail(job, f"upload failed: {type(exc).__name__}: {exc}")
        self._succeed(job, written, truncated)
        return None

    def _requeue_or_fail(self, job: Job, error: str) -> JobOutcome | None:
        attempts = (self.redis(self.store.get, job.id) or job).attempts
        if attempts < self.max_attempts:
            requeued, _ = self.redis(
                self.store.transition,
                job.id,
                JobStatus.queued,
                [JobStatus.running],
                tenant=job.tenant,
                model=job.request.model,
            )
            if requeued:
                # Back to the queue (the Celery message is rejected with requeue): it runs again later.
                log.warning("job %s requeued after attempt %d: %s", job.id, attempts, error)
                return JobOutcome.requeue
        self.fail(job, f"{error} (attempt {attempts} of {self.max_attempts})")
        return None

    def _succeed(self, job: Job, written: list[ImageRecord], truncated: bool) -> None:
        if self.redis(self.store.succeed, job.id, written, truncated, tenant=job.tenant):
            return
        if self.redis(self.store.status, job.id) != JobStatus.canceled:
            return
        # Canceled while running: the results are discarded, as the cancel answer promised, and so is their
        # folder. (If another run of the same job succeeded first, the objects under these keys are its results:
        # keep them.) Storage away now: the image sweep deletes them once the record expires.
        try:
            self.writer.delete(written)
        except Exception:
            log.warning("could not delete canceled job %s's images; the image sweep will", job.id, exc_info=True)

    def resolve(self, batch: Iterable[Admitted], verdicts: dict[str, JobOutcome]) -> None:
        """Every Celery task of a batch gets its answer, whatever happened: none is left hanging. `verdicts`: the
        outcomes decided during the run (requeue); the rest are read from the store."""
        batch = list(batch)
        self.presence.release([a.id for a in batch])
        for admitted in batch:
            if admitted.future.done():  # answered before the run (canceled while queued): not this run's to count
                continue
            outcome = verdicts.get(admitted.id) or JobOutcome.of(self.redis(self.store.status, admitted.id))
            admitted.future.set_result(outcome)
            self._observe(admitted.job, outcome)
            self._notify(admitted.job, outcome)

    def _observe(self, job: Job, outcome: JobOutcome) -> None:
        if outcome.terminal:
            latency_s = max(0.0, time.time() - job.created_at)
            metrics.LATENCY.labels(*metrics.job_labels(job), outcome.metric_label).observe(latency_s)
            log.info("job %s after %.2f s", outcome.value, latency_s, extra={"job_id": job.id})
        elif outcome is JobOutcome.requeue:
            log.info("job requeued", extra={"job_id": job.id})
        if outcome.metric_label is not None:
            self.presence.count_job(outcome.metric_label)

    def _notify(self, job: Job, outcome: JobOutcome) -> None:
        if self.notify is not None and job.request.webhook_url and outcome.terminal:
            self.redis(self.notify, job.id)
