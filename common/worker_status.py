"""What a worker tells the rest of the service about itself: one record in Redis, {P}:worker:<name>, rewritten
at every heartbeat and expiring soon after the worker stops (common/worker_registry.py writes and reads them).
/readyz counts them; /metrics reads them.

The counters run from the worker's start and only grow (Prometheus counters): a rate over them gives the
device's busy fraction (device_s per second), the batch fill (rows / (rows + padding_rows)) and throughput.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

OUTCOMES = ("succeeded", "failed", "canceled", "requeued")  # how a job this worker held ended here


@dataclass
class WorkerCounters:
    batches: int = 0  # engine runs
    rows: int = 0  # images made for jobs
    padding_rows: int = 0  # rows run only to fill a fixed-size batch
    device_s: float = 0.0  # seconds the device spent on those batches (overlapping dispatches counted once)
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


@dataclass
class WorkerStatus:
    name: str
    model: str
    sizes: list[tuple[int, int]]
    batch_rows: int
    devices: int
    started_at: float
    at: float  # when this record was written
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    # the models this worker holds: {"name", "source", "bytes" (weights on the device), "weights_sha256"}
    models: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerStatus:
        data: dict[str, Any] = json.loads(raw)
        counters = data.pop("counters", {})
        data["sizes"] = [tuple(s) for s in data.get("sizes", [])]
        return cls(**data, counters=WorkerCounters(**counters))
