"""The device loop against a real Redis and a real local store. The engine here is the fixed-duration
stand-in, rigged to fail on purpose: these tests are about the loop (isolation, recording, cancel,
redelivery), not the model; the real engine runs in tests/test_end_to_end.py."""

from __future__ import annotations

import time

import pytest
import redis

from common.batch_log import BatchLog
from common.job_store import JobStore
from common.jobs import JobRequest, JobStatus
from common.storage import LocalStorage
from common.worker_registry import WorkerRegistry
from tests.helpers.rigged import RiggedEngine
from worker.device_loop import DeviceLoop, LoopSettings


def make_loop(
    engine: RiggedEngine, redis_url: str, key_prefix: str, tmp_path, batch_timeout_s: float, heartbeat_s: float = 5.0
) -> DeviceLoop:
    client = redis.Redis.from_url(redis_url)
    return DeviceLoop(
        engine,
        JobStore(client, key_prefix, ttl_s=60),
        LocalStorage(tmp_path, "http://x", b"k" * 32),
        LoopSettings(batch_timeout_s, heartbeat_s=heartbeat_s),
        workers=WorkerRegistry(client, key_prefix),
        batches=BatchLog(client, key_prefix),
    )


@pytest.fixture
def loop(redis_url, key_prefix, tmp_path):
    device_loop = make_loop(RiggedEngine([(64, 64)], 4, 0.05), redis_url, key_prefix, tmp_path, batch_timeout_s=0.2)
    device_loop.start()
    yield device_loop
    device_loop.stop()


def make(loop: DeviceLoop, prompt: str, n: int = 1) -> str:
    return loop.store.create(JobRequest(prompt=prompt, width=64, height=64, seed=5, num_images=n))[0]


def run(loop: DeviceLoop, ids: list[str]) -> list[str]:
    futures = [loop.submit(i) for i in ids]
    return [f.result(timeout=30) for f in futures]


def test_a_poison_job_fails_alone(loop):
    ids = [make(loop, "fine"), make(loop, "poison"), make(loop, "also fine", 2)]
    assert run(loop, ids) == ["succeeded", "failed", "succeeded"]
    poisoned = loop.store.get(ids[1])
    assert "FloatingPointError: poison row" in poisoned.error
    assert all((loop.storage.root / i.key).is_file() for i in loop.store.get(ids[2]).images)


def test_non_finite_output_fails_only_its_job(loop):
    ids = [make(loop, "fine"), make(loop, "nan"), make(loop, "fine too")]
    assert run(loop, ids) == ["succeeded", "failed", "succeeded"]
    assert "non-finite" in loop.store.get(ids[1]).error
    assert not (loop.storage.root / "images" / ids[1]).exists()


def test_canceled_before_the_batch_never_runs(loop):
    job_id = make(loop, "fine")
    loop.store.transition(job_id, JobStatus.canceled)
    assert run(loop, [job_id]) == ["canceled"]
    assert loop.store.get(job_id).attempts == 0


def test_a_redelivered_running_job_runs_again(loop):
    job_id = make(loop, "fine")
    loop.store.transition(job_id, JobStatus.running)  # as if a worker died mid-batch
    assert run(loop, [job_id]) == ["succeeded"]
    job = loop.store.get(job_id)
    assert job.attempts == 2 and len(job.images) == 1


def test_a_finished_job_delivered_again_is_not_run_again(loop):
    job_id = make(loop, "fine")
    assert run(loop, [job_id]) == ["succeeded"]
    images = loop.store.get(job_id).images
    assert run(loop, [job_id]) == ["succeeded"]
    job = loop.store.get(job_id)
    assert job.attempts == 1 and job.images == images
    assert all((loop.storage.root / i.key).is_file() for i in images)


def test_a_worker_busy_on_a_long_batch_keeps_its_heartbeat(redis_url, key_prefix, tmp_path):
    # heartbeat key lives 0.6 s; a batch takes 2 s
    loop = make_loop(RiggedEngine([(64, 64)], 1, 2.0), redis_url, key_prefix, tmp_path, 0.05, heartbeat_s=0.2)
    loop.start()
    try:
        futures = [loop.submit(make(loop, f"job {i}")) for i in range(3)]  # 3 one-row batches: 2 in flight
        seen_dead = False
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            seen_dead |= loop.name not in loop.workers.live_names()
            time.sleep(0.05)
        assert [f.result(timeout=10) for f in futures] == ["succeeded"] * 3
        assert not seen_dead
    finally:
        loop.stop()


def test_the_heartbeat_carries_the_workers_counters(loop):
    ids = [make(loop, "fine"), make(loop, "poison"), make(loop, "also fine", 2)]
    assert run(loop, ids) == ["succeeded", "failed", "succeeded"]
    loop.presence.beat()
    status = loop.workers.status(loop.name)
    c = status.counters
    # the batch of 4 rows raised, then each job ran alone (one row padded to 4, the poison one raised alone,
    # two rows padded to 4): the log of engine runs and the counters say the same
    runs = [b for b in loop.batches.recent() if set(b.jobs) & set(ids)]
    assert c.batches == len(runs) == 2 and c.rows == 3 and c.padding_rows == 5
    assert c.device_s == pytest.approx(sum(b.device_s for b in runs), abs=1e-3) and c.device_s >= 0.1
    assert c.jobs == {"succeeded": 2, "failed": 1, "canceled": 0, "requeued": 0}
    assert status.name == loop.name and status.batch_rows == 4 and status.sizes == [(64, 64)]
    assert status.started_at <= status.at


def test_a_clean_stop_takes_the_heartbeat_and_the_held_set_away(redis_url, key_prefix, tmp_path):
    loop = make_loop(RiggedEngine([(64, 64)], 4, 0.05), redis_url, key_prefix, tmp_path, batch_timeout_s=0.05)
    loop.start()
    assert run(loop, [make(loop, "fine")]) == ["succeeded"]
    loop.workers.hold(loop.name, "a job it was about to answer")
    assert loop.name in loop.workers.live_names() and loop.workers.holders() == [loop.name]
    loop.stop()
    assert loop.workers.live_names() == set() and loop.workers.holders() == []


def test_a_job_whose_input_image_is_gone_fails_with_the_reason(loop):
    request = JobRequest(prompt="fine", width=64, height=64, seed=5, init_image="inputs/t/gone.png")
    job_id = loop.store.create(request)[0]
    assert run(loop, [job_id]) == ["failed"]
    job = loop.store.get(job_id)  # failed from queued (it never ran), not left queued
    assert job.status == JobStatus.failed and job.error == "input image 'inputs/t/gone.png' is no longer in storage"
