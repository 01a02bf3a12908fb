"""Caps on what one owner (an API key, a tenant) holds open at once in this API process: event streams and waits
per key, data set uploads being read per tenant. Over the cap: 429 with Retry-After, before any work is done.

Counted in the process, not in Redis: what they bound is this process's own CPU and memory (one key holding
1,500 event streams used a core and slowed every other tenant's reads), a count dies with the process that held
it (nothing to leak when a pod is killed), and the deployment's cap is this one times its API processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastapi import HTTPException


class Slots:
    def __init__(self, limit: int, what: str, setting: str, retry_after_s: int = 5):
        self.limit = limit
        self.what = what  # "event streams and waits per API key": for the 429's detail
        self.setting = setting
        self.retry_after_s = retry_after_s
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def held(self, owner: str) -> int:
        with self._lock:
            return self._held.get(owner, 0)

    def try_take(self, owner: str) -> Callable[[], None] | None:
        """A slot for `owner` and the function that gives it back (once, however often called), or None."""
        with self._lock:
            count = self._held.get(owner, 0)
            if count >= self.limit:
                return None
            self._held[owner] = count + 1
        given = threading.Event()

        def give_back() -> None:
            if given.is_set():
                return
            given.set()
            with self._lock:
                left = self._held[owner] - 1
                if left:
                    self._held[owner] = left
                else:
                    del self._held[owner]

        return give_back

    def take(self, owner: str) -> Callable[[], None]:
        """try_take, or 429 with Retry-After."""
        give_back = self.try_take(owner)
        if give_back is None:
            raise HTTPException(
                429,
                f"at most {self.limit} {self.what} open at once ({self.setting}); retry when one has ended",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        return give_back

    @contextmanager
    def taken(self, owner: str) -> Iterator[None]:
        give_back = self.take(owner)
        try:
            yield
        finally:
            give_back()
