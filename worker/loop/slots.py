"""Slots: how many batches may be dispatched and not yet recorded (MAX_IN_FLIGHT: one running, one queued behind
it). A semaphore whose free count can be read: the dispatcher takes no job from the fair queue that a free slot
could not start at once (worker/loop/dispatcher.py says why), so it asks how many are free, and a slot given back
wakes it to take again."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Slots:
    def __init__(self, limit: int, wake: Callable[[], object] = lambda: None):
        self.limit = limit
        self._free = limit
        self._changed = threading.Condition()
        self._wake = wake  # called after a slot is given back (the dispatcher's: a None in its inbox)

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a slot: False if none came free within `timeout` (or at once, not `blocking`)."""
        with self._changed:
            if not blocking:
                timeout = 0.0
            if not self._changed.wait_for(lambda: self._free > 0, timeout):
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        """Give a slot back (the finisher's, as a batch ends)."""
        with self._changed:
            if self._free >= self.limit:
                raise ValueError("a slot was given back that was never taken")
            self._free += 1
            self._changed.notify()
        self._wake()
