"""The stuck-job sweep against a real Redis."""

import time

import pytest
import redis

from common.job_store import JobStore
from common.jobs import JobRequest, JobStatus
from worker.sweeper import sweep


@pytest.fixture
def store(redis_url, key_prefix) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), key_prefix, ttl_s=60, running_deadline_s=0.2)


def started(store: JobStore, times: int = 1) -> str:
    job_id, _ = store.create(JobRequest(prompt="x", seed=1))
    for _ in range(times):
        store.transition(job_id, JobStatus.running, [JobStatus.queued, JobStatus.running])
    return job_id


def test_overdue_jobs_are_requeued_with_a_fresh_message(store):
    fresh, stuck = started(store), started(store)
    store.r.zadd(store.key("running"), {fresh: time.time() + 60})  # this one is not overdue
    time.sleep(0.3)
    sent = []
    enqueue = lambda job: sent.append(job.id)  # noqa: E731
    assert sweep(store, max_attempts=3, enqueue=enqueue) == {"requeued": [stuck], "failed": []}
    assert sent == [stuck] and store.status(stuck) == JobStatus.queued and store.status(fresh) == JobStatus.running
    assert store.queue_position(stuck) == 1
    assert sweep(store, max_attempts=3, enqueue=enqueue) == {"requeued": [], "failed": []}  # idempotent


def test_out_of_attempts_fails_with_the_reason(store):
    job_id = started(store, times=3)
    time.sleep(0.3)
    assert sweep(store, max_attempts=3, enqueue=lambda _: None) == {"requeued": [], "failed": [job_id]}
    job = store.get(job_id)
    assert job.status == JobStatus.failed and "stuck" in job.error and "3 attempts" in job.error


def test_finished_jobs_leave_the_running_set(store):
    job_id = started(store)
    store.transition(job_id, JobStatus.canceled)
    time.sleep(0.3)
    assert store.overdue() == []
