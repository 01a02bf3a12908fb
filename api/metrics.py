"""GET /metrics: the service's state in Prometheus' text format, read from Redis at each scrape.

Gauges for what is waiting and running (all tenants), and per live worker the counters of its heartbeat
(common/worker_status.py). Useful rates (PromQL):
    device busy fraction   rate(sdxl_worker_device_seconds_total[5m])
    batch fill             rate(sdxl_worker_rows_total[5m])
                           / (rate(sdxl_worker_rows_total[5m]) + rate(sdxl_worker_padding_rows_total[5m]))
    images per second      rate(sdxl_worker_rows_total[5m])
A worker's counters restart from 0 with the worker (Prometheus' rate() handles such resets). A scrape costs
Redis a SCAN of the heartbeat keys, one MGET and three counts.

During a Redis outage a scrape still answers 200: the process' own figures as ever, and the Redis figures of
the last scrape that could read them, marked stale by `sdxl_redis_up 0` and their age in
`sdxl_redis_figures_age_seconds` (an operator needs the page most exactly then).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from common import worker_status
from common.dataset_store import DatasetStore
from common.job_store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(**labels)} {value:g}" for labels, value in samples]
    return lines


@dataclass(frozen=True)
class RedisFigures:
    """What a scrape reads from Redis, kept per API process to serve (marked stale) while Redis is away."""

    queued: int
    running: int
    active_runs: int
    workers: list[worker_status.WorkerStatus]
    read_at: float  # time.time()


def read(store: JobStore, datasets: DatasetStore) -> RedisFigures:
    r = store.r
    workers = sorted(worker_status.live(r, store.prefix), key=lambda w: w.name)
    pipe = r.pipeline(transaction=False)
    pipe.zcard(store.key("queued"))
    pipe.zcard(store.key("running"))
    pipe.llen(datasets.active_key)
    queued, running, active_runs = pipe.execute()
    return RedisFigures(queued, running, active_runs, workers, time.time())


def render(figures: RedisFigures | None, waiting_requests: int = 0, redis_up: bool = True) -> str:
    """`waiting_requests`: this API process's requests waiting for a job to end (the one per-process gauge;
    Prometheus scrapes each API pod). `figures`: None when Redis has not answered since the process started."""
    lines: list[str] = []
    lines += _family("sdxl_api_waiting_requests", "gauge", "Requests this API process holds until a job ends.",
                     [({}, waiting_requests)])  # fmt: skip
    lines += _family("sdxl_redis_up", "gauge", "Whether this scrape could read Redis (0: the figures below are stale).",
                     [({}, int(redis_up))])  # fmt: skip
    if figures is None:
        return "\n".join(lines) + "\n"
    lines += _family("sdxl_redis_figures_age_seconds", "gauge", "Seconds since the Redis figures were read.",
                     [({}, round(time.time() - figures.read_at, 3))])  # fmt: skip
    queued, running, active_runs, workers = figures.queued, figures.running, figures.active_runs, figures.workers

    def per_worker(value: Callable[[worker_status.WorkerStatus], float]) -> list[tuple[dict[str, str], float]]:
        return [({"worker": w.name}, value(w)) for w in workers]

    lines += _family("sdxl_jobs_queued", "gauge", "Interactive jobs waiting to run (all tenants).", [({}, queued)])
    lines += _family("sdxl_jobs_running", "gauge", "Jobs on a worker now, data set lines included.", [({}, running)])
    lines += _family("sdxl_datasets_active", "gauge", "Data set runs being fed.", [({}, active_runs)])
    lines += _family("sdxl_workers", "gauge", "Workers whose heartbeat is live.", [({}, len(workers))])
    lines += _family("sdxl_worker_devices", "gauge", "Chips a worker drives.", per_worker(lambda w: w.devices))
    lines += _family("sdxl_worker_batch_rows", "gauge", "Rows in a worker's fixed-size device batch.",
                     per_worker(lambda w: w.batch_rows))  # fmt: skip
    lines += _family("sdxl_worker_start_time_seconds", "gauge", "When the worker started (Unix time).",
                     per_worker(lambda w: w.started_at))  # fmt: skip
    lines += _family("sdxl_worker_batches_total", "counter", "Engine runs.", per_worker(lambda w: w.counters.batches))
    lines += _family("sdxl_worker_rows_total", "counter", "Images made for jobs.",
                     per_worker(lambda w: w.counters.rows))  # fmt: skip
    lines += _family("sdxl_worker_padding_rows_total", "counter", "Rows run only to fill a batch.",
                     per_worker(lambda w: w.counters.padding_rows))  # fmt: skip
    lines += _family("sdxl_worker_device_seconds_total", "counter", "Seconds the device was busy with batches.",
                     per_worker(lambda w: w.counters.device_s))  # fmt: skip
    lines += _family(
        "sdxl_worker_jobs_total", "counter", "Jobs a worker ran, by how they ended there.",
        [({"worker": w.name, "outcome": k}, v) for w in workers for k, v in sorted(w.counters.jobs.items())],
    )  # fmt: skip
    return "\n".join(lines) + "\n"
