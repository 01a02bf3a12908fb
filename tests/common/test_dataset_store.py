"""The data set store against a real Redis: the per-tenant cap of active runs (the feeder's side of the store
is in tests/worker/test_feeder.py)."""

from __future__ import annotations

import pytest
import redis

from common.dataset_store import DatasetStore, TooManyRuns
from common.datasets import DatasetOptions, DatasetStatus
from tests.servers import at_once


@pytest.fixture
def datasets(redis_url, key_prefix) -> DatasetStore:
    return DatasetStore(redis.Redis.from_url(redis_url), key_prefix, ttl_s=60)


def create(datasets: DatasetStore, run_id: str, tenant: str = "acme", max_active: int = 0, total: int = 1) -> None:
    datasets.create(run_id, tenant, DatasetOptions(), seed=1, total=total, skipped=0, max_active=max_active)


def test_the_active_cap_holds_under_concurrent_creates(datasets):
    # Counted and stored in one script: 12 creates racing for 3 places get exactly 3.
    outcomes = at_once(12, lambda i: create(datasets, f"run-{i}", max_active=3))
    refused = [o.active for o in outcomes if isinstance(o, TooManyRuns)]
    assert refused == [3] * 9
    made = [i for i in range(12) if datasets.get(f"run-{i}") is not None]
    assert len(made) == 3 and datasets.active_count("acme") == 3
    assert datasets.recent("acme", 0, 100)[1] == 3  # a refused run left no trace
    create(datasets, "theirs", tenant="other", max_active=3)  # another tenant's cap is its own
    assert datasets.active_count("other") == 1
    run = datasets.get("theirs")
    assert run.status == DatasetStatus.running and run.tenant == "other" and run.total == 1 and run.cursor == 0


def test_a_retry_that_reactivates_an_ended_run_counts_against_the_cap(datasets):
    create(datasets, "old")
    assert datasets.mark_fed("old", 0, "j0", "cursor")
    assert datasets.reap("old", 0, "j0", "failed", {"line": 1, "id": "l0", "error": "boom"})
    assert datasets.finish("old", DatasetStatus.running, DatasetStatus.completed)
    assert datasets.active_count("acme") == 0
    create(datasets, "a", max_active=2)
    create(datasets, "b", max_active=2)
    assert datasets.retry("old", max_active=2) == -3  # would make a third active run
    assert datasets.get("old").status == DatasetStatus.completed and datasets.failures("old")  # untouched
    assert datasets.retry("old", max_active=3) == 1
    assert datasets.active_count("acme") == 3
    assert datasets.get("old").status == DatasetStatus.running
