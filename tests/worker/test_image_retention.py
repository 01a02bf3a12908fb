"""The image sweep against a real Redis and both storage backends (a local folder, SeaweedFS over S3)."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
import redis

from common.job_store import JobStore
from common.jobs import JobRequest
from common.storage import LocalStorage, S3Storage, Storage
from common.worker_registry import WorkerRegistry
from tests.helpers.servers import settings_from
from worker.image_retention import ImageSweeper, hour, image_key, sweep

TTL_S = 3600
NOW = dt.datetime(2026, 12, 2, 0, 30, tzinfo=dt.UTC).timestamp()  # 2026-12-02, 00:30 UTC


@pytest.fixture
def store(redis_url, key_prefix) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), key_prefix, ttl_s=TTL_S)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path, "http://api", b"k" * 32)
    s3 = request.getfixturevalue("s3")
    backend = S3Storage(settings_from({**s3.env(), "SDXL_S3_PREFIX": f"t{uuid.uuid4().hex[:8]}"}))
    backend.page_keys = 2  # list and delete in pages of 2, so a few objects cross page boundaries
    return backend


def put(storage: Storage, *keys: str) -> None:
    for key in keys:
        storage.put(key, b"png", "image/png")


def test_the_key_names_the_hour_the_job_was_created(store):
    job_id, _ = store.create(JobRequest(prompt="x", seed=1))
    job = store.get(job_id)
    assert job is not None
    assert image_key(job, 2, "webp") == f"images/{hour(job.created_at)}/{job_id}/2.webp"
    assert hour(NOW) == "2026-12-02T00" and hour(NOW - 31 * 60) == "2026-12-01T23"  # UTC hours
    assert image_key(job.model_copy(update={"output_key": "datasets/r/images/a.png"}), 0, "png") == (
        "datasets/r/images/a.png"
    )  # a data set line's image goes where its run says, and is never swept


def test_images_go_when_their_record_does(store, storage, redis_url):
    live, _ = store.create(JobRequest(prompt="x", seed=1))  # its record exists
    gone_a, gone_b, recent = (uuid.uuid4().hex for _ in range(3))  # no record: expired
    put(
        storage,
        f"images/2026-11-01T10/{live}/0.png",
        f"images/2026-11-01T10/{live}/1.png",
        f"images/2026-11-01T10/{gone_a}/0.png",
        f"images/2026-11-01T10/{gone_a}/1.png",
        f"images/2026-11-01T10/{gone_a}/2.png",
        f"images/2026-12-01T23/{gone_b}/0.png",
        f"images/2026-12-02T00/{recent}/0.png",  # an hour younger than the TTL: not even listed
        "images/misc/0.png",  # not an hour: not ours
        "datasets/r/images/a.png",
    )
    assert sweep(storage, store, now=NOW, page_keys=2) == {
        "deleted": 4,
        "kept": 2,
        "hours": ["2026-11-01T10", "2026-12-01T23"],
    }
    assert sorted(storage.keys("images")) == [
        f"images/2026-11-01T10/{live}/0.png",
        f"images/2026-11-01T10/{live}/1.png",
        f"images/2026-12-02T00/{recent}/0.png",
        "images/misc/0.png",
    ]
    assert list(storage.keys("datasets")) == ["datasets/r/images/a.png"]
    assert storage.folders("images") == ["2026-11-01T10", "2026-12-02T00", "misc"]  # an emptied hour is gone
    assert sweep(storage, store, now=NOW, page_keys=2)["deleted"] == 0  # again: nothing more
    # once the live job's record is gone too, its images follow
    redis.Redis.from_url(redis_url).delete(store.keys.job(live))
    assert sweep(storage, store, now=NOW)["deleted"] == 2
    assert storage.folders("images") == ["2026-12-02T00", "misc"]


def test_an_hour_is_looked_at_once_its_records_can_have_expired(store, storage):
    put(storage, f"images/2026-12-01T05/{uuid.uuid4().hex}/0.png")
    start = dt.datetime(2026, 12, 1, 5, tzinfo=dt.UTC).timestamp()
    assert sweep(storage, store, now=start + TTL_S - 1)["hours"] == []  # no record of it can have gone yet
    assert sweep(storage, store, now=start + TTL_S) == {"deleted": 1, "kept": 0, "hours": ["2026-12-01T05"]}
    assert storage.folders("images") == []


def test_one_worker_sweeps_per_interval(store, tmp_path, redis_url, key_prefix):
    storage = LocalStorage(tmp_path, "http://api", b"k" * 32)
    workers = WorkerRegistry(redis.Redis.from_url(redis_url), key_prefix)
    a, b = (ImageSweeper(storage, store, workers, owner=name, interval_s=1) for name in "ab")
    assert a.turn() and not b.turn() and not a.turn()
    time.sleep(1.2)
    assert b.turn() and not a.turn()
