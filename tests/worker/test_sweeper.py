"""The stuck-job sweep against a real Redis."""

import time

import pytest
import redis

from common.job_store import JobStore
from common.jobs import JobRequest, JobStatus
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerStatus
from worker.sweeper import sweep


@pytest.fixture
def store(redis_url, key_prefix) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), key_prefix, ttl_s=60, running_deadline_s=0.2)


def started(store: JobStore, times: int = 1) -> str:
    job_id, _ = store.create(JobRequest(prompt="x", seed=1))
    for _ in range(times):
        store.transition(job_id, JobStatus.running, [JobStatus.queued, JobStatus.running])
    return job_id


def test_overdue_jobs_are_requeued_with_a_fresh_message(store, redis_url):
    fresh, stuck = started(store), started(store)
    r = redis.Redis.from_url(redis_url)
    r.zadd(store.keys.running, {fresh: time.time() + 60})  # this one is not overdue
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


def test_a_dead_workers_held_jobs_are_sent_again_with_the_next_generation(store, redis_url, key_prefix):
    """Held by a worker with no heartbeat: each job, running or still queued, is re-issued (generation 1) and
    its held set dropped; a live worker's held jobs and ended jobs are left alone."""
    from worker.sweeper import reissue_dead_workers

    workers = WorkerRegistry(redis.Redis.from_url(redis_url), key_prefix)

    running, buffered, ended, alive = (
        started(store),
        store.create(JobRequest(prompt="x", seed=2))[0],
        started(store),
        started(store),
    )
    store.transition(ended, JobStatus.succeeded)
    for job_id in (running, buffered, ended):
        workers.hold("dead-worker", job_id)
    workers.hold("live-worker", alive)
    workers.hold("dead-idle-worker", alive)  # held, answered, then died holding nothing: only forgotten
    workers.release("dead-idle-worker", [alive])
    workers.beat(WorkerStatus("live-worker", "tiny", [], 1, 1, started_at=0, at=0), ttl_s=15)
    sent = []
    assert sorted(reissue_dead_workers(store, workers, sent.append)) == sorted([running, buffered])
    assert sorted((j.id, j.generation) for j in sent) == sorted([(running, 1), (buffered, 1)])
    assert store.status(running) == JobStatus.queued and store.get(running).generation == 1
    assert store.status(ended) == JobStatus.succeeded and store.get(alive).generation == 0
    assert workers.holders() == ["live-worker"] and workers.held("live-worker") == [alive]
    assert reissue_dead_workers(store, workers, sent.append) == []  # idempotent


def test_unsent_submits_get_their_message_from_the_outbox(store):
    """A job stored with its outbox entry but never confirmed sent: after the grace period the sweep sends
    it once; a confirmed one, or one canceled meanwhile, is only cleared."""
    from worker.sweeper import relay_outbox

    unsent, confirmed, canceled = (store.create(JobRequest(prompt="x", seed=i))[0] for i in range(3))
    store.sent(confirmed)
    store.transition(canceled, JobStatus.canceled)
    sent = []
    assert relay_outbox(store, sent.append, older_than_s=60) == []  # still within the grace period
    assert relay_outbox(store, sent.append, older_than_s=0) == [unsent] and [j.id for j in sent] == [unsent]
    assert store.unsent(older_than_s=0) == []
    assert relay_outbox(store, sent.append, older_than_s=0) == []


def test_a_ready_job_no_message_will_take_is_woken_once_its_queue_is_empty(store):
    """A failover can keep a job ready and lose the message that would take it (worker/sweeper.py)."""
    from worker.sweeper import wake_stranded

    stranded, _ = store.create(JobRequest(prompt="x", seed=1), tenant="a")
    woken: list[str] = []
    later = time.time() + 60

    def wake(waiting: int, now: float) -> list[str]:
        return wake_stranded(
            store, [store.model_of(None)], lambda model: waiting, lambda job: woken.append(job.id), now=now
        )

    assert wake(waiting=1, now=later) == []  # a message waits on the queue: it will take the job
    assert wake(waiting=0, now=time.time()) == []  # ready for less than the grace: its message may be on its way
    assert wake(waiting=0, now=later) == [stranded] and woken == [stranded]
    store.transition(stranded, JobStatus.canceled, [JobStatus.queued], tenant="a")
    assert wake(waiting=0, now=later) == []  # no longer ready


def test_a_live_workers_orphans_are_sent_again_and_let_go(store, redis_url, key_prefix):
    """worker/loop/presence.py reconcile finds them; here what is done with them, on a real Redis."""
    from worker.sweeper import reissue_orphans

    workers = WorkerRegistry(redis.Redis.from_url(redis_url), key_prefix)
    undone = started(store)  # back `running` after a failover lost its end
    ended = started(store)
    store.transition(ended, JobStatus.succeeded)
    for job_id in (undone, ended):
        workers.hold("w1", job_id)
    sent = []
    assert reissue_orphans(store, workers, sent.append, "w1", [undone, ended]) == [undone]
    assert [j.id for j in sent] == [undone] and sent[0].generation == 1
    assert store.status(undone) == JobStatus.queued and store.status(ended) == JobStatus.succeeded
    assert workers.held("w1") == []


def test_a_job_running_on_a_live_worker_that_does_not_hold_it_is_sent_again(store, redis_url, key_prefix):
    """A failover that mixed a worker's writes left a job `running` on a live worker, held by nobody: sent again at
    the next sweep, not 15 minutes later at its running deadline. A held one, and one on a dead worker (the
    dead-worker sweep's), are left alone."""
    from worker.sweeper import reissue_unheld

    workers = WorkerRegistry(redis.Redis.from_url(redis_url), key_prefix)
    workers.beat(WorkerStatus("live", "tiny", [], 1, 1, started_at=0, at=0), ttl_s=15)
    held, unheld, on_dead = (store.create(JobRequest(prompt=p, seed=1))[0] for p in ("held", "unheld", "dead"))
    for job_id, worker in ((held, "live"), (unheld, "live"), (on_dead, "dead")):
        workers.hold(worker, job_id)
        store.transition(job_id, JobStatus.running, worker=worker)
    workers.release("live", [unheld])  # its end lost, its release kept
    sent = []
    assert reissue_unheld(store, workers, sent.append) == [unheld]
    assert [(j.id, j.generation) for j in sent] == [(unheld, 1)] and store.status(unheld) == JobStatus.queued
    assert store.status(held) == JobStatus.running and store.status(on_dead) == JobStatus.running
    assert reissue_unheld(store, workers, sent.append) == []
