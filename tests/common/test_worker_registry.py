"""The worker registry against a real Redis: heartbeats, held jobs and the fleet's sweep locks."""

from __future__ import annotations

import time

import pytest

from common.keys import Keys
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerCounters, WorkerStatus


@pytest.fixture
def workers(store_redis, key_prefix) -> WorkerRegistry:
    return WorkerRegistry(store_redis, key_prefix)


def status(name: str) -> WorkerStatus:
    counters = WorkerCounters(batches=2, rows=7, padding_rows=1, device_s=4.5)
    return WorkerStatus(name, "tiny", [(64, 96)], 4, 2, started_at=1.0, at=2.0, counters=counters)


def test_live_workers_are_those_whose_heartbeat_has_not_lapsed(workers, store_redis, key_prefix):
    workers.beat(status("w1"), ttl_s=60)
    workers.beat(status("gone"), ttl_s=0.001)  # a worker that stopped
    # a record this version cannot read (another version's, or damaged): alive, but not listed
    workers.beat(status("broken"), ttl_s=60)
    store_redis.set(Keys(key_prefix).worker("broken"), b"{not json", ex=60)
    time.sleep(0.01)
    assert [w.name for w in workers.live()] == ["w1"] and workers.live()[0] == status("w1")
    assert workers.live_names() == {"w1", "broken"}
    assert workers.status("w1") == status("w1") and workers.status("gone") is None
    assert WorkerRegistry(store_redis, f"{key_prefix}-other").live() == []


def test_live_names_match_a_glob(workers):
    for name in ("hostA-1-100", "hostA-2-100", "hostB-1-100"):
        workers.beat(status(name), ttl_s=60)
    assert workers.live_names("hostA-*") == {"hostA-1-100", "hostA-2-100"}
    assert workers.live_names("hostC-*") == set()


def test_held_jobs_are_noted_released_and_dropped(workers):
    workers.hold("w1", "b")
    workers.hold("w1", "a")
    workers.hold("w2", "c")
    workers.release("w1", [])  # nothing to release: no command
    assert workers.holders() == ["w1", "w2"] and workers.held("w1") == ["a", "b"]
    workers.release("w1", ["a", "b"])
    assert workers.holders() == ["w1", "w2"] and workers.held("w1") == []  # a holder until dropped or forgotten
    workers.drop_held("w2")
    workers.drop_held("w1")
    assert workers.holders() == []


def test_a_clean_exit_forgets_the_heartbeat_and_what_was_held(workers):
    workers.beat(status("w1"), ttl_s=60)
    workers.hold("w1", "a")
    workers.beat(status("w2"), ttl_s=60)
    workers.forget("w1")
    assert workers.live_names() == {"w2"} and workers.holders() == []


def test_one_worker_takes_each_sweep_per_lock_life(workers):
    assert workers.take_sweep("a", ttl_s=1) and not workers.take_sweep("b", ttl_s=1)
    assert workers.take_image_sweep("b", ttl_s=1)  # another lock: the image sweep's own
    assert not workers.take_sweep("a", ttl_s=1)  # not even its holder again, until it lapses
    time.sleep(1.2)
    assert workers.take_sweep("b", ttl_s=1) and workers.take_image_sweep("a", ttl_s=1)
