"""The device clock: when the batches in flight will have left the device, as far as past batches tell. The
dispatcher forms the next batch (takes its jobs from the fair queue) only once the batches ahead of it are about
to end, `lead` before: a batch formed earlier waits on the device behind them, and so does every job in it, while a
tenant whose job becomes ready meanwhile cannot get into it. A chaos run with a tenant flooding four-image jobs
(bench/chaos.py) put the other tenants' p95 latency at 1.55x their calm one with the queued batch formed at once,
the whole difference being that wait.

Estimates are seconds per step, learned per batch key from the batches that ran to their end (an exponential
average). Where there is none yet (a new shape, the first batches), the clock says "now", so the dispatcher forms
batches as soon as a slot is free, as it did without the clock; and an estimate that proves short only lets the
next batch form earlier. It never holds a batch back for longer than its estimate says."""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable
from dataclasses import dataclass

LEAD_MIN_S = 0.1  # a batch is formed at least this long before the device frees: its takes, its reads, its dispatch
LEAD_FRACTION = 0.2  # ... or this share of the running batch's time, if longer (a 3 s batch: 0.6 s ahead)
SMOOTHING = 0.3  # weight of the newest batch in the per-step average


@dataclass(frozen=True)
class _Flight:
    batch_id: str
    key: Hashable
    steps: int
    dispatched_s: float  # monotonic


class DeviceClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the dispatcher's thread dispatches, the finisher's sees batches leave
        self._flights: collections.deque[_Flight] = collections.deque()  # in dispatch order, which is run order
        self._step_s: dict[Hashable, float] = {}  # seconds per step, per batch key
        self._free_s = 0.0  # monotonic: when the last batch left the device

    def dispatched(self, batch_id: str, key: Hashable, steps: int, now_s: float) -> None:
        with self._lock:
            self._flights.append(_Flight(batch_id, key, max(1, steps), now_s))

    def left(self, batch_id: str, done_s: float, device_s: float | None) -> None:
        """A batch left the device at `done_s` after `device_s` on it (None: cut short, as a canceled batch is,
        and not a measure of its kind)."""
        with self._lock:
            flight = self._pop(batch_id)
            self._free_s = max(self._free_s, done_s)
            if flight is None or device_s is None or device_s <= 0:
                return
            step_s = device_s / flight.steps
            known = self._step_s.get(flight.key)
            self._step_s[flight.key] = step_s if known is None else known + SMOOTHING * (step_s - known)

    def forget(self, batch_id: str) -> None:
        """The batch is done with, however it ended (a batch that raised never `left`)."""
        with self._lock:
            self._pop(batch_id)

    def formable_in_s(self, now_s: float) -> float:
        """How long until a batch formed then would wait at most the lead behind those in flight: 0 when none is in
        flight, or when one of them has no estimate."""
        with self._lock:
            free_s, last_s = self._free_s, 0.0
            for flight in self._flights:
                step_s = self._step_s.get(flight.key)
                if step_s is None:
                    return 0.0
                last_s = step_s * flight.steps
                free_s = max(flight.dispatched_s, free_s) + last_s
            if not self._flights:
                return 0.0
            lead_s = max(LEAD_MIN_S, LEAD_FRACTION * last_s)
            return max(0.0, free_s - lead_s - now_s)

    def _pop(self, batch_id: str) -> _Flight | None:
        for flight in self._flights:
            if flight.batch_id == batch_id:
                self._flights.remove(flight)
                return flight
        return None
