"""The data set feeder: keeps each run's lines flowing onto the bulk queue, a bounded number at a time.

A thread in every worker; for each active run, whichever worker holds the run's Redis lock does one step:

    reap     lines whose jobs ended: the image's manifest row joins the run's `done` list, a failure its
             `failed` hash; the job record is deleted (Redis holds only lines in flight)
    feed     top up to `depth` lines in flight: read the line from its input chunk, create its job under an
             id derived from the run and line (create-if-absent), send it to the bulk queue
    shard    every `shard_size` finished rows: a WebDataset tar and manifest parts written to storage (in input
             order: once every line of the next window of `shard_size` lines has ended)
    finish   every line ended: the last shard, the whole manifest (JSONL, Parquet), failures.jsonl, stats.json
             and the data set card (README.md); `completed`, or `canceled` while any line is canceled

Restarts are safe at every point: a line's job id is derived, so re-feeding after a crash finds the job
(re-sending its message if it was still queued); progress is compare-and-set in Redis (common/dataset_store);
a shard is rewritten byte for byte from the same rows if its commit was lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.dataset_store import DatasetRun, DatasetStore
from common.datasets import CHUNK_LINES, FINISHED, DatasetStatus, Layout, Line, manifest_row
from common.job_store import JobStore
from common.jobs import TERMINAL, JobStatus
from common.outage import REDIS_DOWN, Outage, supervised
from common.storage import Storage
from worker import images, shards

log = logging.getLogger(__name__)


def _storage_down(exc: BaseException) -> bool:
    """Whether an error is storage being unreachable (connection refused, timed out, a 5xx from S3)."""
    import botocore.exceptions

    if isinstance(exc, (ConnectionError, TimeoutError, botocore.exceptions.ConnectionError)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500
    return False


class Feeder:
    def __init__(
        self,
        datasets: DatasetStore,
        store: JobStore,
        storage: Storage,
        send: Callable[[str, str | None], None],
        owner: str,
        depth: int = 256,
        interval_s: float = 0.5,
        lock_ttl_s: float = 15.0,
        step_attempts: int = 20,
    ):
        self.datasets = datasets
        self.store = store
        self.storage = storage
        self.send = send  # puts a job id on its model's bulk queue
        self.owner = owner
        self.depth = depth
        self.interval_s = interval_s
        self.lock_ttl_s = lock_ttl_s  # a dead feeder's runs are taken over after this long
        # a run whose step fails this many times in a row (not an outage: the same error each tick) is failed
        self.step_attempts = step_attempts
        self._failures: dict[str, int] = {}  # run -> its steps failed in a row, here
        self._chunks: dict[str, tuple[int, list[Line]]] = {}  # run -> (chunk index, its lines): one chunk each
        self._owned: set[str] = set()
        self._fetch = ThreadPoolExecutor(8, thread_name_prefix="shard-fetch")
        self._stop = threading.Event()
        self._thread = supervised(self._run, "feeder")
        self.redis = Outage("data set feeder: Redis or storage")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and hand the runs back at once (another worker need not wait for the locks to expire)."""
        self._stop.set()
        self._thread.join(timeout=30)
        for run_id in self._owned:
            self.datasets.unlock(run_id, self.owner)
        self._fetch.shutdown(wait=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait_s = self.interval_s
            try:
                self.step_all()
                self.redis.ok()
            except REDIS_DOWN as exc:  # Redis away: one line for the whole outage, and a summary at its end
                wait_s = max(wait_s, self.redis.failed(exc))
            except Exception:
                log.exception("feeder step failed")
            self._stop.wait(wait_s)

    def step_all(self) -> None:
        for run_id in self.datasets.active():
            if self._stop.is_set():
                return
            if not self.datasets.lock(run_id, self.owner, self.lock_ttl_s):
                self._owned.discard(run_id)
                continue
            self._owned.add(run_id)
            try:
                self.step(run_id)
                self._failures.pop(run_id, None)
            except REDIS_DOWN:
                raise  # the whole tick waits out the outage (_run)
            except Exception as exc:
                if self.redis.down or _storage_down(exc):  # storage away: as quiet as a Redis outage
                    self.redis.failed(exc)
                else:
                    self._step_failed(run_id, exc)

    def _step_failed(self, run_id: str, exc: Exception) -> None:
        """One more failed step of a run; at step_attempts in a row it is given up on (`failed`), not retried
        twice a second for ever. The traceback is logged the first time and the last, not at every tick."""
        failures = self._failures.get(run_id, 0) + 1
        self._failures[run_id] = failures
        if failures < self.step_attempts:
            if failures == 1:
                log.exception("feeding data set %s failed; retrying next tick", run_id)
            return
        self._failures.pop(run_id, None)
        self._chunks.pop(run_id, None)
        error = f"the data set's feeder failed {failures} times in a row: {type(exc).__name__}: {exc}"[:1000]
        if self.datasets.fail(run_id, error):
            log.error("data set %s failed: %s", run_id, error, exc_info=exc)

    # ------------------------------------------------------------------ one step of one run

    def step(self, run_id: str) -> None:
        run = self.datasets.get(run_id)
        if run is None or run.status in FINISHED:
            self.datasets.deactivate(run_id)  # expired, or finished by another feeder
            self._chunks.pop(run_id, None)
            return
        self._reap(run)
        run = self.datasets.get(run_id)
        assert run is not None
        if run.status == DatasetStatus.running:
            self._feed(run)
        else:
            self._wind_down(run)
        self._write_shards(run_id, final=False)
        self.datasets.sample_rate(run_id, run.succeeded)
        self._finish_if_done(run_id)

    def _reap(self, run: DatasetRun) -> None:
        inflight = self.datasets.inflight(run.id)
        statuses = self.store.statuses(list(inflight.values()))  # one round trip for every line in flight
        ended = [(i, j) for (i, j), st in zip(inflight.items(), statuses, strict=True) if st is None or st in TERMINAL]
        for (index, job_id), job in zip(ended, self.store.get_many([j for _, j in ended]), strict=True):
            if job is None:  # cannot happen while the feeder reaps within the job TTL; never hang on it
                line = self._line(run.id, index)
                failure = {"line": line.line, "id": line.id, "error": "the job record was lost"}
                self.datasets.reap(run.id, index, job_id, "failed", failure)
                continue
            info = job.dataset or {}
            if job.status == JobStatus.succeeded:
                image = job.images[0]
                row = manifest_row(
                    Line.of(info, job.request),
                    image.key,
                    image.sha256,
                    image.model,
                    image.model_hash,
                    job.truncated,
                    job.attempts,
                    image.loras,
                    image.conditions,
                )
                self.datasets.reap(run.id, index, job_id, "succeeded", row, run.options.order)
            elif job.status == JobStatus.failed:
                failure = {"line": info["line"], "id": info["id"], "error": job.error or ""}
                self.datasets.reap(run.id, index, job_id, "failed", failure)
            else:
                self.datasets.reap(run.id, index, job_id, "canceled", {"line": info["line"], "id": info["id"]})

    def _feed(self, run: DatasetRun) -> None:
        room = self.depth - len(self.datasets.inflight(run.id))
        layout = Layout(run.id)
        extension = images.EXTENSIONS[run.options.defaults.output_format.value]
        cursor = run.cursor
        retry_waiting = self.datasets.retry_pending(run.id)  # usually 0: then no per-line look at the list
        for _ in range(max(0, room)):
            retry = self.datasets.next_retry(run.id) if retry_waiting else None
            if retry is not None:
                retry_waiting -= 1
                index, source = retry, "retry"
            elif cursor < run.total:
                index, source = cursor, "cursor"
            else:
                return
            line = self._line(run.id, index)
            job_id = f"{run.id}-{index}-{run.retries}"
            dataset = {"run": run.id, "index": index, "id": line.id, "line": line.line, **line.extra()}
            key = layout.image(line.id, extension)
            created = self.store.create_bulk(job_id, line.request, run.tenant, key, dataset)
            # Not created: fed before a crash, maybe without its message; a second message is harmless.
            if created or self.store.status(job_id) == JobStatus.queued:
                self.send(job_id, line.request.model)
            if not self.datasets.mark_fed(run.id, index, job_id, source):
                return  # another feeder moved on meanwhile (its lock had expired under us): stop this step
            if source == "cursor":
                cursor += 1

    def _wind_down(self, run: DatasetRun) -> None:
        """Canceling: queued lines are canceled (a worker drops them), running ones finish and are kept."""
        inflight = self.datasets.inflight(run.id)
        for job_id in inflight.values():
            self.store.transition(job_id, JobStatus.canceled, [JobStatus.queued], tenant=run.tenant)
        if not inflight and (run.cursor < run.total or self.datasets.retry_pending(run.id)):
            self.datasets.skip_rest(run.id, run.cursor, run.total)

    def _line(self, run_id: str, index: int) -> Line:
        chunk = index // CHUNK_LINES
        cached = self._chunks.get(run_id)
        if cached is None or cached[0] != chunk:
            text = self.storage.get(Layout(run_id).chunk(chunk))
            cached = (chunk, [Line.from_json(t) for t in text.splitlines() if t.strip()])
            self._chunks[run_id] = cached
        return cached[1][index % CHUNK_LINES]

    # ------------------------------------------------------------------ outputs

    def _write_shards(self, run_id: str, final: bool) -> None:
        run = self.datasets.get(run_id)
        assert run is not None
        if run.options.order == "input":
            self._write_input_shards(run_id, final)
            return
        while True:
            run = self.datasets.get(run_id)
            assert run is not None
            size = run.options.shard_size
            waiting = self.datasets.done_count(run_id)
            if waiting == 0 or (waiting < size and not final):
                return
            self.datasets.lock(run_id, self.owner, self.lock_ttl_s)  # a shard takes seconds: keep the lock
            done = self.datasets.done_rows(run_id, size)
            loose = self._put_shard(run, done)
            if not self.datasets.commit_shard(run_id, run.shards, len(done)):
                return  # another feeder wrote this shard (same rows, same bytes)
            self._shard_committed(run, loose)

    def _write_input_shards(self, run_id: str, final: bool) -> None:
        """Input order: shard k holds the lines of window k (`shard_size` lines from the run's `window`) that
        succeeded, by line; it is written once every line of the window has ended. Lines that end after their
        window was written (a retry, a resume) go into the shards written when the run finishes."""
        while True:
            run = self.datasets.get(run_id)
            assert run is not None
            size, start = run.options.shard_size, run.window
            if final:
                indices = self.datasets.row_indices(run_id)[:size]
                if not indices:
                    return
                end = max(start, run.total)
            else:
                end = min(start + size, run.total)
                pending = [*self.datasets.inflight(run_id), *self.datasets.retry_indices(run_id)]
                if start >= run.total or run.cursor < end or any(i < end for i in pending):
                    return  # the window still has lines to end
                indices = [i for i in self.datasets.row_indices(run_id) if i < end]
            if not indices:  # every line of the window failed or was canceled: no shard for it
                self.datasets.commit_window(run_id, start, end, -1, [])
                continue
            self.datasets.lock(run_id, self.owner, self.lock_ttl_s)
            rows = self.datasets.rows(run_id, indices)
            loose = self._put_shard(run, rows)
            if not self.datasets.commit_window(run_id, start, end, run.shards, indices):
                return  # another feeder wrote it
            self._shard_committed(run, loose)

    def _put_shard(self, run: DatasetRun, done: list[dict[str, Any]]) -> list[str]:
        """Shard `run.shards` and its manifest parts, from these rows; returns the loose images' keys."""
        layout = Layout(run.id)
        loose = [r["key"] for r in done]  # where each line's image was written
        data = list(self._fetch.map(self.storage.get, loose))
        # The rows as the manifest gives them: the same on a rewrite after a crash, so the bytes are too
        keep = run.options.loose_images
        rows = [{**r, "key": r["key"] if keep else None, "shard": layout.shard(run.shards)} for r in done]
        extension = images.EXTENSIONS[run.options.defaults.output_format.value]
        self.storage.put(layout.shard(run.shards), shards.tar_shard(rows, data, extension), "application/x-tar")
        self.storage.put(layout.manifest_part(run.shards, "jsonl"), shards.jsonl(rows), "application/x-ndjson")
        self.storage.put(
            layout.manifest_part(run.shards, "parquet"), shards.parquet(rows), "application/vnd.apache.parquet"
        )
        self.storage.put(
            layout.shard_stats(run.shards),
            json.dumps(shards.stats(rows, data, time.time())).encode(),
            "application/json",
        )
        return loose

    def _shard_committed(self, run: DatasetRun, loose: list[str]) -> None:
        if not run.options.loose_images:  # only once the shard is committed: a rewrite after a crash finds them
            self.storage.delete_many(loose)
        log.info("data set %s: shard %d written (%d images)", run.id, run.shards, len(loose))

    def _finish_if_done(self, run_id: str) -> None:
        run = self.datasets.get(run_id)
        assert run is not None
        if self.datasets.inflight(run_id) or self.datasets.retry_pending(run_id) or run.cursor < run.total:
            return
        self._write_shards(run_id, final=True)
        run = self.datasets.get(run_id)
        assert run is not None
        layout = Layout(run_id)
        parts = [self.storage.get(layout.manifest_part(i, "jsonl")) for i in range(run.shards)]
        self.storage.put(layout.manifest("jsonl"), b"".join(parts), "application/x-ndjson")
        parquets = [self.storage.get(layout.manifest_part(i, "parquet")) for i in range(run.shards)]
        self.storage.put(layout.manifest("parquet"), shards.concat_parquet(parquets), "application/vnd.apache.parquet")
        failures = self.datasets.failures(run_id)
        self.storage.put(layout.failures, shards.jsonl(failures), "application/x-ndjson")
        per_shard = [json.loads(self.storage.get(layout.shard_stats(i))) for i in range(run.shards)]
        self.storage.put(
            layout.stats, json.dumps(shards.run_stats(run, per_shard, failures), indent=2).encode(), "application/json"
        )
        self.storage.put(layout.card, shards.card(run, per_shard).encode(), "text/markdown")
        if not run.options.loose_images:  # any a crash left between a shard's commit and their delete
            self.storage.delete_many(list(self.storage.keys(layout.images)))
        # Any canceled line (this round's, or an earlier round's that a retry did not feed) makes it `canceled`:
        # POST .../resume feeds them; `completed` means every line succeeded or failed.
        status = DatasetStatus.canceled if run.canceled else DatasetStatus.completed
        if not self.datasets.finish(run_id, run.status, status):
            return  # a retry came in meanwhile: the run goes on (and finishes again later)
        self._chunks.pop(run_id, None)
        log.info(
            "data set %s %s: %d succeeded, %d failed, %d canceled, %d shards",
            run_id,
            status.value,
            run.succeeded,
            run.failed,
            run.canceled,
            run.shards,
        )
