"""The finisher: a dispatched batch followed to its end, on its own thread (one: batches are recorded in order).
Progress as the device gets through the steps (a batch whose every job was canceled meanwhile stopped there,
its remaining chunks never enqueued; a preview every few steps for jobs that asked: preview.py), the images
fetched, written (results.py, on the upload pool) and
recorded (recorder.py). A batch that raises is run again job by job, so that a poison job fails alone."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from common.job_store import JobStore
from common.jobs import ImageRecord, Job, JobStatus, Progress
from common.logs import bound
from common.outage import REDIS_DOWN, die
from worker.batcher import Batch
from worker.loop import preview
from worker.loop.batch import Admitted, LoopBatch
from worker.loop.device_clock import DeviceClock
from worker.loop.engine_port import BatchOutput, Engines, PendingBatch
from worker.loop.outcome import JobOutcome
from worker.loop.presence import Presence
from worker.loop.recorder import NON_FINITE, Recorder, engine_error
from worker.loop.results import ImageWriter
from worker.loop.retry import RedisRetry
from worker.loop.slots import Slots

log = logging.getLogger(__name__)
# A batch's progress is written at most this often (and at its last step): a small model's steps take
# milliseconds, and Redis needs not hear of each.
PROGRESS_INTERVAL_S = 0.2
PREVIEW_EVERY_STEPS = 5  # SDXL_PREVIEW_EVERY_STEPS' default: 3 previews in a 20-step job


@dataclass
class Started:
    """A dispatched batch on its way to the finisher: its jobs that moved to running, in row order."""

    batch: LoopBatch
    running: list[Admitted]
    pending: PendingBatch
    dispatched_s: float  # monotonic
    batch_id: str = ""  # in the logs of the batch and its jobs, and in the batch log


def per_job(jobs: list[Job], per_row: list[bool]) -> dict[str, bool]:
    """A per-row flag as each job's: set when any of its rows has it."""
    flags, row = {}, 0
    for job in jobs:
        flags[job.id] = any(per_row[row : row + job.request.num_images])
        row += job.request.num_images
    return flags


def first_rows(jobs: list[Job]) -> dict[str, int]:
    """Each job's first row in the batch (jobs in row order, num_images rows each)."""
    rows, row = {}, 0
    for job in jobs:
        rows[job.id] = row
        row += job.request.num_images
    return rows


def progress_report(jobs: list[Job], done: int) -> dict[str, Progress]:
    """Each job's progress once the batch has run `done` steps (a job with fewer steps is done at its own)."""
    return {j.id: Progress(step=min(done, j.request.steps), steps=j.request.steps) for j in jobs}


class ProgressThrottle:
    """Whether a count of steps done is worth a report: at most one an interval, and always the last step's."""

    def __init__(self, steps: int, interval_s: float = PROGRESS_INTERVAL_S):
        self.steps = steps
        self.interval_s = interval_s
        self._last_s: float | None = None

    def due(self, now_s: float, done: int) -> bool:
        if self._last_s is not None and now_s - self._last_s < self.interval_s and done < self.steps:
            return False
        self._last_s = now_s
        return True


