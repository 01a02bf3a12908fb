"""The worker's device loop: jobs in from Celery threads, device batches out, results recorded.

    Celery thread ── submit(job_id) ──> inbox ──> [device thread] Batcher -> Engine.dispatch
                                                        │ (JAX dispatch is asynchronous)
                                                        v
                                     [finisher thread] fetch -> encode/upload (pool) -> record -> futures

The device thread only gathers and dispatches, so the next batch is queued on the device while the
previous one's images are copied off, encoded and uploaded. A Celery task waits on its job's future and
returns (so its message is acknowledged) only after the job's result is recorded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

from common import inputs
from common.batch_log import BatchLog, BatchRecord
from common.job_store import JobStore
from common.jobs import TERMINAL, ImageRecord, Job, JobStatus, Progress
from common.logs import bound
from common.loras import Registry
from common.outage import REDIS_DOWN, Outage, die, supervised
from common.storage import Storage
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerCounters, WorkerStatus
from worker import images, metrics, sweeper
from worker.batcher import Batch, Batcher, Item
from worker.engine.engine import Engine, Pending, Row
from worker.image_retention import image_key

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0
REQUEUE = "requeue"  # a job's answer when the worker is shutting down before it ran: back to the queue
# a job for a model this worker does not hold (a fleet whose workers hold different models): back to the queue
NOT_HERE = "not-here"
STALE = "stale"  # a message superseded by a newer one for the same job (its worker died; the sweep re-sent it)
MAX_IN_FLIGHT = 2  # batches dispatched but not yet recorded: one running, one queued behind it
# A batch's progress is written at most this often (and at its last step): a small model's steps take
# milliseconds, and Redis needs not hear of each.
PROGRESS_INTERVAL_S = 0.2
# A worker whose heartbeat has been gone this long is dead (the heartbeat key lives 3 periods): the sweep
# sends its held jobs again at once instead of waiting for Celery's visibility timeout.
DEAD_AFTER_S = 3 * HEARTBEAT_S


@dataclass
class Started:
    """A dispatched batch on its way to the finisher."""

    batch: Batch
    jobs: list[Job]
    pending: Pending
    dispatched_s: float
    batch_id: str = ""  # in the logs of the batch and its jobs, and in the batch log


def _labels(job: Job) -> tuple[str, str]:
    """(size, lane) metric labels of a job."""
    return metrics.size_label(job.request.height, job.request.width), metrics.lane_label(job.lane)


def rows_for(job: Job, pixels: dict[str, Any] | None = None) -> list[Row]:
    """The engine's rows for a job; `pixels`: its input images read back (init_image, mask_image)."""
    r = job.request
    assert r.seed is not None  # the API fills it in
    pixels = pixels or {}
    return [
        Row(
            r.prompt,
            r.negative_prompt,
            r.seed + i,
            r.guidance_scale,
            r.steps,
            r.scheduler.value,
            timestep_spacing=r.timestep_spacing.value if r.timestep_spacing else None,
            image=pixels.get("init_image"),
            mask=pixels.get("mask_image"),
            strength=r.strength,
            refiner_switch=r.refiner.switch_at if r.refiner else None,
            aesthetic_score=r.refiner.aesthetic_score if r.refiner else 6.0,
            negative_aesthetic_score=r.refiner.negative_aesthetic_score if r.refiner else 2.5,
            loras=tuple((a.name, a.scale) for a in r.loras),
        )
        for i in range(r.num_images)
    ]


def shape_of(job: Job) -> tuple[int, int, bool, bool, str]:
    """The batcher's group: (height, width, guided, refined, model). Guided and guidance-free rows run different
    programs (two UNet rows per image or one), refined rows go on to the refiner's, and each model has its own
    engine, so none share a batch. LoRA adapters are not in it: rows with different adapters share a batch
    (worker/engine/lora.py). model: the job's, "" for the default."""
    r = job.request
    assert r.height is not None and r.width is not None
    return r.height, r.width, r.guidance_scale > 1, r.refiner is not None, r.model or ""


