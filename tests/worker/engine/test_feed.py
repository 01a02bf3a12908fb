"""The device feed (worker/engine/feed.py): batches enqueued in order, step chunks at most `ahead` in flight, and a
canceled batch's remaining chunks never enqueued. First with device calls played by events (what is "on the
device" is exact), then on the real engine."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from worker.engine import feed
from worker.engine.engine import Row

WAIT_S = 10.0


class Chunk:
    """A chunk's mark: ready when the test says the device has done it."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def is_ready(self) -> bool:
        return self.done.is_set()

    def block_until_ready(self) -> None:
        assert self.done.wait(WAIT_S), "the device never finished this chunk"


class Device:
    """Chunks enqueued, in order, as (batch, chunk index, mark)."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[str, int, Chunk]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def batch(self, name: str, chunks: int) -> feed.Calls:
        for i in range(chunks):
            mark = Chunk()
            with self.changed:
                self.enqueued.append((name, i, mark))
                self.changed.notify_all()
            yield i + 1, mark
        return name

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.enqueued) >= count, WAIT_S)

    def finish(self, count: int) -> None:
        """The device does the first `count` chunks enqueued so far."""
        self.wait_for(count)
        for _, _, mark in self.enqueued[:count]:
            mark.done.set()

    def run_until(self, ticket: feed.Ticket) -> None:
        """The device does every chunk it is given until `ticket`'s batch has ended."""
        for _ in range(int(WAIT_S / 0.01)):
            with self.lock:
                for _, _, mark in self.enqueued:
                    mark.done.set()
            if ticket.ended:
                return
            threading.Event().wait(0.01)
        raise AssertionError("the batch never ended")


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_canceled_batch_stops_within_the_chunks_in_flight_and_the_next_one_runs(ahead):
    device = Device()
    fed = feed.Feed(ahead)
    first = fed.submit(device.batch("first", 10))
    second = fed.submit(device.batch("second", 3))
    device.wait_for(ahead)
    assert len(device.enqueued) == ahead  # no more than `ahead` chunks are ever on the device
    device.finish(1)
    assert first.mark(0)[0] == 1
    assert first.cancel()  # every row canceled, seen when the first chunk ended
    device.run_until(second)  # the device does what it has, and the second batch
    assert second.wait() == "second"
    ran = [i for name, i, _ in device.enqueued if name == "first"]
    # the first chunk, the one running when it was canceled and (ahead 2) the one queued behind it; never more
    assert len(ran) <= 1 + ahead and len(ran) < 10
    assert [i for name, i, _ in device.enqueued if name == "second"] == [0, 1, 2]  # after the first's, in order
    with pytest.raises(feed.Canceled):
        first.wait()
    assert not second.cancel()  # it had ended


def test_batches_run_whole_and_in_order_when_nothing_is_canceled():
    device = Device()
    fed = feed.Feed(2)
    tickets = [fed.submit(device.batch(name, 4)) for name in ("a", "b", "c")]
    for count in range(1, 13):
        device.finish(count)
    assert [t.wait() for t in tickets] == ["a", "b", "c"]
    assert [(name, i) for name, i, _ in device.enqueued] == [(n, i) for n in "abc" for i in range(4)]
    assert [tickets[0].mark(i)[0] for i in range(4)] == [1, 2, 3, 4] and tickets[0].mark(4) is None


def test_a_batch_canceled_before_it_started_never_reaches_the_device():
    device = Device()
    fed = feed.Feed(2)
    first = fed.submit(device.batch("first", 3))
    waiting = fed.submit(device.batch("waiting", 3))
    assert waiting.cancel()
    for count in range(1, 4):
        device.finish(count)
    assert first.wait() == "first"
    assert {name for name, _, _ in device.enqueued} == {"first"}


def test_the_engine_stops_a_canceled_batch_and_runs_the_next(engine32):
    """The real engine, one step a chunk: canceled after its first step, a 12-step batch enqueues at most the
    chunks in flight; the next batch's images are what it makes alone."""
    before = engine32.chunks
    long = engine32.dispatch([Row("a cat", seed=1, steps=12)], 64, 64)
    next_rows = [Row("a dog", seed=2, steps=2)]
    after = engine32.dispatch(next_rows, 64, 64)
    steps = iter(long.progress())
    assert next(steps) == 1
    assert long.cancel()
    assert len(list(steps)) <= engine32.feed.ahead  # the chunks already in flight, then no more
    with pytest.raises(feed.Canceled):
        long.fetch()
    got = after.fetch().images
    ran = engine32.chunks - before - 2  # the second batch's two
    assert 1 <= ran <= 1 + engine32.feed.ahead < 12
    assert np.array_equal(got, engine32.generate(next_rows, 64, 64).images)
