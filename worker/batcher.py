"""Gathering jobs into fixed-size device batches. Plain logic, no threads, no Redis: time is passed in.

A job asking for n images takes n rows and is never split across batches. Jobs are grouped by a key (the
device loop's: size, guidance, refiner and model, worker/loop/batch.py); within a group they are packed
first-fit, interactive jobs before data set lines (priority 0 before 1), each in arrival order. A group's batch
is flushed when it is full, when the group's oldest job has waited `timeout_s`, or when the group holds a job the
batch could not take (more than a batch of work: it runs padded rather than wait for a filler).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)  # the group key (the device loop's: worker/loop/batch.py BatchKey)
P = TypeVar("P")  # what an item carries for its owner (the device loop's: its admitted job)


@dataclass
class Item(Generic[K, P]):
    job_id: str
    shape: K  # jobs only share a batch with jobs of the same compiled shape
    rows: int
    arrived_s: float
    payload: P = None  # type: ignore[assignment]  # the batcher's own tests carry none
    priority: int = 0  # 0 interactive, 1 bulk: lower goes first


@dataclass
class Batch(Generic[K, P]):
    shape: K
    items: list[Item[K, P]]
    batch_rows: int

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)

    @property
    def padding(self) -> int:
        return self.batch_rows - self.rows


def pack(items: list[Item[K, P]], batch_rows: int) -> tuple[list[Item[K, P]], list[Item[K, P]]]:
    """First-fit by priority, then arrival order: (the items of one batch, the rest in arrival order)."""
    taken: list[Item[K, P]] = []
    rest: list[Item[K, P]] = []
    used = 0
    for item in sorted(items, key=lambda i: i.priority):  # stable: arrival order within a priority
        if used + item.rows <= batch_rows:
            taken.append(item)
            used += item.rows
        else:
            rest.append(item)
    rest.sort(key=lambda i: i.arrived_s)  # the group's oldest first: its timeout is the group's
    return taken, rest


@dataclass
class Batcher(Generic[K, P]):
    batch_rows: int
    timeout_s: float
    groups: dict[K, list[Item[K, P]]] = field(default_factory=dict)

    def add(self, item: Item[K, P]) -> None:
        if not 1 <= item.rows <= self.batch_rows:
            raise ValueError(f"a job takes 1..{self.batch_rows} rows, got {item.rows}")
        self.groups.setdefault(item.shape, []).append(item)

    def take_due(self, now_s: float, limit: int | None = None) -> list[Batch[K, P]]:
        """The batches that should run now, at most `limit` (None: every one), the group waiting longest first. A
        group's batch (first-fit) is due when it is full, when its oldest job timed out, or when a job of the group
        waits that it could not take: then the group holds more than a batch of work, and holding this one open
        for a filler would keep every later job of the group waiting behind it (and undo the fair order in which
        they were taken). The batch then runs padded."""
        due: list[Batch[K, P]] = []
        for shape in sorted(self.groups, key=lambda s: self.groups[s][0].arrived_s):
            room = None if limit is None else limit - len(due)
            batches, rest = self._split(self.groups[shape], now_s, room)
            due += [Batch(shape, taken, self.batch_rows) for taken in batches]
            if rest:
                self.groups[shape] = rest
            else:
                del self.groups[shape]
        return due

    def ready_batches(self) -> int:
        """How many batches are due before any timeout (take_due's count, were no job ever to time out)."""
        return sum(len(self._split(items, float("-inf"), None)[0]) for items in self.groups.values())

    def _split(
        self, items: list[Item[K, P]], now_s: float, limit: int | None
    ) -> tuple[list[list[Item[K, P]]], list[Item[K, P]]]:
        """A group's due batches (at most `limit`) and what stays waiting."""
        batches: list[list[Item[K, P]]] = []
        while items and (limit is None or len(batches) < limit):
            taken, rest = pack(items, self.batch_rows)
            full = sum(i.rows for i in taken) == self.batch_rows
            timed_out = now_s - items[0].arrived_s >= self.timeout_s
            if not (full or timed_out or rest):
                break
            batches.append(taken)
            items = rest
        return batches, items

    def next_deadline_s(self) -> float | None:
        """When the oldest waiting job times out, or None when nothing waits."""
        if not self.groups:
            return None
        return min(items[0].arrived_s for items in self.groups.values()) + self.timeout_s

    def drain(self) -> list[Item[K, P]]:
        """Everything still waiting (for a shutdown that gives jobs back)."""
        items = [i for group in self.groups.values() for i in group]
        self.groups.clear()
        return items

    @property
    def waiting_rows(self) -> int:
        return sum(i.rows for group in self.groups.values() for i in group)
