"""GET /metrics: the API's own metrics and the service's state read from Redis, in Prometheus' text format,
all through prometheus_client.

Two kinds of figures:
- **This process' own**, kept by prometheus_client: request latency (`sdxl_http_request_duration_seconds` by
  method, route template and status), interactive jobs accepted (`sdxl_api_jobs_submitted_total` by size) and the
  requests held until a job ends (`sdxl_api_waiting_requests`). With several uvicorn workers, set
  PROMETHEUS_MULTIPROC_DIR to an empty folder shared by them (emptied before each start): every process writes
  its figures there and any one answering a scrape sums them all (prometheus_client's multiprocess mode).
- **Fleet-wide, read from Redis at each scrape** by a custom collector: what is queued and running (all
  tenants), active data set runs, and per live worker the counters of its heartbeat (common/worker_status.py).
  A scrape costs Redis a SCAN of the heartbeat keys, one MGET and three counts.

The histograms of what only a worker sees (queue wait, device time per batch, end-to-end latency, upload
time) are on each worker's own port: worker/metrics.py. Useful PromQL: docs/observability.md.

During a Redis outage a scrape still answers 200: the process' own figures as ever, and the Redis figures of
the last scrape that could read them, marked stale by `sdxl_redis_up 0` and their age in
`sdxl_redis_figures_age_seconds` (an operator needs the page most exactly then).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.dataset_store import DatasetStore
from common.job_store import JobStore
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerStatus

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
disable_created_metrics()  # no *_created series: Prometheus does not need them, and they double the lines

# This process' metrics live in their own registry, not prometheus_client's global one: a test process builds
# many apps, and the scrape assembles its page from this registry (or the multiprocess folder) plus Redis.
OWN = CollectorRegistry(auto_describe=True)
# seconds: a plain read takes milliseconds; `Prefer: wait` and event streams hold a request for up to minutes
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REQUESTS = Histogram(
    "sdxl_http_request_duration_seconds",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
    buckets=REQUEST_BUCKETS_S,
    registry=OWN,
)
SUBMITTED = Counter(
    "sdxl_api_jobs_submitted_total",
    "Interactive jobs accepted (not idempotent replays), by size (WIDTHxHEIGHT).",
    ["size"],
    registry=OWN,
)
WAITING = Gauge(
    "sdxl_api_waiting_requests",
    "Requests the API holds until a job ends (summed over its processes).",
    registry=OWN,
    multiprocess_mode="livesum",
)


@dataclass(frozen=True)
class RedisFigures:
    """What a scrape reads from Redis, kept per API process to serve (marked stale) while Redis is away."""

    queued: int
    running: int
    active_runs: int
    workers: list[WorkerStatus]
    read_at: float  # time.time()


def read(store: JobStore, datasets: DatasetStore, registry: WorkerRegistry) -> RedisFigures:
    workers = sorted(registry.live(), key=lambda w: w.name)
    queued, running, active_runs = store.queued_count(), store.running_count(), datasets.active_runs_count()
    return RedisFigures(queued, running, active_runs, workers, time.time())


class FleetCollector(Collector):
    """The Redis figures as metric families, built at each scrape from the figures that scrape holds."""

    def __init__(self, figures: RedisFigures | None, redis_up: bool):
        self.figures = figures
        self.redis_up = redis_up

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sdxl_redis_up", "Whether this scrape read Redis (0: the figures below are stale).", int(self.redis_up)
        )
        f = self.figures
        if f is None:  # Redis has not answered since this process started
            return
        yield GaugeMetricFamily(
            "sdxl_redis_figures_age_seconds",
            "Seconds since the Redis figures were read.",
            value=round(time.time() - f.read_at, 3),
        )
        yield GaugeMetricFamily("sdxl_jobs_queued", "Interactive jobs waiting to run (all tenants).", value=f.queued)
        yield GaugeMetricFamily("sdxl_jobs_running", "Jobs on a worker now, data set lines included.", value=f.running)
        yield GaugeMetricFamily("sdxl_datasets_active", "Data set runs being fed.", value=f.active_runs)
        yield GaugeMetricFamily("sdxl_workers", "Workers whose heartbeat is live.", value=len(f.workers))

        def per_worker(family: Metric, value: Callable[[WorkerStatus], float]) -> Metric:
            for w in f.workers:
                family.add_metric([w.name], value(w))  # type: ignore[attr-defined]
            return family

        yield per_worker(
            GaugeMetricFamily("sdxl_worker_devices", "Chips a worker drives.", labels=["worker"]), lambda w: w.devices
        )
        yield per_worker(
            GaugeMetricFamily(
                "sdxl_worker_batch_rows", "Rows in a worker's fixed-size device batch.", labels=["worker"]
            ),
            lambda w: w.batch_rows,
        )
        yield per_worker(
            GaugeMetricFamily(
                "sdxl_worker_start_time_seconds", "When the worker started (Unix time).", labels=["worker"]
            ),
            lambda w: w.started_at,
        )
        yield per_worker(
            CounterMetricFamily("sdxl_worker_batches", "Engine runs.", labels=["worker"]), lambda w: w.counters.batches
        )
        yield per_worker(
            CounterMetricFamily("sdxl_worker_rows", "Images made for jobs.", labels=["worker"]),
            lambda w: w.counters.rows,
        )
        yield per_worker(
            CounterMetricFamily("sdxl_worker_padding_rows", "Rows run only to fill a batch.", labels=["worker"]),
            lambda w: w.counters.padding_rows,
        )
        yield per_worker(
            CounterMetricFamily(
                "sdxl_worker_device_seconds", "Seconds the device was busy with batches.", labels=["worker"]
            ),
            lambda w: w.counters.device_s,
        )
        jobs = CounterMetricFamily(
            "sdxl_worker_jobs", "Jobs a worker ran, by how they ended there.", labels=["worker", "outcome"]
        )
        for w in f.workers:
            for outcome, n in sorted(w.counters.jobs.items()):
                jobs.add_metric([w.name, outcome], n)
        yield jobs


class _Own(Collector):
    """This process' registry, or with PROMETHEUS_MULTIPROC_DIR set, every API process' figures summed."""

    def collect(self) -> Iterator[Metric]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            yield from registry.collect()
        else:
            yield from OWN.collect()


def render(figures: RedisFigures | None, redis_up: bool = True) -> bytes:
    """The page: this process' (or all processes') own metrics, then the Redis figures. `figures`: None when
    Redis has not answered since the process started."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Own())
    registry.register(FleetCollector(figures, redis_up))
    return generate_latest(registry)


class RequestTimer:
    """ASGI middleware: each HTTP request's duration into sdxl_http_request_duration_seconds, labelled by the
    route's template (`/v1/jobs/{job_id}`, not the id: one series per route, not per job)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception with nothing sent

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the router sets it in this scope
            REQUESTS.labels(scope["method"], route, str(status)).observe(time.perf_counter() - started)
