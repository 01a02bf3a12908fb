"""How long images live: as long as their job's record, then the image sweep deletes them.

A job's record expires `job_ttl_s` after it ends (the API states the time as `expires_at`); after that
nobody can get a URL for its images, so keeping them would only cost storage. Images are kept by the hour
their job was created (UTC):

    images/<YYYY-MM-DDTHH>/<job id>/<index>.<ext>

A record created in hour H lives until H + job_ttl_s at the earliest, so the sweep lists only the hours
that old, and in each deletes the images of jobs whose record is gone. A job ends minutes after it is
created, so an hour is listed about twice: once while its records expire, once when the last has gone.
One worker at a time sweeps, once per `image_sweep_interval_s`, on its own thread: the device never waits
for it. Data set outputs (`datasets/<run>/`) are the run's deliverable and are not swept.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from itertools import groupby, islice

from common.dataset_store import DatasetStore
from common.input_store import InputStore
from common.job_store import JobStore
from common.jobs import Job
from common.outage import Outage, supervised
from common.storage import Storage
from common.worker_registry import WorkerRegistry
from worker import images, input_retention

log = logging.getLogger(__name__)

ROOT = "images"
HOUR_FORMAT = "%Y-%m-%dT%H"
PAGE_KEYS = 1000  # keys whose jobs are looked up in one Redis pipeline, then deleted in one request


def hour(created_at: float) -> str:
    """The folder of a job's images: the UTC hour it was created, e.g. 2026-12-02T21."""
    return dt.datetime.fromtimestamp(created_at, dt.UTC).strftime(HOUR_FORMAT)


def image_key(job: Job, index: int, fmt: str) -> str:
    # Deterministic: a job that runs twice (redelivery) overwrites the same objects. A data set line (one
    # image) goes where its run's layout says.
    if job.output_key is not None:
        return job.output_key
    return f"{ROOT}/{hour(job.created_at)}/{job.id}/{index}.{images.EXTENSIONS[fmt]}"


def _hour_start(name: str) -> float | None:
    try:
        return dt.datetime.strptime(name, HOUR_FORMAT).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None  # not ours: left alone


def sweep(storage: Storage, store: JobStore, now: float | None = None, page_keys: int = PAGE_KEYS) -> dict:
    """One pass: delete the images of jobs whose record has expired. Returns {"deleted": images deleted,
    "kept": images of live jobs in the hours looked at, "hours": the hours looked at}."""
    now = time.time() if now is None else now
    done = {"deleted": 0, "kept": 0, "hours": []}
    for name in storage.folders(ROOT):
        start = _hour_start(name)
        if start is None or start + store.ttl_s > now:
            continue  # not ours, or every record of that hour is still alive
        done["hours"].append(name)
        keys, kept = storage.keys(f"{ROOT}/{name}"), 0
        while page := list(islice(keys, page_keys)):
            gone = _expired(store, page)
            doomed = [k for k in page if _job_id(k) in gone]
            storage.delete_many(doomed)
            done["deleted"] += len(doomed)
            kept += len(page) - len(doomed)
        done["kept"] += kept
        if not kept:
            storage.prune(f"{ROOT}/{name}")  # nothing left: the hour is not listed again
    if done["deleted"]:
        log.info("image sweep: %s", done)
    return done


def _job_id(key: str) -> str:
    return key.split("/")[2]  # images/<hour>/<job id>/<file>


def _expired(store: JobStore, keys: list[str]) -> set[str]:
    """The jobs among these keys whose record is gone (one pipelined EXISTS per job)."""
    ids = [job_id for job_id, _ in groupby(keys, _job_id)]
    return {job_id for job_id, alive in zip(ids, store.existing(ids), strict=True) if not alive}


class ImageSweeper:
    """Runs `sweep` on a thread (and with `inputs`, the input sweep after it): whichever worker takes the Redis
    lock sweeps, and the lock's expiry is the interval, so a fleet sweeps once per interval whatever its size."""

    def __init__(
        self,
        storage: Storage,
        store: JobStore,
        workers: WorkerRegistry,
        owner: str,
        interval_s: float,
        check_s: float = 60.0,
        inputs: InputStore | None = None,
        input_grace_s: float = 3600.0,
        runs: DatasetStore | None = None,
    ):
        self.storage = storage
        self.inputs = inputs
        self.input_grace_s = input_grace_s
        self.runs = runs  # whose records keep the inputs their lines name
        self.store = store
        self.workers = workers  # holds the lock
        self.owner = owner
        self.interval_s = interval_s
        self.check_s = min(check_s, interval_s)  # how often a worker tries for the lock
        self._stop = threading.Event()
        self._thread = supervised(self._run, "image-sweep")
        self.outage = Outage("image sweep: Redis or storage")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def turn(self) -> bool:
        """Whether this worker sweeps now (nobody has in the last interval)."""
        return self.workers.take_image_sweep(self.owner, ttl_s=max(1, round(self.interval_s)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.turn():
                    sweep(self.storage, self.store)
                    if self.inputs is not None:
                        input_retention.sweep(self.storage, self.inputs, self.store, self.input_grace_s, runs=self.runs)
                self.outage.ok()
            except Exception as exc:  # storage or Redis away: the next check tries again; one log line an outage
                self.outage.failed(exc)
            self._stop.wait(self.check_s)
