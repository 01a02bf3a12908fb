"""How the loop's stages ride out their dependencies' outages. Redis calls wait the outage out: the work cannot go
on without Redis, and will after (common/outage.py, one log line an outage). Storage calls back off a bounded
number of times: a storage blip costs seconds, not the job; past that the caller gives the job back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from common.outage import Outage

P = ParamSpec("P")
T = TypeVar("T")


class RedisRetry:
    """A job-store or registry call that waits out a Redis outage; once the loop stops, the outage's error is
    raised instead (nothing waits for ever at shutdown). One is shared by the device and finisher threads."""

    def __init__(self, outage: Outage, stop: threading.Event):
        self.outage = outage  # "device loop: Redis": its one warning an outage names the loop
        self.stop = stop

    def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return self.outage.call(fn, *args, stop=self.stop, **kwargs)


class StorageRetry:
    """A storage call with exponential backoff: `attempts` tries, waiting backoff_s, 2 backoff_s, ... (at most
    backoff_max_s) between them (SDXL_UPLOAD_ATTEMPTS, ..._BACKOFF_S, ..._BACKOFF_MAX_S), each outage noted once.
    A missing object (KeyError) is an answer, not an outage: raised at once. Uploads and the reads before a job
    is batched (its adapters, its input images) share it."""

    def __init__(
        self,
        attempts: int,
        backoff_s: float,
        backoff_max_s: float,
        outage: Outage,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.outage = outage
        self.sleep = sleep

    def __call__(self, call: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                result = call()
                self.outage.ok()
                return result
            except KeyError:
                raise
            except Exception as exc:
                self.outage.failed(exc)
                if attempt == self.attempts - 1:
                    raise
                self.sleep(min(self.backoff_max_s, self.backoff_s * 2**attempt))
        raise AssertionError("unreachable: the last attempt raises")
