"""The device feed: an engine's batches enqueued on the devices in the order they were dispatched, their step chunks
at most `ahead` in flight, not all at once.

Why: JAX dispatch is asynchronous and a call once enqueued runs to its end. A batch whose every chunk was enqueued
at dispatch would run to its last step even when every row of it was canceled; fed a chunk or two ahead, a canceled
batch (`Ticket.cancel`) has its remaining chunks dropped, and the device goes on to the next batch as soon as the
chunks already in flight are done (at most `ahead`: the running one and the one queued behind it).
What it costs: a host thread per engine, alive while there is work, that wakes as each chunk ends to enqueue the
next. With `ahead` >= 2 a chunk is always queued behind the running one, so the device never waits for the host.

A batch is a generator (the engine's): each `next()` enqueues the calls up to and including one step chunk and
yields (steps done, a scalar ready when they are); it returns (images, finite). Batches run strictly in order: the
next batch's first call is enqueued only after the previous batch's last one.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Generator
from typing import Any

Mark = tuple[int, Any]  # (steps done, a device scalar ready when they are)
Calls = Generator[Mark, None, Any]


class Canceled(Exception):
    """The batch was canceled before it ended: its remaining chunks never ran, and it has no images."""


class Ticket:
    """One batch in the feed: its chunks' marks as they are enqueued, and how it ended."""

    def __init__(self, feed: Feed, calls: Calls):
        self.feed = feed
        self.calls = calls
        self.marks: list[Mark] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.canceled = False
        self.ended = False  # every call enqueued (result set), or it failed or was canceled
        self.cond = threading.Condition()

    def mark(self, index: int) -> Mark | None:
        """The index-th chunk's mark once it is enqueued; None when the batch ended with fewer."""
        with self.cond:
            while len(self.marks) <= index and not self.ended:
                self.cond.wait()
            return self.marks[index] if index < len(self.marks) else None

    def wait(self) -> Any:
        """The batch's result once its last call is enqueued; raises Canceled, or what its calls raised."""
        with self.cond:
            while not self.ended:
                self.cond.wait()
        if self.canceled:
            raise Canceled("the batch was canceled")
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> bool:
        """Drop the calls not yet enqueued. True: some were (the batch is canceled); False: it had ended."""
        return self.feed.cancel(self)

    def _end(self, result: Any = None, error: BaseException | None = None, canceled: bool = False) -> None:
        with self.cond:
            if not self.ended:
                self.result, self.error, self.canceled, self.ended = result, error, canceled, True
            self.cond.notify_all()


class Feed:
    def __init__(self, ahead: int = 2):
        if ahead < 1:
            raise ValueError(f"ahead must be at least 1, got {ahead}")
        self.ahead = ahead
        self._queue: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.chunks = 0  # chunks enqueued on the devices, over the feed's life

    def submit(self, calls: Calls) -> Ticket:
        ticket = Ticket(self, calls)
        with self._lock:
            self._queue.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="device-feed", daemon=True)
                self._thread.start()
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        with self._lock:
            if ticket.ended:
                return False
            if ticket in self._queue and self._queue[0] is not ticket:
                self._queue.remove(ticket)  # not started: nothing of it ran
                ticket.calls.close()
            ticket.canceled = True  # the head's: the feed thread drops it after the call it is making
        ticket._end(canceled=True)
        return True

    def _run(self) -> None:
        in_flight: collections.deque[Any] = collections.deque()  # the marks of enqueued chunks, oldest first
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                ticket = self._queue[0]
                if ticket.canceled:
                    self._queue.popleft()
                    ticket.calls.close()
                    continue
            try:
                mark = next(ticket.calls)
            except StopIteration as done:
                self._pop(ticket)
                ticket._end(result=done.value)
                continue
            except BaseException as exc:  # raised while enqueueing: the batch fails, the feed goes on
                self._pop(ticket)
                ticket._end(error=exc)
                continue
            self.chunks += 1
            with ticket.cond:
                ticket.marks.append(mark)
                ticket.cond.notify_all()
            in_flight.append(mark[1])
            # no more than `ahead` chunks on the devices: wait for the oldest (a failed one raises at fetch)
            while len(in_flight) >= self.ahead or (in_flight and _ready(in_flight[0])):
                _wait(in_flight.popleft())

    def _pop(self, ticket: Ticket) -> None:
        with self._lock:
            if self._queue and self._queue[0] is ticket:
                self._queue.popleft()


def _ready(array: Any) -> bool:
    return bool(getattr(array, "is_ready", lambda: True)())


def _wait(array: Any) -> None:
    with contextlib.suppress(Exception):  # the program failed on the device: its batch's fetch raises it
        array.block_until_ready()
