"""The batch log: one line per engine run (P:batches, newest first, the last 1,000; common/keys.py). Tests,
benchmarks and the chaos run read which jobs ran together, where, with how much padding and device time.

It is capped low because each line lists its job ids: with 32-row batches that is ~1.5 kB a line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis

from common.keys import Keys

LINES = 1000


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str  # in the logs of the batch and its jobs
    worker: str
    height: int
    width: int
    jobs: list[str]  # ids, in row order
    rows: int  # images made for jobs
    padding: int  # rows run only to fill the fixed-size batch
    device_s: float
    at: float  # time.time() when it was recorded

    @classmethod
    def from_json(cls, raw: bytes | str) -> BatchRecord:
        return cls(**json.loads(raw))


class BatchLog:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl", lines: int = LINES):
        self._r = client
        self.keys = Keys(prefix)
        self.lines = lines

    def append(self, record: BatchRecord) -> None:
        pipe = self._r.pipeline(transaction=True)  # MULTI: the push and the trim together
        pipe.lpush(self.keys.batches, json.dumps(asdict(record)))
        pipe.ltrim(self.keys.batches, 0, self.lines - 1)
        pipe.execute()

    def recent(self, limit: int | None = None) -> list[BatchRecord]:
        """The last `limit` batches (all that are kept: None), newest first."""
        end = -1 if limit is None else limit - 1
        return [BatchRecord.from_json(raw) for raw in self._r.lrange(self.keys.batches, 0, end)]
