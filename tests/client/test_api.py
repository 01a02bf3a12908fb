"""The Python client (client/api.py) against the real stack over HTTP: uvicorn, a `python -m worker` on the
tiny model, Redis (the `live_stack` fixture)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from client import ApiError, AsyncClient, Client, Unreachable

# the client gives its requests timeouts; starlette's in-process client (one test) warns that it cannot apply them
pytestmark = pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")


@pytest.fixture
def sdxl(live_stack):
    url, key, _ = live_stack
    with Client(url, key, patience_s=30) as c:
        yield c


def test_generate_download_list(sdxl):
    job = sdxl.generate("a lighthouse", width=96, height=64, num_images=2, seed=11, steps=3)
    assert job.status == "succeeded" and [i.seed for i in job.images] == [11, 12]
    for image in job.images:
        with Image.open(io.BytesIO(sdxl.download(image))) as im:
            assert im.size == (96, 64)
    assert job.id in [j.id for j in sdxl.jobs(limit=50)]
    assert sdxl.get(job.id).progress == {"step": 3, "steps": 3}  # the last report stays with the ended job


def test_submit_then_wait_holds_one_request_until_the_end(sdxl):
    job = sdxl.submit("a red bicycle", width=64, height=64, steps=4)
    assert job.status == "queued"
    ended = sdxl.wait(job.id, timeout_s=120)
    assert ended.status == "succeeded" and len(ended.images) == 1


def test_the_event_stream_goes_queued_running_step_by_step_succeeded(sdxl):
    job = sdxl.submit("a slow boat", width=64, height=64, steps=150, seed=3)
    events = list(sdxl.events(job.id))
    names = [e.name for e in events]
    assert names[0] == "queued" and events[0].data["queue_position"] >= 1, names
    assert names[-1] == "succeeded" and events[-1].data["images"], names
    running = [e.data["progress"] for e in events if e.name == "running"]
    steps = [p["step"] for p in running if p]
    assert len(steps) >= 2 and steps == sorted(set(steps)), running  # more than one report, each further on
    assert all(p["steps"] == 150 for p in running if p)
    assert names == ["queued"] * names.count("queued") + ["running"] * len(running) + ["succeeded"]


def test_a_job_with_preview_streams_small_webp_previews_before_its_image(sdxl):
    job = sdxl.submit("a slow boat", width=96, height=64, steps=150, seed=4, preview=True)
    events = list(sdxl.events(job.id))
    assert events[-1].name == "succeeded" and events[-1].data["progress"] == {"step": 150, "steps": 150}
    previews = [(e.data["progress"]["step"], e.preview_bytes) for e in events if e.preview]
    assert previews, [e.data for e in events]  # at least one, and all of them before the image
    for step, webp in previews:
        assert 5 <= step < 150
        with Image.open(io.BytesIO(webp)) as im:
            assert im.format == "WEBP" and im.size == (12, 8)  # the latents' size: 96x64 / 8
    plain = sdxl.submit("a slow boat", width=64, height=64, steps=20, seed=4)
    assert not any(e.preview for e in sdxl.events(plain.id))  # only for jobs that asked


def test_a_canceled_job_ends_its_stream_canceled(sdxl):
    job = sdxl.submit("never mind", width=64, height=64, steps=150)
    assert sdxl.cancel(job.id)["status"] == "canceled"
    assert [e.name for e in sdxl.events(job.id)] == ["canceled"]


def test_errors_carry_the_problem_details(live_stack, sdxl):
    with pytest.raises(ApiError) as refused:
        sdxl.submit("a cat", width=65, height=64)
    assert refused.value.status == 422 and refused.value.problem["errors"][0]["field"] == "width"
    assert "65x64 is not served" in refused.value.detail
    url, _, _ = live_stack
    with Client(url, "sdxl_not_a_key") as stranger, pytest.raises(ApiError) as unknown:
        stranger.jobs()
    assert unknown.value.status == 401 and unknown.value.problem["type"] == "urn:sdxl:problem:unauthorized"
    with pytest.raises(ApiError) as missing:
        sdxl.get("0" * 32)
    assert missing.value.status == 404


def test_a_rate_limit_is_waited_out_within_the_patience_then_reported(live_stack, tmp_path):
    # The API's own rate limit, as a real 429 with Retry-After: a client with 1 s of patience gives up at once
    # (the server asks for more than that) and says why; with patience it would sleep Retry-After seconds.
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    _, _, settings = live_stack
    strict = settings.model_copy(update={"rate_limit_per_min": 1, "local_storage_dir": str(tmp_path)})
    heard: list = []
    with TestClient(create_app(strict)) as http:
        authorize(http, strict)
        c = Client(http=http, patience_s=1, on_retry=lambda *a: heard.append(a))
        c.submit("one", width=64, height=64, steps=1)
        with pytest.raises(Unreachable, match=r"POST /v1/jobs: no answer for 1 s \(last: 429\)"):
            c.submit("two", width=64, height=64, steps=1)
        assert heard == []  # Retry-After was beyond the patience: no pointless wait first


def test_the_async_client(live_stack):
    url, key, _ = live_stack

    async def scenario() -> tuple:
        async with AsyncClient(url, key, patience_s=30) as sdxl:
            job = await sdxl.submit("an async fox", width=64, height=64, steps=60)
            names = [e.name async for e in sdxl.events(job.id)]
            done = await sdxl.generate("another fox", width=64, height=64, steps=2, seed=5)
            png = await sdxl.download(done.images[0])
            listed = [j.id for j in await sdxl.jobs(limit=50)]
            return job, names, done, png, listed

    job, names, done, png, listed = asyncio.run(scenario())
    assert names[0] == "queued" and names[-1] == "succeeded" and "running" in names
    assert done.status == "succeeded" and done.images[0].seed == 5
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (64, 64)
    assert {job.id, done.id} <= set(listed)
