"""The worker's own Prometheus metrics, served on SDXL_WORKER_METRICS_PORT (`/metrics`; 0: not served).

Histograms, by served size ("WIDTHxHEIGHT") and lane ("interactive" or "bulk"):
    sdxl_job_queue_wait_seconds      submit -> its batch started on this worker
    sdxl_job_latency_seconds         submit -> recorded as ended (label outcome: succeeded, failed, canceled)
    sdxl_batch_device_seconds        a batch's time on the device (size only: a batch mixes lanes)
    sdxl_image_upload_seconds        one image's encode and upload
The API's /metrics keeps the fleet-wide figures it reads from Redis (queue depth, per-worker counters from
the heartbeats); these are what only the worker sees. Useful queries: docs/observability.md.
"""

from __future__ import annotations

import logging

from prometheus_client import Histogram, disable_created_metrics, start_http_server

from common.jobs import Job

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: Prometheus does not need them, and they double the lines

# seconds: from a tiny model on a CPU (tens of ms) to a queue backed up for minutes
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
QUEUE_WAIT = Histogram(
    "sdxl_job_queue_wait_seconds",
    "From submit to the job's batch starting on a worker.",
    ["size", "lane"],
    buckets=LATENCY_BUCKETS_S,
)
LATENCY = Histogram(
    "sdxl_job_latency_seconds",
    "From submit to the job's end being recorded.",
    ["size", "lane", "outcome"],
    buckets=LATENCY_BUCKETS_S,
)
DEVICE = Histogram("sdxl_batch_device_seconds", "A batch's time on the device.", ["size"], buckets=LATENCY_BUCKETS_S)
UPLOAD = Histogram(
    "sdxl_image_upload_seconds",
    "One image's encoding and upload to storage.",
    ["size", "lane"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def size_label(height: int, width: int) -> str:
    return f"{width}x{height}"


def lane_label(lane: str) -> str:
    return lane or "interactive"


def job_labels(job: Job) -> tuple[str, str]:
    """A job's (size, lane) labels (a job reaches a worker with its size filled in by the API)."""
    return size_label(job.request.height or 0, job.request.width or 0), lane_label(job.lane)


def serve(port: int) -> bool:
    """Serve /metrics on `port` (all interfaces); False, with a warning, when the port is taken (a second
    worker on the host: give each its own SDXL_WORKER_METRICS_PORT)."""
    if not port:
        return False
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("worker metrics not served: port %d: %s (set SDXL_WORKER_METRICS_PORT)", port, exc)
        return False
    log.info("worker metrics on :%d/metrics", port)
    return True
