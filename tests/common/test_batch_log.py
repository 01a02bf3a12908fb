"""The batch log against a real Redis: newest first, capped, read back as written."""

from __future__ import annotations

import json

import pytest

from common.batch_log import BatchLog, BatchRecord
from common.keys import Keys


def record(i: int) -> BatchRecord:
    return BatchRecord(f"b{i}", "w1", 64, 96, [f"j{i}", f"k{i}"], rows=3, padding=1, device_s=0.5, at=100.0 + i)


@pytest.fixture
def log(store_redis, key_prefix) -> BatchLog:
    return BatchLog(store_redis, key_prefix, lines=3)


def test_records_read_back_newest_first_and_only_the_last_lines_are_kept(log):
    for i in range(5):
        log.append(record(i))
    assert log.recent() == [record(4), record(3), record(2)]
    assert log.recent(limit=1) == [record(4)]


def test_a_line_is_the_json_object_readers_of_the_log_expect(log, store_redis, key_prefix):
    log.append(record(1))
    (raw,) = store_redis.lrange(Keys(key_prefix).batches, 0, -1)
    assert json.loads(raw) == {
        "batch_id": "b1",
        "worker": "w1",
        "height": 64,
        "width": 96,
        "jobs": ["j1", "k1"],
        "rows": 3,
        "padding": 1,
        "device_s": 0.5,
        "at": 101.0,
    }