class DeviceLoop:
    def __init__(
        self,
        engine: Engine | Mapping[str, Engine],
        store: JobStore,
        storage: Storage,
        batch_timeout_s: float,
        upload_threads: int = 8,
        worker_name: str | None = None,
        upload_attempts: int = 5,
        upload_backoff_s: float = 0.5,
        max_attempts: int = 3,
        upload_backoff_max_s: float = 8.0,
        enqueue: Callable[[Job], None] | None = None,
        notify: Callable[[str], None] | None = None,
        loras: Registry | None = None,
        *,
        workers: WorkerRegistry,
        batches: BatchLog,
    ):
        # model name -> its engine (one engine: named by its model); the first is what a job without `model` gets
        self.engines = dict(engine) if isinstance(engine, Mapping) else {engine.model.name: engine}
        engine = self.engine = next(iter(self.engines.values()))
        self.store = store
        self.workers = workers  # this worker's heartbeat and held jobs, and the sweep lock
        self.batches = batches  # one line per engine run
        self.storage = storage
        self.loras = loras  # the adapter registry: a job's adapters are fetched (from storage) before it is batched
        self.batcher = Batcher(engine.batch_rows, batch_timeout_s)
        self.inbox: queue.Queue[tuple[str, int | None, Future[str]] | None] = queue.Queue()
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")  # records batches in order
        self.uploads = ThreadPoolExecutor(upload_threads, thread_name_prefix="upload")
        self.in_flight = threading.Semaphore(MAX_IN_FLIGHT)
        self.name = worker_name or f"{socket.gethostname()}-{id(self):x}"
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread = supervised(self._run, "device")  # if it dies, the process exits: never a silent worker
        self._device_free_s = 0.0  # when the previous batch finished on the device (for busy time)
        self.started_at = time.time()
        self.counters = WorkerCounters()  # sent with every heartbeat (common/worker_status.py, /metrics)
        self._pixels: dict[str, dict[str, Any]] = {}  # job id -> its input images as pixels, until its batch ends
        self._counting = threading.Lock()  # the finisher and the device thread both add to them
        self.upload_attempts = upload_attempts
        self.upload_backoff_s = upload_backoff_s
        self.upload_backoff_max_s = upload_backoff_max_s
        self.storage_outage = Outage("uploads: storage")  # one warning an outage, not one a retry
        self.max_attempts = max_attempts
        self.enqueue = enqueue  # sends a job's message again (the stuck-job sweep); None: no sweeping
        self.notify = notify  # queues the webhook of a job that has ended
        self._verdicts: dict[str, str] = {}  # job id -> REQUEUE, for jobs given back after a failed upload
        self.redis = Outage("device loop: Redis")  # shared by the device and finisher threads
        # Since when this worker has seen Redis answer without a break (monotonic): the sweep declares other
        # workers dead by their missing heartbeat only after it has itself been able to see them for a while.
        self._redis_ok_since: float | None = time.monotonic()

    # ------------------------------------------------------------------ called from Celery threads

    def submit(self, job_id: str, generation: int | None = None) -> Future[str]:
        """Queue a job for the device; the future resolves to its final status once recorded. `generation`
        is the message's: a message older than the job's current one (re-sent after its worker died) is
        answered STALE and never runs; None (a data set feeder's message) is taken as current."""
        future: Future[str] = Future()
        self.inbox.put((job_id, generation, future))
        return future

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def begin_shutdown(self) -> None:
        """SIGTERM: jobs not yet on the device go back to the queue; batches in flight finish and record."""
        self._draining.set()
        self.inbox.put(None)

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)  # wake the device thread now rather than at its next heartbeat
        self._thread.join(timeout=30)
        self.finisher.shutdown(wait=True)
        self.uploads.shutdown(wait=True)
        with suppress(*REDIS_DOWN):  # a clean exit: nothing is held, and /readyz need not wait for the heartbeat
            self.workers.forget(self.name)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A job-store call that waits out a Redis outage (the work cannot go on without it, and will after)."""
        return self.redis.call(fn, *args, stop=self._stop, **kwargs)

    # ------------------------------------------------------------------ the device thread

    def _run(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_S
        while not self._stop.is_set():
            deadline = self.batcher.next_deadline_s()
            wait = HEARTBEAT_S if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                entry = self.inbox.get(timeout=min(wait, HEARTBEAT_S))
                while entry is not None:  # take everything that has arrived, so a burst fills one batch
                    self._admit(*entry)
                    entry = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self._draining.is_set():
                drained = self.batcher.drain()
                if drained:
                    self._call(self.workers.release, self.name, [item.job_id for item in drained])
                for item in drained:
                    item.payload[1].set_result(REQUEUE)
                continue
            for batch in self.batcher.take_due(time.monotonic()):
                self._start(batch)
            if time.monotonic() >= next_beat:
                if self._beat():
                    self._sweep()
                next_beat = time.monotonic() + HEARTBEAT_S

    def _admit(self, job_id: str, generation: int | None, future: Future[str]) -> None:
        if self._draining.is_set():
            future.set_result(REQUEUE)
            return
        self._call(self.workers.hold, self.name, job_id)  # first: should this worker die now, the sweep finds it
        job = self._call(self.store.get, job_id)
        if job is None:
            self._call(self.workers.release, self.name, [job_id])
            future.set_result("missing")  # expired or never stored: nothing to do
            return
        if job.status in TERMINAL or (generation is not None and generation < job.generation):
            # canceled while queued, a redelivery of a finished job, or a message superseded by a newer one
            self._call(self.workers.release, self.name, [job_id])
            future.set_result(job.status.value if job.status in TERMINAL else STALE)
            return
        if job.attempts >= self.max_attempts:  # it keeps coming back: a worker died on it each time
            self._call(
                self.store.fail,
                job.id,
                f"gave up after {job.attempts} attempts (the worker running it stopped each time)",
                allowed_from=[JobStatus.queued, JobStatus.running],
                tenant=job.tenant,
            )
            self._call(self.workers.release, self.name, [job_id])
            future.set_result(JobStatus.failed.value)
            if self.notify and job.request.webhook_url:
                self._call(self.notify, job.id)
            return
        if job.request.model is not None and job.request.model not in self.engines:
            log.info(
                "job for model %r, which this worker does not hold: handed back",
                job.request.model,
                extra={"job_id": job.id},
            )
            self._call(self.workers.release, self.name, [job_id])
            future.set_result(NOT_HERE)
            return
        if job.request.loras and self.loras is not None:
            # a storage prefix's adapters copied here now (removed from SDXL_LORA_DIR since the API took the job:
            # it never runs)
            fetch = functools.partial(self._fetch_adapters, job)
            ok, _ = self._prefetch(job, future, fetch, lambda name: f"LoRA adapter {name!r} is no longer served")
            if not ok:
                return
        if job.request.init_image is not None:
            # gone from storage (deleted by hand, or another deployment's key): it never runs
            fetch = functools.partial(self._read_inputs, job)
            ok, pixels = self._prefetch(job, future, fetch, lambda key: f"input image {key!r} is no longer in storage")
            if not ok:
                return
            self._pixels[job.id] = pixels
        priority = 1 if job.lane == "bulk" else 0
        self.batcher.add(Item(job_id, shape_of(job), job.request.num_images, time.monotonic(), (job, future), priority))

    def _prefetch(
        self, job: Job, future: Future[str], fetch: Callable[[], Any], gone: Callable[[str], str]
    ) -> tuple[bool, Any]:
        """What a job needs from storage before it is batched: (True, what `fetch` gave), or (False, None) with the
        job answered: failed with gone(<the missing key>) when an object is missing, requeued when storage stays
        away beyond the retries (to be read again later)."""
        try:
            return True, fetch()
        except KeyError as exc:
            self._call(self.store.fail, job.id, gone(exc.args[0]), tenant=job.tenant)
            self._call(self.workers.release, self.name, [job.id])
            future.set_result(JobStatus.failed.value)
        except Exception:
            log.warning("could not read what job %s needs from storage; requeued", job.id, exc_info=True)
            self._call(self.workers.release, self.name, [job.id])
            future.set_result(REQUEUE)
        return False, None

    def _fetch_adapters(self, job: Job) -> None:
        """The job's adapter files, here (from a storage prefix: copied with the uploads' backoff)."""
        assert self.loras is not None
        for lora in job.request.loras:
            self._storage_call(functools.partial(self.loras.path_of, lora.name))

    def _read_inputs(self, job: Job) -> dict[str, Any]:
        """The job's input images as pixels, read from storage with the uploads' backoff."""
        out = {}
        for name in ("init_image", "mask_image"):
            key = getattr(job.request, name)
            if key is not None:
                data = self._storage_call(functools.partial(self.storage.get, key))
                out[name] = inputs.pixels(data, mask=name == "mask_image")
        return out

    def _start(self, batch: Batch) -> None:
        jobs: list[Job] = []
        for item in batch.items:
            job, future = item.payload
            # queued -> running; a redelivered job (running after a worker died) keeps running here.
            ok, before = self._call(
                self.store.transition,
                job.id,
                JobStatus.running,
                [JobStatus.queued, JobStatus.running],
                tenant=job.tenant,
                worker=self.name,
            )
            if ok:
                jobs.append(job)
                metrics.QUEUE_WAIT.labels(*_labels(job)).observe(max(0.0, time.time() - job.created_at))
            else:  # canceled (or otherwise ended) before it ran: it never runs
                self._call(self.workers.release, self.name, [job.id])
                future.set_result(before.value if before else "missing")
        if not jobs:
            return
        # Wait for a free slot (the batch before last to finish), heartbeating meanwhile: a batch may run
        # longer than the heartbeat's 15 s life, and a busy worker must not look dead to /readyz or probes.
        while not self.in_flight.acquire(timeout=HEARTBEAT_S):
            self._beat()
        batch_id = uuid.uuid4().hex[:12]
        log.info(
            "batch of %d rows started: jobs %s",
            sum(j.request.num_images for j in jobs),
            ",".join(j.id for j in jobs),
            extra={"batch_id": batch_id},
        )
        try:
            pending = self._dispatch(batch, jobs)
        except Exception as exc:  # raised while tracing or validating: nothing reached the device
            log.exception("dispatch failed")
            try:
                self._isolate(batch, jobs, exc)
            finally:
                self.in_flight.release()
                self._resolve(batch)
            return
        self.finisher.submit(self._finish, Started(batch, jobs, pending, time.monotonic(), batch_id))

    def _dispatch(self, batch: Batch, jobs: list[Job]) -> Pending:
        height, width = batch.shape[:2]
        rows = [row for job in jobs for row in rows_for(job, self._pixels.get(job.id))]
        return self._engine_for(jobs[0]).dispatch(rows, height, width)

    def _engine_for(self, job: Job) -> Engine:
        return self.engines[job.request.model] if job.request.model else self.engine

    # ------------------------------------------------------------------ the finisher thread

    def _finish(self, started: Started) -> None:
        try:
            with bound(batch_id=started.batch_id):
                try:
                    self._complete(started)
                except Exception as exc:
                    log.exception("a batch failed")
                    self._isolate(started.batch, started.jobs, exc)
                finally:
                    self.in_flight.release()
                    self._resolve(started.batch)
        except BaseException as exc:  # the finisher cannot go on (its Celery tasks would wait for ever)
            if not self._stop.is_set():
                die("the finisher", exc)
            raise

    def _isolate(self, batch: Batch, jobs: list[Job], exc: Exception) -> None:
        """A batch that raised: run each job alone, so a poison job fails by itself and the rest succeed."""
        if len(jobs) == 1:
            self._call(self.store.fail, jobs[0].id, f"engine error: {type(exc).__name__}: {exc}", tenant=jobs[0].tenant)
            return
        for job in jobs:
            alone = Batch(batch.shape, [i for i in batch.items if i.job_id == job.id], batch.batch_rows)
            try:
                self._complete(Started(alone, [job], self._dispatch(alone, [job]), time.monotonic()))
            except REDIS_DOWN:
                raise  # not the job's fault (only possible once stopping: _call waits out outages)
            except Exception as err:
                self._call(self.store.fail, job.id, f"engine error: {type(err).__name__}: {err}", tenant=job.tenant)

    def _resolve(self, batch: Batch) -> None:
        """Every waiting Celery task gets its answer, whatever happened: none is left hanging."""
        self._call(self.workers.release, self.name, [item.job_id for item in batch.items])
        for item in batch.items:
            self._pixels.pop(item.job_id, None)
            job, future = item.payload
            if future.done():  # answered before the run (canceled while queued): not this run's to notify
                continue
            verdict = self._verdicts.pop(item.job_id, None)
            future.set_result(verdict or str(self._call(self.store.status, item.job_id) or "missing"))
            outcome = "requeued" if future.result() == REQUEUE else future.result()
            if outcome in TERMINAL:
                latency_s = max(0.0, time.time() - job.created_at)
                metrics.LATENCY.labels(*_labels(job), outcome).observe(latency_s)
                log.info("job %s after %.2f s", outcome, latency_s, extra={"job_id": job.id})
            elif outcome == "requeued":
                log.info("job requeued", extra={"job_id": job.id})
            if outcome in self.counters.jobs:
                with self._counting:
                    self.counters.jobs[outcome] += 1
            if self.notify and job.request.webhook_url and future.result() in TERMINAL:
                self._call(self.notify, item.job_id)

    def _complete(self, started: Started) -> None:
        batch, jobs = started.batch, started.jobs
        self._follow(started)
        out = started.pending.fetch()  # waits for the device; raises if the program failed there
        done_s = time.monotonic()
        device_s = done_s - max(started.dispatched_s, self._device_free_s)
        self._device_free_s = done_s
        self._record_batch(batch, jobs, device_s, started.batch_id)
        uploads: list[tuple[Job, list[Future[ImageRecord]]]] = []
        row = 0
        for job in jobs:
            n = job.request.num_images
            if all(out.finite[row : row + n]):
                pixels = out.images[row : row + n]
                used = out.adapters[row] if out.adapters else []
                uploads.append((job, [self.uploads.submit(self._upload, job, i, pixels[i], used) for i in range(n)]))
            else:
                error = "the model produced non-finite values (NaN or inf) for this job"
                self._call(self.store.fail, job.id, error, tenant=job.tenant)
            row += n
        truncated = dict(zip([j.id for j in jobs], self._truncated(jobs, out.truncated), strict=True))
        for job, futures in uploads:
            self._record(job, futures, truncated[job.id])

    def _follow(self, started: Started) -> None:
        """Write the batch's interactive jobs' progress as the device gets through their steps. Best effort:
        with Redis away a report is dropped (the next one, or the end, says more), never waited for."""
        jobs = [job for job in started.jobs if job.lane != "bulk"]
        last_s = 0.0
        for done in started.pending.progress():
            now = time.monotonic()
            if not jobs or (now - last_s < PROGRESS_INTERVAL_S and done < started.pending.steps):
                continue
            last_s = now
            report = {j.id: Progress(step=min(done, j.request.steps), steps=j.request.steps) for j in jobs}
            try:
                self.store.record_progress(report)
            except REDIS_DOWN as exc:
                self.redis.failed(exc)

    @staticmethod
    def _truncated(jobs: list[Job], per_row: list[bool]) -> list[bool]:
        flags, row = [], 0
        for job in jobs:
            flags.append(any(per_row[row : row + job.request.num_images]))
            row += job.request.num_images
        return flags

    def _upload(self, job: Job, index: int, pixels: Any, adapters: list[Any] | None = None) -> ImageRecord:
        t0 = time.perf_counter()
        record = self._encode_and_put(job, index, pixels, adapters or [])
        metrics.UPLOAD.labels(*_labels(job)).observe(time.perf_counter() - t0)
        return record

    def _encode_and_put(self, job: Job, index: int, pixels: Any, adapters: list[Any] | None = None) -> ImageRecord:
        r = job.request
        fmt = r.output_format.value
        engine = self._engine_for(job)
        # what each adapter was: its file's sha256 (a name may later point at another file)
        loras = [
            {"name": a.name, "scale": lr.scale, "sha256": a.sha256}
            for a, lr in zip(adapters or [], r.loras, strict=bool(adapters))
        ]
        params = {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seed": r.seed + index,
            "steps": r.steps,
            "guidance_scale": r.guidance_scale,
            "scheduler": r.scheduler.value,
            # image-to-image, inpainting and spacing only where the job asked: a text-to-image line's bytes stay
            # what they were
            **{
                name: value
                for name, value in (
                    ("timestep_spacing", r.timestep_spacing.value if r.timestep_spacing else None),
                    ("init_image", r.init_image),
                    ("mask_image", r.mask_image),
                    ("strength", r.strength),
                    ("refiner", r.refiner.model_dump() if r.refiner else None),
                    ("refiner_model", engine.models["refiner"].name if r.refiner else None),
                    ("refiner_hash", engine.models["refiner"].weights_hash if r.refiner else None),
                    ("loras", loras or None),
                    ("model_name", r.model),  # the name the job picked it by (SDXL_MODELS)
                )
                if value is not None
            },
            "width": r.width,
            "height": r.height,
            "model": engine.model.name,
            "model_hash": engine.model.weights_hash,
        }  # what made the pixels, and nothing else: the same line gives the same bytes on every run
        data = images.encode(pixels, fmt, params)
        key = image_key(job, index, fmt)
        self._put(key, data, images.CONTENT_TYPES[fmt])
        return ImageRecord(
            key=key,
            seed=r.seed + index,
            width=r.width,
            height=r.height,
            sha256=hashlib.sha256(data).hexdigest(),
            model=params["model"],
            model_hash=params["model_hash"],
            loras=loras,
        )

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload with exponential backoff: a storage blip costs seconds, not the job."""
        self._storage_call(functools.partial(self.storage.put, key, data, content_type))

    def _storage_call(self, call: Callable[[], Any]) -> Any:
        """A storage call with exponential backoff (SDXL_UPLOAD_ATTEMPTS, ..._BACKOFF_S, ..._BACKOFF_MAX_S), each
        outage noted once; a missing object (KeyError) is an answer, not an outage, and is raised at once."""
        for attempt in range(self.upload_attempts):
            try:
                result = call()
                self.storage_outage.ok()
                return result
            except KeyError:
                raise
            except Exception as exc:
                self.storage_outage.failed(exc)
                if attempt == self.upload_attempts - 1:
                    raise
                time.sleep(min(self.upload_backoff_max_s, self.upload_backoff_s * 2**attempt))
        raise AssertionError("unreachable: the last attempt raises")

    def _record(self, job: Job, futures: list[Future[ImageRecord]], truncated: bool) -> None:
        try:
            records = [f.result() for f in futures]
        except Exception as exc:
            error = f"upload failed: {type(exc).__name__}: {exc}"
            attempts = (self._call(self.store.get, job.id) or job).attempts
            requeued = (
                attempts < self.max_attempts
                and (
                    self._call(self.store.transition, job.id, JobStatus.queued, [JobStatus.running], tenant=job.tenant)[
                        0
                    ]
                )
            )
            if requeued:
                # Back to the queue (the Celery message is rejected with requeue): it runs again later.
                log.warning("job %s requeued after attempt %d: %s", job.id, attempts, error)
                self._verdicts[job.id] = REQUEUE
            else:
                error = f"{error} (attempt {attempts} of {self.max_attempts})"
                self._call(self.store.fail, job.id, error, tenant=job.tenant)
            return
        if not self._call(self.store.succeed, job.id, records, truncated, tenant=job.tenant) and (
            self._call(self.store.status, job.id) == JobStatus.canceled
        ):
            # Canceled while running: the results are discarded, as the cancel answer promised, and so is
            # their folder. (If another run of the same job succeeded first, the objects under these keys are
            # its results: keep them.) Storage away now: the image sweep deletes them once the record expires.
            try:
                self.storage.delete_many([record.key for record in records])
                self.storage.prune(records[0].key.rsplit("/", 1)[0])  # images/<hour>/<job>
            except Exception:
                log.warning("could not delete canceled job %s's images; the image sweep will", job.id, exc_info=True)

    # ------------------------------------------------------------------ observability

    def _record_batch(self, batch: Batch, jobs: list[Job], device_s: float, batch_id: str = "") -> None:
        """One line per engine run in the batch log (common/batch_log.py): tests and benches read it."""
        metrics.DEVICE.labels(metrics.size_label(*batch.shape[:2])).observe(device_s)
        rows = sum(j.request.num_images for j in jobs)
        record = BatchRecord(
            batch_id=batch_id,
            worker=self.name,
            height=batch.shape[0],
            width=batch.shape[1],
            jobs=[j.id for j in jobs],
            rows=rows,
            padding=self.engine.batch_rows - rows,
            device_s=round(device_s, 6),
            at=time.time(),
        )
        with self._counting:
            self.counters.batches += 1
            self.counters.rows += record.rows
            self.counters.padding_rows += record.padding
            self.counters.device_s += device_s
        self._call(self.batches.append, record)

    def _sweep(self) -> None:
        """At most one sweep per heartbeat period across all workers (a Redis lock that expires): stuck jobs,
        dead workers' jobs, and submits whose message was never sent."""
        if self.enqueue is None:
            return
        try:
            if not self.workers.take_sweep(self.name, ttl_s=round(HEARTBEAT_S)):
                return
            sweeper.sweep(self.store, self.max_attempts, self.enqueue)
            # Another worker's missing heartbeat means it is dead only if this one could have seen it: after an
            # outage every heartbeat has lapsed, and live workers need one period to write theirs again.
            seen_s = time.monotonic() - self._redis_ok_since if self._redis_ok_since is not None else 0.0
            if seen_s >= DEAD_AFTER_S:
                sweeper.reissue_dead_workers(self.store, self.workers, self.enqueue)
            sweeper.relay_outbox(self.store, self.enqueue)
        except REDIS_DOWN as exc:
            self.redis.failed(exc)  # the next heartbeat tries again
        except Exception:
            log.exception("stuck-job sweep failed")

    def _beat(self) -> bool:
        """Write the heartbeat; False (and noted as an outage) when Redis is away: the loop goes on regardless
        and tries again at the next beat, so /readyz sees this worker within one period of Redis' return."""
        try:
            self._heartbeat()
        except REDIS_DOWN as exc:
            self._redis_ok_since = None
            self.redis.failed(exc)
            return False
        if self._redis_ok_since is None:
            self._redis_ok_since = time.monotonic()
        self.redis.ok()
        return True

    def _heartbeat(self) -> None:
        with self._counting:
            counters = replace(self.counters, jobs=dict(self.counters.jobs))  # a copy, read whole
        status = WorkerStatus(
            name=self.name,
            model=self.engine.model.name,
            sizes=self.engine.sizes,
            batch_rows=self.engine.batch_rows,
            devices=self.engine.mesh.devices.size,
            started_at=self.started_at,
            at=time.time(),
            counters=counters,
            models=[
                {"name": name, "source": e.model.name, "bytes": e.model.nbytes, "weights_sha256": e.model.weights_hash}
                for name, e in self.engines.items()
            ],
        )
        self.workers.beat(status, ttl_s=DEAD_AFTER_S)
