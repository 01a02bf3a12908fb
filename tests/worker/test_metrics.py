"""The worker's Prometheus histograms (worker/metrics.py) scraped from a real `python -m worker` on its own port,
and the JSON logs of the API and that worker carrying one job's id across both processes (the `live_stack`)."""

from __future__ import annotations

import json

import httpx

from client import Client
from tests.helpers.metrics import samples, series
from tests.helpers.servers import live_stack_folder


def json_lines(path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_histograms_by_size_and_lane_and_one_job_id_through_both_logs(live_stack, tmp_path_factory):
    url, key, settings = live_stack
    worker_metrics = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"

    before = samples(httpx.get(worker_metrics).text)
    with Client(url, key, patience_s=30) as sdxl:
        job = sdxl.generate("a lighthouse at dusk", width=96, height=64, num_images=2, steps=3)
    assert job.status == "succeeded"
    after = samples(httpx.get(worker_metrics).text)

    def grew(name: str, **labels: str) -> float:
        return after.get(series(name, **labels), 0.0) - before.get(series(name, **labels), 0.0)

    interactive = {"size": "96x64", "lane": "interactive"}
    assert grew("sdxl_job_queue_wait_seconds_count", **interactive) == 1
    assert grew("sdxl_job_latency_seconds_count", **interactive, outcome="succeeded") == 1
    assert grew("sdxl_image_upload_seconds_count", **interactive) == 2  # one per image
    assert grew("sdxl_batch_device_seconds_count", size="96x64") >= 1
    assert grew("sdxl_batch_device_seconds_sum", size="96x64") > 0
    assert after[series("sdxl_job_latency_seconds_bucket", **interactive, outcome="succeeded", le="+Inf")] >= 1

    folder = live_stack_folder(tmp_path_factory)
    api_lines = [line for line in json_lines(folder / "api.log") if line.get("job_id") == job.id]
    assert [line["message"] for line in api_lines] == ["job submitted"]
    worker_lines = [line for line in json_lines(folder / "worker.log") if line.get("job_id") == job.id]
    assert worker_lines and all({"time", "level", "logger", "message"} <= set(line) for line in worker_lines)
    ended = [line for line in worker_lines if line["message"].startswith("job succeeded")]
    assert len(ended) == 1 and ended[0]["batch_id"]
    batch_id = ended[0]["batch_id"]  # the batch that ran it logged its start with the job's id among its jobs
    started = [line for line in json_lines(folder / "worker.log") if line.get("batch_id") == batch_id]
    assert any(job.id in line["message"] for line in started)
