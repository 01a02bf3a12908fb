"""The input sweep (worker/input_retention.py) against a real Redis and a local folder: an input goes once no
job record names it and its grace has passed; a live job's input, or one inside its grace, stays; so does one a
live data set run names."""

from __future__ import annotations

import time

import pytest
import redis

from common import inputs
from common.dataset_store import DatasetStore
from common.input_store import InputStore, run_claim
from common.job_store import JobStore
from common.jobs import JobRequest
from common.storage import LocalStorage
from common.worker_registry import WorkerRegistry
from worker.image_retention import ImageSweeper
from worker.input_retention import sweep

GRACE_S = 100.0
T0 = 1_000_000.0  # when the inputs are claimed (the sweep's clock is passed in)


@pytest.fixture
def client(redis_url):
    return redis.Redis.from_url(redis_url)


def _input(records: InputStore, storage: LocalStorage, digest: str, *job_ids: str) -> str:
    for job_id in job_ids:
        if records.claim("t", digest, job_id, 5, 0, T0 + GRACE_S).value == "new":
            storage.put(inputs.key("t", digest), b"12345", "image/png")
            records.stored("t", digest, 5)
    return inputs.key("t", digest)


def test_an_input_goes_once_no_job_names_it_and_its_grace_has_passed(client, key_prefix, tmp_path):
    store, records = JobStore(client, key_prefix, ttl_s=60), InputStore(client, key_prefix)
    storage = LocalStorage(tmp_path, "http://api", b"k" * 32)
    live, _ = store.create(JobRequest(prompt="x", seed=1))
    orphan = _input(records, storage, "a" * 64, "expired-job")  # its job's record is gone (or never was)
    named = _input(records, storage, "b" * 64, "expired-job", live)
    beside = "inputs/t/prompts.jsonl"  # a data set input under the same prefix: not the sweep's
    storage.put(beside, b"{}", "application/jsonl")
    assert records.used_bytes("t") == 10

    assert sweep(storage, records, store, GRACE_S, now=T0 + GRACE_S - 1) == {"deleted": 0, "freed_bytes": 0, "kept": 0}
    assert storage.get(orphan) == b"12345"  # within its grace: not even looked at

    done = sweep(storage, records, store, GRACE_S, now=T0 + GRACE_S)
    assert done == {"deleted": 1, "freed_bytes": 5, "kept": 1}
    with pytest.raises(KeyError):
        storage.get(orphan)
    assert storage.get(named) == b"12345" and storage.get(beside) == b"{}" and records.used_bytes("t") == 5
    assert records.references("t", "b" * 64)[1] == [live]  # the expired job's id dropped

    client.delete(store.keys.job(live))  # the live job's record expires
    assert sweep(storage, records, store, GRACE_S, now=T0 + 2 * GRACE_S - 1)["deleted"] == 0  # looked at again later
    assert sweep(storage, records, store, GRACE_S, now=T0 + 2 * GRACE_S) == {"deleted": 1, "freed_bytes": 5, "kept": 0}
    with pytest.raises(KeyError):
        storage.get(named)
    assert records.used_bytes("t") == 0 and records.due(float("inf")) == []


def test_a_data_set_runs_claim_keeps_an_input_while_the_runs_record_lives(client, key_prefix, tmp_path):
    store, records = JobStore(client, key_prefix, ttl_s=60), InputStore(client, key_prefix)
    runs = DatasetStore(client, key_prefix)
    storage = LocalStorage(tmp_path, "http://api", b"k" * 32)
    key = _input(records, storage, "d" * 64, "expired-job", run_claim("R"))  # a run's lines name it (the API)
    client.hset(runs.keys.run("R").record, "status", "running")  # the run's record
    assert sweep(storage, records, store, GRACE_S, now=T0 + GRACE_S, runs=runs)["kept"] == 1
    assert storage.get(key) == b"12345" and records.references("t", "d" * 64)[1] == [run_claim("R")]
    assert sweep(storage, records, store, GRACE_S, now=T0 + 2 * GRACE_S)["kept"] == 1  # no run store: kept

    client.delete(runs.keys.run("R").record)  # the finished run's record expires
    done = sweep(storage, records, store, GRACE_S, now=T0 + 3 * GRACE_S, runs=runs)
    assert done == {"deleted": 1, "freed_bytes": 5, "kept": 0}
    with pytest.raises(KeyError):
        storage.get(key)


def test_the_image_sweeper_sweeps_inputs_in_its_turn(client, key_prefix, tmp_path):
    store, records = JobStore(client, key_prefix, ttl_s=60), InputStore(client, key_prefix)
    storage = LocalStorage(tmp_path, "http://api", b"k" * 32)
    key = _input(records, storage, "c" * 64, "expired-job")
    records.claim("t", "c" * 64, "expired-job", 5, 0, 0.0)  # its grace long over
    sweeper = ImageSweeper(
        storage, store, WorkerRegistry(client, key_prefix), "w", interval_s=60, check_s=0.05, inputs=records
    )
    sweeper.start()
    try:
        for _ in range(100):
            if records.used_bytes("t") == 0:
                break
            time.sleep(0.05)
    finally:
        sweeper.stop()
    with pytest.raises(KeyError):
        storage.get(key)
