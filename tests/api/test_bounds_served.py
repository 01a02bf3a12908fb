"""Issue 33's bounds as deployed: `uvicorn api.main:app` as its own process (no worker), its memory read from
/proc, event streams held open over real connections."""

from __future__ import annotations

import base64
import io
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.servers import ApiProcess, at_once, authorize, settings_from, standin_env

GOOD = {"prompt": "a cat in a hat", "width": 96, "height": 64}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def served(redis_url, tmp_path_factory):
    """(the API process, an authorized client): 3 event streams or waits per key."""
    folder = tmp_path_factory.mktemp("bounds-api")
    _, env = standin_env(redis_url, folder, "bd", SDXL_IMAGE_SIZES="1024x1024,96x64", SDXL_MAX_WAITS_PER_KEY="3")
    api = ApiProcess(env, folder / "api.log")
    api.start()
    try:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            authorize(client, settings_from(env))
            yield api, client
    finally:
        api.stop()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_sixteen_large_webp_submits_at_once_keep_the_api_small(served):
    """A ~40 KB WebP of 4096x4096 decodes to 64 MB, and more as it is converted and resized: 16 at once took the
    API to 4.1 GB (a k8s API pod has 1 GiB). Refused from the header now, and decodes are few at a time."""
    api, client = served
    before = peak_rss_bytes(api.proc.pid)
    answers = at_once_16(client, webp_b64(4096, 4096))
    peak = peak_rss_bytes(api.proc.pid)
    print(f"API peak RSS {peak / MB:.0f} MB (before the submits: {before / MB:.0f} MB)")
    assert peak <= 600 * MB, f"peak RSS {peak / MB:.0f} MB (before the submits: {before / MB:.0f} MB)"
    assert [a.status_code for a in answers] == [422] * 16, answers[0].text
    assert answers[0].json()["errors"][0]["field"] == "init_image"
    # at the cap (2048x2048, four times the 1024x1024 served) they are decoded, resized and stored, 4 at a time
    answers = at_once_16(client, webp_b64(2048, 2048))
    peak = peak_rss_bytes(api.proc.pid)
    print(f"API peak RSS {peak / MB:.0f} MB after 16 decodes at the cap")
    assert [a.status_code for a in answers] == [202] * 16, answers[0].text
    assert peak <= 600 * MB, f"peak RSS {peak / MB:.0f} MB"


def webp_b64(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="WEBP", quality=1)
    assert len(out.getvalue()) < 48 * 1024  # it fits the 64 KB body limit as base64
    return base64.b64encode(out.getvalue()).decode()


def at_once_16(client: httpx.Client, image: str) -> list[httpx.Response]:
    body = {**GOOD, "width": 1024, "height": 1024, "init_image": image}
    answers = at_once(16, lambda i: client.post("/v1/jobs", json={**body, "seed": i}))
    assert all(isinstance(a, httpx.Response) for a in answers), answers
    return answers  # type: ignore[return-value]


def test_event_streams_are_capped_per_key(served):
    """One key holding 1,500 event streams used a core and slowed other tenants' reads 9x: each key holds at
    most SDXL_MAX_WAITS_PER_KEY (3 here) streams and waits at once; the next is 429 with Retry-After."""
    _, client = served
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]  # stays queued: no worker
    with ExitStack() as streams:
        lines = []  # kept: an iterator dropped half-read closes its connection (httpcore), and the stream with it
        for _ in range(3):
            r = streams.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events"))
            assert r.status_code == 200
            lines.append(r.iter_lines())
            assert next(lines[-1]).startswith("retry:")  # the stream is open and sending
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as over:  # streamed: a 200 would never end
            assert over.status_code == 429
            assert int(over.headers["Retry-After"]) >= 1
        wait = client.get(f"/v1/jobs/{job_id}", params={"wait_s": 1})
        assert wait.status_code == 429  # waits count against the same cap
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # plain reads do not
    # closed streams give their slots back, once the server has seen the connections close
    deadline = time.monotonic() + 10
    while (code := client.get(f"/v1/jobs/{job_id}", params={"wait_s": 0.1}).status_code) == 429:
        assert time.monotonic() < deadline, "the closed streams' slots never came back"
        time.sleep(0.2)
    assert code == 200
