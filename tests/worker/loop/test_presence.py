"""Presence: the heartbeat record, the batch log's lines and counters, when the sweep runs and when it may call
other workers dead, against an in-memory fake registry and batch log (tests/helpers/loop_fakes.py, which record
every call)."""

import time

from common.worker_status import WorkerCounters
from tests.helpers.loop_fakes import FakeBatchLog, FakeRegistry, make_job, redis_retry
from worker.engine.standin import StandInEngine
from worker.loop.batch import BatchKey
from worker.loop.engine_port import Engines
from worker.loop.presence import Presence, batch_record, heartbeat_record

TINY = StandInEngine([(64, 64), (64, 96)], 4, 0.0)
ENGINES = Engines({"tiny": TINY, "other": StandInEngine([(64, 64)], 4, 0.5)})
KEY = BatchKey(64, 96, True, False, "")


def presence(registry: FakeRegistry, sweeps: list[bool] | None = None, heartbeat_s: float = 5.0) -> Presence:
    sweep = sweeps.append if sweeps is not None else None
    return Presence("w1", ENGINES, registry, FakeBatchLog(), redis_retry(), heartbeat_s, sweep)  # type: ignore[arg-type]


def test_the_heartbeat_says_what_the_worker_serves_and_its_counters():
    counters = WorkerCounters(batches=2)
    status = heartbeat_record("w1", ENGINES, counters, started_at=10.0, at=12.0)
    assert (status.name, status.model, status.batch_rows, status.devices) == ("w1", TINY.model.name, 4, 1)
    assert status.sizes == [(64, 64), (64, 96)] and status.counters is counters
    assert [m["name"] for m in status.models] == ["tiny", "other"]
    assert status.models[1] == {"name": "other", "source": "standin-0.5s", "bytes": 0, "weights_sha256": "standin"}


def test_a_batch_line_counts_its_rows_and_padding():
    jobs = [make_job("a"), make_job("b", n=2)]
    record = batch_record("w1", KEY, jobs, batch_rows=4, device_s=0.1234567, batch_id="b1", at=5.0)
    assert (record.height, record.width, record.rows, record.padding) == (64, 96, 3, 1)
    assert record.jobs == ["job-a", "job-b"] and record.device_s == 0.123457 and record.worker == "w1"


def test_logged_batches_and_counted_jobs_reach_the_heartbeat():
    registry = FakeRegistry()
    p = presence(registry)
    p.log_batch(KEY, [make_job("a"), make_job("b", n=2)], 0.5, "b1")
    p.log_batch(KEY, [make_job("c")], 0.25)
    p.count_job("succeeded")
    p.count_job("not a counter")  # ignored, as outcomes that are not counted are
    assert p.beat()
    ((status, ttl_s),) = registry.beats
    c = status.counters
    assert (c.batches, c.rows, c.padding_rows, c.device_s) == (2, 4, 4, 0.75)
    assert c.jobs == {"succeeded": 1, "failed": 0, "canceled": 0, "requeued": 0}
    assert ttl_s == 15.0  # the key lives three periods
    assert [r.batch_id for r in p.batches.records] == ["b1", ""]


def test_held_jobs_are_noted_and_released():
    registry = FakeRegistry()
    p = presence(registry)
    p.hold("j1")
    p.hold("j2")
    p.release(["j1"])
    assert registry.held_sets == {"w1": {"j2"}}


def test_a_worker_that_does_not_sweep_never_takes_the_lock():
    registry = FakeRegistry()
    presence(registry).sweep()
    assert registry.sweeps_taken == []


def test_one_sweep_per_period_and_dead_workers_only_once_the_fleet_has_been_seen_a_while():
    registry, sweeps = FakeRegistry(), []
    p = presence(registry, sweeps, heartbeat_s=0.2)
    p.sweep()
    assert registry.sweeps_taken == [("w1", 1)]  # the lock lives a period, at least a second
    assert sweeps == [False]  # just started: every other worker may not have beaten yet
    registry.sweep_free = False  # another worker swept this period
    p.sweep()
    assert sweeps == [False]
    assert not p.sees_the_fleet(time.monotonic()) and p.sees_the_fleet(time.monotonic() + 0.6)
    registry.down = True  # an outage: every heartbeat lapses, and the clock starts again when Redis is back
    assert not p.beat()
    assert not p.sees_the_fleet(10**9)
    registry.down = False
    assert p.beat() and not p.redis.outage.down
    assert not p.sees_the_fleet(time.monotonic()) and p.sees_the_fleet(time.monotonic() + 0.6)


def test_a_job_held_in_redis_that_the_worker_does_not_know_is_sent_again_at_the_second_look():
    """A failover can undo a worker's last writes (a job's end and its release): the job is back `running` and held
    by a live worker that has moved on. Held jobs the worker knows of are left alone; one it does not know of is
    sent again once it is still unknown a heartbeat later (one look may read the set just before a release)."""
    registry, sent = FakeRegistry(), []
    p = Presence(
        "w1", ENGINES, registry, FakeBatchLog(), redis_retry(), 5.0, None, lambda w, ids: sent.append((w, ids))
    )  # type: ignore[arg-type]
    p.hold("known")  # a named message's job
    p.took("taken")  # a wake-up's job, held by the take's script
    registry.hold("w1", "taken")
    registry.hold("w1", "undone")  # its end and release were lost: the worker answered it long ago
    assert p.reconcile() == [] and sent == []  # first look: a suspect only
    p.release(["known"])
    assert p.reconcile() == ["undone"] and sent == [("w1", ["undone"])]
    registry.release("w1", ["undone"])  # what the reissue does
    assert p.reconcile() == [] and registry.held("w1") == ["taken"]


def test_a_job_released_between_two_looks_is_not_sent_again():
    registry, sent = FakeRegistry(), []
    p = Presence("w1", ENGINES, registry, FakeBatchLog(), redis_retry(), 5.0, None, lambda w, ids: sent.append(ids))  # type: ignore[arg-type]
    registry.hold("w1", "racing")  # read by the first look while its release is under way
    assert p.reconcile() == []
    registry.release("w1", ["racing"])
    assert p.reconcile() == [] and sent == []