class Finisher:
    def __init__(
        self,
        store: JobStore,
        redis: RedisRetry,
        engines: Engines,
        writer: ImageWriter,
        recorder: Recorder,
        presence: Presence,
        uploads: Executor,
        in_flight: Slots,
        stop: threading.Event,
        preview_every_steps: int = PREVIEW_EVERY_STEPS,
        clock: DeviceClock | None = None,
    ):
        self.store = store
        self.redis = redis  # its outage noted by a dropped progress report
        self.engines = engines
        self.writer = writer
        self.recorder = recorder
        self.presence = presence
        self.uploads = uploads  # encodes and uploads images, several at once
        self.in_flight = in_flight  # a slot freed per batch ended (the dispatcher's limit)
        self.stop = stop
        self.preview_every_steps = preview_every_steps
        self.clock = DeviceClock() if clock is None else clock  # the dispatcher's: when batches leave the device
        self._device_free_s = 0.0  # when the previous batch finished on the device (for busy time)

    def finish(self, started: Started) -> None:
        """On the finisher thread: the batch's results recorded and every job answered, whatever happened."""
        try:
            with bound(batch_id=started.batch_id):
                verdicts: dict[str, JobOutcome] = {}
                try:
                    self._complete(started, verdicts)
                except Exception as exc:
                    log.exception("a batch failed")
                    self._isolate(started.batch, started.running, exc, verdicts)
                finally:
                    self.clock.forget(started.batch_id)
                    self._resolve(started.batch, verdicts)
        except BaseException as exc:  # the finisher cannot go on (its Celery tasks would wait for ever)
            if not self.stop.is_set():
                die("the finisher", exc)
            raise

    def failed_dispatch(self, batch: LoopBatch, running: list[Admitted], exc: Exception) -> None:
        """On the device thread: a batch whose dispatch raised (while tracing or validating: nothing reached the
        device), run again job by job, and answered."""
        verdicts: dict[str, JobOutcome] = {}
        try:
            self._isolate(batch, running, exc, verdicts)
        finally:
            self._resolve(batch, verdicts)

    def _resolve(self, batch: LoopBatch, verdicts: dict[str, JobOutcome]) -> None:
        self.in_flight.release()  # first: the device thread may dispatch the next batch meanwhile
        self.recorder.resolve([item.payload for item in batch.items], verdicts)

    def _isolate(
        self, batch: LoopBatch, running: list[Admitted], exc: Exception, verdicts: dict[str, JobOutcome]
    ) -> None:
        """A batch that raised: run each job alone, so a poison job fails by itself and the rest succeed."""
        if len(running) == 1:
            self.recorder.fail(running[0].job, engine_error(exc))
            return
        for admitted in running:
            alone = Batch(batch.shape, [i for i in batch.items if i.job_id == admitted.id], batch.batch_rows)
            try:
                pending = self.engines.dispatch(batch.shape, admitted.rows)
                self._complete(Started(alone, [admitted], pending, time.monotonic()), verdicts)
            except REDIS_DOWN:
                raise  # not the job's fault (only possible once stopping: the stages wait out outages)
            except Exception as err:
                self.recorder.fail(admitted.job, engine_error(err))

    def _complete(self, started: Started, verdicts: dict[str, JobOutcome]) -> None:
        """Follow the batch to its end, write each job's images and record them."""
        jobs = [a.job for a in started.running]
        if not self._follow(started.pending, jobs):
            # every job was canceled while it ran: its remaining chunks were never enqueued, the device is free for
            # the next batch, and each job's answer is its record's (canceled). It ran on the device: logged.
            log.info("batch canceled: every job was canceled while it ran; its remaining steps dropped")
            self._log_batch(started, jobs, complete=False)
            return
        out = started.pending.fetch()  # waits for the device; raises if the program failed there
        self._log_batch(started, jobs)
        uploads = self._write(jobs, out)
        truncated = per_job(jobs, out.truncated)
        for job in jobs:
            if job.id in uploads:
                outcome = self.recorder.uploaded(job, uploads[job.id], truncated[job.id])
                if outcome is not None:
                    verdicts[job.id] = outcome

    def _log_batch(self, started: Started, jobs: list[Job], complete: bool = True) -> None:
        """The batch in the batch log, with its time on the device (from its start, or the previous batch's end);
        the device clock told (a batch cut short is no measure of its kind)."""
        done_s = time.monotonic()
        device_s = done_s - max(started.dispatched_s, self._device_free_s)
        self._device_free_s = done_s
        self.clock.left(started.batch_id, done_s, device_s if complete else None)
        self.presence.log_batch(started.batch.shape, jobs, device_s, started.batch_id)

    def _write(self, jobs: list[Job], out: BatchOutput) -> dict[str, list[Future[ImageRecord]]]:
        """Each job's images on the upload pool; a job with a non-finite row fails instead."""
        uploads, row = {}, 0
        for job in jobs:
            n = job.request.num_images
            if all(out.finite[row : row + n]):
                engine = self.engines.of(job.request.model)
                used = out.adapters[row] if out.adapters else []
                uploads[job.id] = [
                    self.uploads.submit(self.writer.write, job, i, out.images[row + i], engine, used) for i in range(n)
                ]
            else:
                self.recorder.fail(job, NON_FINITE)
            row += n
        return uploads

    def _follow(self, pending: PendingBatch, jobs: list[Job]) -> bool:
        """Write the batch's interactive jobs' progress as the device gets through their steps, and after each chunk
        see whether every job was canceled meanwhile: then the batch's remaining chunks are dropped, and False.
        Best effort: with Redis away a report is dropped (the next one, or the end, says more), never waited for."""
        interactive = [job for job in jobs if job.lane != "bulk"]
        previewing = [job for job in interactive if job.request.preview]
        rows = first_rows(jobs)
        throttle = ProgressThrottle(pending.steps)
        last_preview = 0  # steps done at the last preview
        for done in pending.progress():
            if done < pending.steps and self._all_canceled(jobs) and pending.cancel():
                return False
            if not interactive or not throttle.due(time.monotonic(), done):
                continue
            report = progress_report(interactive, done)
            if previewing and preview.due(done, last_preview, pending.steps, self.preview_every_steps):
                last_preview = done
                self._add_previews(pending, done, report, previewing, rows)
            try:
                self.store.record_progress(report)
            except REDIS_DOWN as exc:
                self.redis.outage.failed(exc)
        return True

    def _all_canceled(self, jobs: list[Job]) -> bool:
        """Whether every job of a batch is canceled now (one round trip; False with Redis away)."""
        try:
            return all(status is JobStatus.canceled for status in self.store.statuses([job.id for job in jobs]))
        except REDIS_DOWN as exc:
            self.redis.outage.failed(exc)
            return False

    def _add_previews(
        self, pending: PendingBatch, done: int, report: dict[str, Progress], jobs: list[Job], rows: dict[str, int]
    ) -> None:
        """Each job's first image's estimate after `done` steps, drawn into its report (not once its own steps
        are done). A preview that fails is left out, with a log line: it never fails the batch."""
        try:
            for job in jobs:
                if done < job.request.steps:
                    rgb = pending.preview(done, rows[job.id])  # the engine's decoder: TAESD or the fixed map
                    if rgb is None:
                        return
                    url = preview.webp_data_url(rgb)
                    report[job.id] = report[job.id].model_copy(update={"preview": url})
        except Exception:
            log.warning("a preview could not be made; the job's progress goes without it", exc_info=True)
