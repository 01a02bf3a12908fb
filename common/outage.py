"""Riding out Redis and storage outages in the worker's long-lived threads, and dying loudly otherwise.

Every thread that runs for the life of the worker (device loop, finisher, feeder, image sweep) meets the
same two cases:
- Redis (or storage) is away: the work cannot go on, but it will once the server is back. The thread logs
  the first failure of the spell with its traceback, counts the rest quietly, backs off with jitter
  (capped at `max_s`, so it notices the end of the outage within that), and logs one summary line when a
  call succeeds again. One line per outage, not one traceback per retry.
- Anything else (a bug): the thread cannot know what state it left behind. A live process whose device
  thread is dead accepts messages that nothing runs; so the whole process exits non-zero (`die`) and its
  supervisor (systemd, Kubernetes, docker compose) starts a fresh one, and Celery redelivers its jobs.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import kombu.exceptions
import redis

T = TypeVar("T")
log = logging.getLogger(__name__)

# Connection refused, reset, timed out, or the server still loading its append-only file after a restart
# (BusyLoadingError is a ConnectionError): all mean "try again later". Celery's producer reports the same
# outage of the broker (the same Redis) as kombu's OperationalError once its own retries are spent.
# A failover (common/redis_connection.py) adds two: the sentinels naming no primary yet (MasterNotFoundError,
# a ConnectionError), and a write reaching a primary demoted to replica (ReadOnlyError: a ResponseError, which
# redis-py's sentinel pool turns into a ConnectionError, but a plain URL pointing at a moved primary does not).
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    kombu.exceptions.OperationalError,
)
EXIT_THREAD_DIED = 70  # EX_SOFTWARE: an internal error; the supervisor restarts the process


class Outage:
    """One dependency's health as a component sees it, shared by that component's threads."""

    def __init__(self, what: str, base_s: float = 0.2, max_s: float = 2.0, logger: logging.Logger = log):
        self.what = what  # e.g. "device loop: Redis"
        self.base_s = base_s
        self.max_s = max_s
        self.log = logger
        self._lock = threading.Lock()
        self._since: float | None = None  # when the current outage began (monotonic); None: healthy
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> float:
        """Note a failure; returns how long to wait before the next try (exponential, with full jitter)."""
        with self._lock:
            self._failures += 1
            first = self._since is None
            if first:
                self._since = time.monotonic()
            failures = self._failures
        if first:
            self.log.warning(
                "%s unreachable (%s: %s); retrying quietly until it answers",
                self.what,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        ceiling = min(self.max_s, self.base_s * 2 ** min(failures - 1, 16))
        return random.uniform(ceiling / 2, ceiling)

    def ok(self) -> None:
        """Note a success; ends the outage, if there was one, with a summary line."""
        if self._since is None:  # the common case: no lock taken
            return
        with self._lock:
            if self._since is None:
                return
            lasted_s, failures = time.monotonic() - self._since, self._failures
            self._since, self._failures = None, 0
        self.log.warning("%s is back after %.1f s (%d failed calls)", self.what, lasted_s, failures)

    def call(self, fn: Callable[..., T], *args: object, stop: threading.Event | None = None, **kwargs: object) -> T:
        """fn(*args, **kwargs), tried again through an outage until it answers. Errors other than an outage
        propagate at once; so does the outage's error once `stop` is set (the process is shutting down)."""
        while True:
            try:
                result = fn(*args, **kwargs)
            except REDIS_DOWN as exc:
                wait_s = self.failed(exc)
                if stop is not None and stop.is_set():
                    raise
                if stop is not None:
                    stop.wait(wait_s)
                else:
                    time.sleep(wait_s)
                continue
            self.ok()
            return result


def die(what: str, exc: BaseException | None = None) -> None:
    """Exit the whole process at once (no cleanup that could hang): a thread it depends on has died."""
    log.critical("%s died; exiting so that the supervisor restarts the worker", what, exc_info=exc)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_THREAD_DIED)


def supervised(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread that takes the process down if `target` raises (or returns while nobody stopped it is
    the caller's business: targets loop until their stop event is set)."""

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            die(f"thread {name!r}", exc)

    return threading.Thread(target=run, name=name, daemon=True)
