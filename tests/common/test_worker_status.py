"""Worker heartbeat records: what the worker writes is what the API reads."""

from __future__ import annotations

from common.worker_status import WorkerCounters, WorkerStatus


def test_a_record_reads_back_as_written():
    counters = WorkerCounters(batches=2, rows=7, padding_rows=1, device_s=4.5)
    counters.jobs["succeeded"] = 7
    status = WorkerStatus("w1", "tiny", [(64, 96)], 4, 2, started_at=1.0, at=2.0, counters=counters)
    assert WorkerStatus.from_json(status.to_json()) == status
