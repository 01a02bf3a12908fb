"""The input records against a real Redis and a Redis Cluster (common/input_store.py; tests/common/conftest.py
`store_redis`): claims per job, the tenant's bytes and quota, two submits of one image at once, and the states a
sweep and a claim meet each other in."""

from __future__ import annotations

import pytest

from common.input_store import Claim, InputQuotaFull, InputStore
from tests.helpers.servers import at_once

H = "a" * 64
LATER = 1e12  # a sweep time far off: a claim's grace never holds it back here


@pytest.fixture
def records(store_redis, key_prefix) -> InputStore:
    return InputStore(store_redis, key_prefix)


def test_an_input_is_charged_once_however_many_jobs_name_it(records):
    assert records.claim("t", H, "job1", 1000, 0, 10.0) is Claim.new
    assert records.claim("t", H, "job2", 1000, 0, 20.0) is Claim.shared
    assert records.used_bytes("t") == 1000 and records.used_bytes("other") == 0
    assert records.references("t", H) == ("2", ["job1", "job2"])
    assert records.due(15.0) == [] and records.due(20.0) == [("t", H)]  # the last claim's grace holds it back
    assert records.stored("t", H, 700) and records.used_bytes("t") == 700  # charged as stored


def test_a_new_input_over_the_quota_is_refused_and_changes_nothing(records):
    records.claim("t", H, "job1", 600, 1000, 10.0)
    with pytest.raises(InputQuotaFull) as refused:
        records.claim("t", "b" * 64, "job2", 500, 1000, 10.0)
    assert (refused.value.used_bytes, refused.value.quota_bytes) == (600, 1000)
    assert records.used_bytes("t") == 600 and records.due(LATER) == [("t", H)]
    assert records.claim("t", H, "job3", 600, 1000, 10.0) is Claim.shared  # stored already: costs nothing more
    assert records.claim("u", "b" * 64, "job4", 500, 1000, 10.0) is Claim.new  # each tenant its own quota


def test_two_submits_of_one_image_at_once_make_it_once(records):
    outcomes = at_once(8, lambda i: records.claim("t", H, f"job{i}", 1000, 0, 10.0))
    assert sorted(o.value for o in outcomes) == ["new"] + ["shared"] * 7  # type: ignore[union-attr]
    assert records.used_bytes("t") == 1000 and len(records.references("t", H)[1]) == 8


def test_a_refused_submit_deletes_what_it_made_unless_another_job_claimed_it(records):
    records.claim("t", H, "job1", 1000, 0, 10.0)
    records.claim("t", H, "job2", 1000, 0, 10.0)
    assert not records.release("t", H, "job1", made=True)  # job2 still names it
    assert records.release("t", H, "job2", made=False) is False  # not its to delete: the sweep's
    records.claim("t", "b" * 64, "job3", 500, 0, 10.0)
    assert records.release("t", "b" * 64, "job3", made=True)  # made and named by nobody else: deleting
    assert records.claim("t", "b" * 64, "job4", 500, 0, 10.0) is Claim.busy  # its object is going
    assert records.forget("t", "b" * 64) == 500 and records.used_bytes("t") == 1000
    assert records.claim("t", "b" * 64, "job4", 500, 0, 10.0) is Claim.new  # gone: made again


def test_the_sweep_retires_an_input_only_when_no_live_job_names_it_and_none_claimed_it_meanwhile(records):
    records.claim("t", H, "job1", 1000, 0, 10.0)
    records.claim("t", H, "job2", 1000, 0, 10.0)
    claims, ids = records.references("t", H)
    assert ids == ["job1", "job2"]
    assert records.retire("t", H, claims, ["job1"], 50.0) == "kept"  # job2 lives: looked at again at 50
    assert records.due(49.0) == [] and records.references("t", H) == ("2", ["job2"])
    claims, _ = records.references("t", H)
    records.claim("t", H, "job3", 1000, 0, 60.0)  # a submit names it while the sweep asks about job2
    assert records.retire("t", H, claims, ["job2"], 70.0) == "kept"  # read before that claim: left alone
    assert records.due(69.0) == []  # and not due again in this pass, whatever the claim's clock said
    assert records.references("t", H) == ("3", ["job2", "job3"])  # job3, whose record may not exist yet, stays
    claims, _ = records.references("t", H)
    assert records.retire("t", H, claims, ["job2", "job3"], 80.0) == "delete"
    assert records.claim("t", H, "job4", 1000, 0, 90.0) is Claim.busy
    assert records.retire("t", H, claims, [], 80.0) == "delete"  # a sweep that stopped half way goes on
    assert records.forget("t", H) == 1000 and records.used_bytes("t") == 0 and records.due(LATER) == []
    assert records.forget("t", H) == 0  # once
    assert records.retire("t", H, "0", [], 80.0) == "unknown"


def test_a_deletion_abandoned_half_way_is_finished_by_the_next_claim_not_waited_on_for_ever(records):
    from common.input_store import ABANDONED_AFTER_S

    records.claim("t", H, "job1", 1000, 0, 10.0, now=100.0)
    assert records.release("t", H, "job1", made=True, now=100.0)  # its deleter then died: the record says deleting
    assert records.claim("t", H, "job2", 1000, 0, 10.0, now=100.0 + ABANDONED_AFTER_S - 1) is Claim.busy
    assert records.claim("t", H, "job2", 1000, 0, 10.0, now=100.0 + ABANDONED_AFTER_S) is Claim.stale
    assert records.forget("t", H) == 1000  # what the API does on stale (the object first), then claims again
    assert records.claim("t", H, "job2", 1000, 0, 10.0) is Claim.new and records.used_bytes("t") == 1000
