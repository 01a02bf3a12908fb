"""The one-off rename from the layout before hash tags (every key P:<part>...) on a real Redis: a deployment's
records, renamed, read back by the stores as they were; nothing else touched; a second run a no-op."""

from __future__ import annotations

import redis

from common.api_keys import ApiKeyStore
from common.dataset_store import DatasetStore
from common.datasets import DatasetOptions
from common.job_store import JobStore
from common.jobs import JobRequest
from common.key_migration import migrate
from common.keys import Keys
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerCounters, WorkerStatus


def test_a_deployment_before_hash_tags_reads_back_whole_after_the_rename(redis_url, key_prefix):
    r = redis.Redis.from_url(redis_url)
    jobs, keys = JobStore(r, key_prefix, ttl_s=600), Keys(key_prefix)
    first, _ = jobs.create(JobRequest(prompt="a cat", seed=1), "idem-1", "fp", tenant="a")
    second, _ = jobs.create(JobRequest(prompt="a dog", seed=2), tenant="a")
    record, api_key = ApiKeyStore(r, key_prefix).create("a")
    status = WorkerStatus("w1", "tiny", [(64, 64)], 4, 2, started_at=1.0, at=2.0, counters=WorkerCounters())
    WorkerRegistry(r, key_prefix).beat(status, ttl_s=600)
    DatasetStore(r, key_prefix).create("run1", "a", DatasetOptions(), seed=1, total=3, skipped=0)
    r.set(keys.batches, "kept")  # a key without the tag: its name is the same in both layouts
    r.set(f"{key_prefix}:a-queue", "celery's")  # not the layout's: left alone
    tagged = sorted(n.decode() for n in r.scan_iter(match=keys.everything[0]))
    for name in tagged:  # as the layout before hash tags named them
        r.rename(name, key_prefix + name.removeprefix(keys.tag))

    assert migrate(r, key_prefix, dry_run=True).renamed == len(tagged) and not list(r.scan_iter(keys.everything[0]))
    done = migrate(r, key_prefix)
    assert done.renamed == len(tagged) and done.clashes == []
    assert sorted(n.decode() for n in r.scan_iter(match=keys.everything[0])) == tagged
    assert 0 < r.ttl(keys.job(first)) <= 600  # expiries kept
    assert jobs.create(JobRequest(prompt="a cat", seed=1), "idem-1", "fp", tenant="a") == (first, False)
    assert [jobs.take("w2"), jobs.take("w2"), jobs.take("w2")] == [first, second, None]
    assert ApiKeyStore(r, key_prefix).verify(api_key) == record
    assert WorkerRegistry(r, key_prefix).live_names() == {"w1"}
    assert DatasetStore(r, key_prefix).get("run1").total == 3
    assert r.get(keys.batches) == b"kept" and r.get(f"{key_prefix}:a-queue") == b"celery's"
    assert migrate(r, key_prefix).renamed == 0  # once is all


def test_a_key_whose_new_name_is_taken_is_left_and_listed(redis_url, key_prefix):
    r, keys = redis.Redis.from_url(redis_url), Keys(key_prefix)
    r.set(f"{key_prefix}:seq", 5)  # the old counter
    r.set(keys.seq, 1)  # the new version ran before the rename
    done = migrate(r, key_prefix)
    assert (done.renamed, done.clashes) == (0, [f"{key_prefix}:seq"])
    assert r.get(keys.seq) == b"1" and r.get(f"{key_prefix}:seq") == b"5"
