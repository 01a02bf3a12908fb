"""Worker heartbeat records against a real Redis: what the worker writes is what the API reads."""

from __future__ import annotations

import time

import redis

from common import worker_status
from common.worker_status import WorkerCounters, WorkerStatus


def test_a_record_reads_back_and_only_live_readable_ones_are_listed(redis_url, key_prefix):
    r = redis.Redis.from_url(redis_url)
    counters = WorkerCounters(batches=2, rows=7, padding_rows=1, device_s=4.5)
    counters.jobs["succeeded"] = 7
    status = WorkerStatus("w1", "tiny", [(64, 96)], 4, 2, started_at=1.0, at=2.0, counters=counters)
    assert WorkerStatus.from_json(status.to_json()) == status
    r.set(worker_status.key(key_prefix, "w1"), status.to_json(), ex=60)
    r.set(worker_status.key(key_prefix, "broken"), b"{not json", ex=60)
    r.set(worker_status.key(key_prefix, "gone"), status.to_json(), px=1)  # a worker that stopped
    time.sleep(0.01)
    assert [w.name for w in worker_status.live(r, key_prefix)] == ["w1"]
    assert list(worker_status.live(r, f"{key_prefix}-nothing")) == []
