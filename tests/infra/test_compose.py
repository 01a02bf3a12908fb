"""The compose stack brought up for real, as README's "Run with Docker" does it on a machine with no container
registry in reach: scripts/docker-up.sh (Docker's daemon and Compose v2 when missing, the Debian-made base image,
every image built, `docker compose up --wait`), then jobs through the API, a signed download from the S3
stand-in, the scrapes, and a worker container SIGKILLed mid-job. Everything is torn down at the end, and a
daemon the script started is stopped. Minutes with a warm layer cache; `-m "not docker"` leaves it out."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# What README's "Run with Docker" sets and runs (test_readme_runs_what_this_test_runs holds them equal).
COMPOSE_FILE = "docker-compose.yml:docker-compose.no-registry.yml"
IMAGE_SIZES = "64x64"  # a CPU container on 2 cores: compiled in seconds, not minutes
UP = "scripts/docker-up.sh"
KEY_COMMAND = "docker compose exec -T api python -m api.keys create --tenant"
DOWN = "docker compose down --volumes"
STOP = "scripts/docker-setup.sh stop"
API = "http://127.0.0.1:8000"
S3 = "http://127.0.0.1:9000"
PROMETHEUS = "http://127.0.0.1:9090"
WORKER_METRICS = "http://127.0.0.1:9111/metrics"
# The fixed host ports the stack takes (docker-compose.no-registry.yml): busy ones would fail it half-way up.
HOST_PORTS = (6380, 9000, 9333, 9340, 8888, 8000, 9111, 5555, 9090)
SERVICES = {"redis", "s3", "s3-bucket", "api", "worker", "flower", "prometheus"}


def in_docker(test):
    """A test on the stack: marked `docker`; the first one's timeout covers building and bringing it up."""
    return pytest.mark.docker(pytest.mark.timeout(1800)(test))


