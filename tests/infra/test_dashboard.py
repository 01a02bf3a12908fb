"""The Grafana dashboard and Prometheus configuration (infra/grafana, infra/prometheus) against the metrics the
code exports: every query parses as PromQL, names a series the API or a worker really serves, and groups by
labels those series carry; the files Compose mounts exist and point at each other."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest

from api import metrics as api_metrics
from common.worker_status import WorkerCounters, WorkerStatus
from tests.helpers.metrics import samples

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "sdxl.json"


def exported() -> dict[str, set[str]]:
    """{series name: its label names} of every series the API's /metrics and a worker's /metrics serve, with
    one observation in each labelled family so that its series appear."""
    from worker import metrics as worker_metrics

    worker_metrics.QUEUE_WAIT.labels("64x64", "interactive").observe(1)
    worker_metrics.LATENCY.labels("64x64", "interactive", "succeeded").observe(1)
    worker_metrics.DEVICE.labels("64x64").observe(1)
    worker_metrics.UPLOAD.labels("64x64", "bulk").observe(0.1)
    api_metrics.REQUESTS.labels("GET", "/v1/jobs/{job_id}", "200").observe(0.01)
    api_metrics.SUBMITTED.labels("64x64").inc()
    counters = WorkerCounters(batches=1, rows=4, padding_rows=0, device_s=1.0, jobs={"succeeded": 4})
    worker = WorkerStatus("w", "tiny", [(64, 64)], 4, 1, started_at=1.0, at=2.0, counters=counters)
    api_page = api_metrics.render(api_metrics.RedisFigures(0, 0, 0, [worker], time.time())).decode()
    pages = api_page + generate_latest().decode()  # the worker serves prometheus_client's global registry
    names: dict[str, set[str]] = {}
    for series in samples(pages):
        name, _, labels = series.partition("{")
        names.setdefault(name, set()).update(re.findall(r'([a-z_]+)="', labels))
    return names


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    return exported()


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[title for title, _ in queries()])
def test_each_query_parses_and_reads_served_series_by_their_labels(title, expr, series):
    promql_parser.parse(expr.replace("$__rate_interval", "5m"))  # Grafana fills the variable in
    names = set(re.findall(r"\bsdxl_[a-z_]+\b", expr))
    assert names, expr
    for name in names:
        assert name in series, f"{title}: {name} is not served (served: {sorted(series)})"
    carried = set().union(*(series[name] for name in names))
    grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    matched = set(re.findall(r"\{([a-z_]+)[!=~]", expr))
    assert grouped | matched <= carried, f"{title}: labels {sorted((grouped | matched) - carried)} not on {names}"


def test_every_served_family_the_issue_names_is_on_the_board():
    text = DASHBOARD.read_text()
    for family in (
        "sdxl_job_queue_wait_seconds",
        "sdxl_job_latency_seconds",
        "sdxl_batch_device_seconds",
        "sdxl_image_upload_seconds",
        "sdxl_http_request_duration_seconds",
        "sdxl_jobs_queued",
        "sdxl_redis_up",
        "sdxl_worker_device_seconds_total",
    ):
        assert family in text, family


def test_compose_mounts_and_provisioning_fit_together():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    datasource = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {uid}
    provider = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/sdxl.yml").read_text())
    grafana_mounts = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in grafana_mounts
    prometheus = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["sdxl-api"]["static_configs"][0]["targets"] == ["api:8000"]
    from common.settings import Settings

    assert jobs["sdxl-worker"]["dns_sd_configs"][0]["port"] == Settings.model_fields["worker_metrics_port"].default
