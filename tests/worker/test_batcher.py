import pytest

from worker.batcher import Batcher, Item, pack


def item(job: str, rows: int = 1, t: float = 0.0, shape=(64, 64)) -> Item:
    return Item(job, shape, rows, t)


def test_full_batches_flush_at_once_without_padding():
    b = Batcher(batch_rows=4, timeout_s=10)
    for i in range(8):
        b.add(item(f"j{i}"))
    due = b.take_due(now_s=0.1)
    assert [[i.job_id for i in x.items] for x in due] == [["j0", "j1", "j2", "j3"], ["j4", "j5", "j6", "j7"]]
    assert [x.padding for x in due] == [0, 0]
    assert b.next_deadline_s() is None


def test_short_batch_waits_for_the_timeout_then_pads():
    b = Batcher(batch_rows=4, timeout_s=2)
    for i in range(3):
        b.add(item(f"j{i}", t=1.0 + i * 0.1))
    assert b.take_due(now_s=2.9) == []
    assert b.next_deadline_s() == pytest.approx(3.0)
    (batch,) = b.take_due(now_s=3.0)
    assert batch.rows == 3 and batch.padding == 1


def test_shapes_never_share_a_batch():
    b = Batcher(batch_rows=4, timeout_s=0)
    b.add(item("a", shape=(64, 64)))
    b.add(item("b", shape=(64, 96)))
    b.add(item("c", shape=(64, 64)))
    due = b.take_due(now_s=1)
    assert sorted(tuple(i.job_id for i in x.items) for x in due) == [("a", "c"), ("b",)]


def test_multi_image_jobs_take_rows_and_are_never_split():
    taken, rest = pack([item("a", 3), item("b", 2), item("c", 1)], batch_rows=4)
    assert [i.job_id for i in taken] == ["a", "c"] and [i.job_id for i in rest] == ["b"]
    b = Batcher(batch_rows=4, timeout_s=5)
    b.add(item("a", 3))
    b.add(item("b", 2))
    b.add(item("c", 1))
    (batch,) = b.take_due(now_s=0)  # a + c fill a batch; b waits for company or its timeout
    assert [i.job_id for i in batch.items] == ["a", "c"]
    assert b.waiting_rows == 2


def test_a_job_larger_than_a_batch_is_refused():
    with pytest.raises(ValueError, match=r"1\.\.4 rows"):
        Batcher(batch_rows=4, timeout_s=1).add(item("big", 5))


def test_drain_gives_back_everything_waiting():
    b = Batcher(batch_rows=4, timeout_s=1)
    b.add(item("a"))
    b.add(item("b", shape=(64, 96)))
    assert sorted(i.job_id for i in b.drain()) == ["a", "b"] and b.waiting_rows == 0


def test_interactive_jobs_are_packed_before_bulk_lines():
    b = Batcher(batch_rows=4, timeout_s=10)
    for i in range(6):
        b.add(Item(f"bulk{i}", "s", 1, arrived_s=i, priority=1))
    b.add(Item("urgent", "s", 2, arrived_s=10, priority=0))
    b.add(Item("bulk6", "s", 1, arrived_s=11, priority=1))
    first, second = b.take_due(now_s=10.5)  # two full batches
    assert [i.job_id for i in first.items] == ["urgent", "bulk0", "bulk1"]  # then bulk lines fill it, oldest first
    assert [i.job_id for i in second.items] == ["bulk2", "bulk3", "bulk4", "bulk5"]
    assert [i.job_id for i in b.drain()] == ["bulk6"]


def test_a_batch_that_cannot_take_the_next_job_runs_padded_at_once():
    """More than a batch of work waits: holding the first batch open for a filler would hold every job behind it."""
    b = Batcher(batch_rows=4, timeout_s=10)
    b.add(item("small", 1, t=0.0))
    b.add(item("big", 4, t=0.1))
    b.add(item("small2", 1, t=0.2))
    assert b.ready_batches() == 2
    first, second = b.take_due(now_s=0.3)
    assert [i.job_id for i in first.items] == ["small", "small2"] and first.padding == 2
    assert [i.job_id for i in second.items] == ["big"] and b.waiting_rows == 0


def test_take_due_starts_at_most_its_limit_the_longest_waiting_group_first():
    b = Batcher(batch_rows=4, timeout_s=10)
    b.add(item("late", 4, t=1.0, shape=(64, 96)))
    b.add(item("early", 4, t=0.0))
    b.add(item("early2", 4, t=0.5))
    assert b.ready_batches() == 3 and b.take_due(now_s=2.0, limit=0) == []
    (batch,) = b.take_due(now_s=2.0, limit=1)
    assert [i.job_id for i in batch.items] == ["early"]
    assert [[i.job_id for i in x.items] for x in b.take_due(now_s=2.0, limit=2)] == [["early2"], ["late"]]


def test_a_short_batch_alone_is_not_ready_before_its_timeout():
    b = Batcher(batch_rows=4, timeout_s=10)
    b.add(item("a", 3))
    assert b.ready_batches() == 0 and b.take_due(now_s=1.0) == []