@dataclass
class Stack:
    env: dict[str, str]
    api: httpx.Client
    timings_s: dict[str, float]

    def compose(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(["docker", "compose", *args], self.env, timeout_s)

    def containers(self) -> dict[str, dict]:
        """Service name -> `docker inspect` of its container."""
        ids = self.compose("ps", "--all", "--quiet").stdout.split()
        inspected = json.loads(_run(["docker", "inspect", *ids], self.env, 30).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40").stdout[-12000:]


def _run(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}"
    )
    return proc


def _busy(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate, timeout_s: float, every_s: float = 0.5, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s: {what}"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if os.geteuid() != 0 and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
        pytest.skip("installing and starting Docker needs root; or a Docker daemon this user may use")
    # another process's port (a worker of another test on its default metrics port) may be let go soon
    deadline = time.monotonic() + 120
    while (busy := [p for p in HOST_PORTS if _busy(p)]) and time.monotonic() < deadline:
        time.sleep(2)
    assert not busy, f"host ports {busy} are taken: a stack left up? (`{DOWN}` with COMPOSE_FILE={COMPOSE_FILE})"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}  # none of the tests' own settings
    env |= {
        "COMPOSE_FILE": COMPOSE_FILE,
        "SDXL_S3_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "SDXL_IMAGE_SIZES": IMAGE_SIZES,
    }
    timings_s: dict[str, float] = {}
    started = time.monotonic()
    up = subprocess.run([UP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    timings_s["up"] = time.monotonic() - started
    started_dockerd = "started dockerd" in up.stdout.splitlines()
    try:
        assert up.returncode == 0, f"{UP} exited {up.returncode}:\n{up.stdout[-6000:]}\n{up.stderr[-10000:]}"
        key = _run([*KEY_COMMAND.split(), "compose-test"], env, 60).stdout.split()[0]
        with httpx.Client(base_url=API, headers={"Authorization": f"Bearer {key}"}, timeout=90) as api:
            yield Stack(env, api, timings_s)
    finally:
        started = time.monotonic()
        down = subprocess.run(DOWN.split(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        timings_s["down"] = time.monotonic() - started
        if started_dockerd:
            subprocess.run(STOP.split(), cwd=ROOT, env=env, timeout=120, check=False)
        print(f"compose test timings (s): { {k: round(v, 1) for k, v in timings_s.items()} }")
        assert down.returncode == 0, down.stdout + down.stderr


@in_docker
def test_every_service_is_built_here_healthy_and_on_the_host_network(stack):
    containers = stack.containers()
    assert set(containers) == SERVICES, sorted(containers)  # grafana: no stand-in (its own profile)
    for name, c in containers.items():
        assert c["HostConfig"]["NetworkMode"] == "host", name
        if name == "s3-bucket":  # the one-shot that made the bucket
            assert (c["State"]["Status"], c["State"]["ExitCode"]) == ("exited", 0), c["State"]
        else:
            assert (c["State"]["Status"], c["State"]["Health"]["Status"]) == ("running", "healthy"), (name, c["State"])
    images = {name: c["Config"]["Image"] for name, c in containers.items()}
    assert images["api"] == "sdxl-api:latest" and images["worker"] == "sdxl-worker:latest", images
    assert all(i.startswith("sdxl-standin-") for n, i in images.items() if n not in ("api", "worker")), images


@in_docker
def test_a_job_end_to_end_with_its_signed_download_from_the_s3_stand_in(stack):
    body = {"prompt": "a fox in the snow", "width": 64, "height": 64, "steps": 4, "num_images": 2, "seed": 7}
    headers = {"Prefer": "wait=60", "Idempotency-Key": uuid.uuid4().hex}
    job = stack.api.post("/v1/jobs", json=body, headers=headers)
    assert job.status_code == 200, job.text  # ended within the wait
    job = job.json()
    assert job["status"] == "succeeded" and len(job["images"]) == 2, job
    for image in job["images"]:
        assert image["url"].startswith("http://localhost:9000/sdxl-images/"), image["url"]  # the public endpoint
        got = httpx.get(image["url"], timeout=30)  # no credentials: the signature is the permission
        assert got.status_code == 200, got.text
        assert hashlib.sha256(got.content).hexdigest() == image["sha256"]
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    forged = re.sub(r"X-Amz-Signature=[0-9a-f]+", "X-Amz-Signature=" + "0" * 64, job["images"][0]["url"])
    assert httpx.get(forged, timeout=30).status_code == 403  # the stand-in checks signatures

    again = stack.api.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["id"] == job["id"]
    refused = stack.api.post("/v1/jobs", json={**body, "width": 65})
    assert refused.status_code == 422 and {e["field"] for e in refused.json()["errors"]} == {"width"}, refused.text


@in_docker
def test_metrics_scrape_and_prometheus_loads_its_configuration(stack):
    api_metrics = stack.api.get("/metrics")
    assert api_metrics.status_code == 200 and "sdxl_workers 1.0" in api_metrics.text, api_metrics.text[-2000:]
    worker_metrics = httpx.get(WORKER_METRICS, timeout=10)
    assert worker_metrics.status_code == 200 and "sdxl_job_latency_seconds" in worker_metrics.text, worker_metrics.text

    config = httpx.get(f"{PROMETHEUS}/api/v1/status/config", timeout=10).json()["data"]["yaml"]
    assert "job_name: sdxl-api" in config and "job_name: sdxl-worker" in config, config

    def up() -> dict[str, str]:
        result = httpx.get(f"{PROMETHEUS}/api/v1/query", params={"query": "up"}, timeout=10).json()["data"]["result"]
        return {r["metric"]["job"]: r["value"][1] for r in result}

    try:
        _wait(lambda: up() == {"sdxl-api": "1", "sdxl-worker": "1"}, timeout_s=60, every_s=2)
    except AssertionError:
        targets = httpx.get(f"{PROMETHEUS}/api/v1/targets", timeout=10).json()
        raise AssertionError(f"Prometheus' up: {up()}; targets: {targets}") from None
    queued = httpx.get(f"{PROMETHEUS}/api/v1/query", params={"query": "sdxl_jobs_queued"}, timeout=10).json()
    assert queued["data"]["result"], queued  # a metric of the API's, scraped and stored


@in_docker
def test_a_worker_container_killed_mid_job_restarts_and_the_job_succeeds_once(stack):
    body = {"prompt": "a fox killed mid-job", "width": 64, "height": 64, "steps": 150, "num_images": 4}
    job_id = stack.api.post("/v1/jobs", json=body).json()["id"]

    def read() -> dict:
        return stack.api.get(f"/v1/jobs/{job_id}").json()

    _wait(lambda: read()["status"] == "running", timeout_s=60, every_s=0.2, what="the job running")
    time.sleep(1)  # into its steps
    worker = stack.containers()["worker"]
    assert read()["status"] == "running", read()
    # SIGKILL of the container's process from the host, as the kernel's OOM killer would: the restart policy
    # brings the container back (a `docker kill` counts as a deliberate stop, which it leaves stopped)
    os.kill(worker["State"]["Pid"], 9)
    killed = time.monotonic()

    def restarted() -> bool:
        c = stack.containers()["worker"]
        return c["RestartCount"] == worker["RestartCount"] + 1 and c["State"]["Status"] == "running"

    _wait(restarted, timeout_s=60, what="the worker container restarted")

    def ended() -> bool:
        return read()["status"] in ("succeeded", "failed", "canceled")

    try:
        _wait(ended, timeout_s=240, every_s=1, what="the killed job ending")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{read()}\n{stack.logs()}") from None
    stack.timings_s["kill to succeeded"] = time.monotonic() - killed
    job = read()
    assert job["status"] == "succeeded" and job["attempts"] == 2 and len(job["images"]) == 4, job
    time.sleep(3)  # a second run, were one left, would rewrite the record and its images

    def outcome(j: dict) -> tuple:  # the image URLs are signed afresh at each read
        return j["status"], j["attempts"], j["finished_at"], [i["sha256"] for i in j["images"]]

    assert outcome(read()) == outcome(job)
    keys = [
        o["Key"]
        for page in _s3_for(stack).get_paginator("list_objects_v2").paginate(Bucket="sdxl-images", Prefix="images/")
        for o in page.get("Contents", [])
        if f"/{job_id}/" in o["Key"]
    ]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["0.png", "1.png", "2.png", "3.png"], keys


def _s3_for(stack: Stack):
    return boto3.client(
        "s3",
        endpoint_url=S3,
        region_name="us-east-1",
        aws_access_key_id="sdxl",
        aws_secret_access_key=stack.env["SDXL_S3_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def test_readme_runs_what_this_test_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run with Docker") :]
    section = section[: section.index("\n## ", 1)]
    for line in (f"export COMPOSE_FILE={COMPOSE_FILE}", f"SDXL_IMAGE_SIZES={IMAGE_SIZES}", UP, KEY_COMMAND, DOWN, STOP):
        assert line in section, line
