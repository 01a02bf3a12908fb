"""The data set store against a real Redis: the per-tenant cap of active runs (the feeder's side of the store
is in tests/worker/test_feeder.py)."""

from __future__ import annotations

import pytest

from common.dataset_store import DatasetStore, TooManyRuns
from common.datasets import DatasetOptions, DatasetStatus
from tests.helpers.servers import at_once


@pytest.fixture
def datasets(store_redis, key_prefix) -> DatasetStore:
    return DatasetStore(store_redis, key_prefix, ttl_s=60)


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


def test_a_capped_script_counts_the_active_list_as_it_is_not_as_it_was_read(datasets, monkeypatch):
    """The tenant's active runs are counted from hashes passed in KEYS, named by a read of the active list just
    before: a list that changed in between is refused by the script and read again, never counted stale."""
    create(datasets, "a", max_active=2)
    read = datasets.active
    reads = []

    def stale_first() -> list[str]:
        reads.append(1)
        return [] if len(reads) == 1 else read()  # the first read misses run "a", as if made before it

    monkeypatch.setattr(datasets, "active", stale_first)
    with pytest.raises(TooManyRuns) as refused:
        create(datasets, "b", max_active=1)
    assert refused.value.active == 1 and len(reads) == 2 and datasets.get("b") is None


def test_a_finished_run_keeps_its_record_and_outputs_for_the_ttl(datasets, store_redis):
    create(datasets, "old", total=2)
    for index, outcome in enumerate(("succeeded", "failed")):
        assert datasets.mark_fed("old", index, f"j{index}", "cursor")
        assert datasets.reap("old", index, f"j{index}", outcome, {"line": index + 1, "id": f"l{index}"})
    datasets.sample_rate("old", 1)
    assert datasets.finish("old", DatasetStatus.running, DatasetStatus.completed)
    r, keys = store_redis, datasets.keys.run("old")
    ttls = {key: r.ttl(key) for key in keys.kept if r.exists(key)}
    assert set(ttls) == {keys.record, keys.done, keys.failed, keys.rate}
    assert all(0 < ttl <= 60 for ttl in ttls.values()) and "old" not in datasets.active()
