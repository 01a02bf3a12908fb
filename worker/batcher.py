"""Gathering jobs into fixed-size device batches. Plain logic, no threads, no Redis: time is passed in.

A job asking for n images takes n rows and is never split across batches. Jobs are grouped by a key (the
device loop's: size, guidance, refiner and model, worker/loop/batch.py); within a group they are packed
first-fit, interactive jobs before data set lines (priority 0 before 1), each in arrival order. A group's batch
is flushed when it is full, or when the group's oldest job has waited `timeout_s`.
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

    def take_due(self, now_s: float) -> list[Batch[K, P]]:
        """Every batch that should run now: full ones, then those whose oldest job timed out."""
        due: list[Batch[K, P]] = []
        for shape in list(self.groups):
            items = self.groups[shape]
            while items:
                taken, rest = pack(items, self.batch_rows)
                full = sum(i.rows for i in taken) == self.batch_rows
                timed_out = now_s - items[0].arrived_s >= self.timeout_s
                if not (full or timed_out):
                    break
                due.append(Batch(shape, taken, self.batch_rows))
                items = rest
            if items:
                self.groups[shape] = items
            else:
                del self.groups[shape]
        return due

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
