"""Previews through the stack's event path: a `preview: true` job's event stream carries WebP previews before
its image. The worker runs the stand-in engine (this test is about the path: finisher -> job store -> P:progress
-> the API's event stream -> the Python client; the stand-in draws its pictures, noisier the earlier, not a
model's estimate); the real engine's previews are seen by tests/client/test_api.py and tests/api/test_playground.py
on live_stack."""

from __future__ import annotations

import io
import signal

import pytest
from PIL import Image

from client import Client
from tests.helpers.servers import ApiProcess, WorkerProcess, authorize, settings_from, standin_env


@pytest.fixture
def stack(redis_url, tmp_path):
    import httpx

    prefix, env = standin_env(redis_url, tmp_path, "pv", SDXL_STANDIN_BATCH_S="3", SDXL_BATCH_TIMEOUT_S="0.2")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start(redis_url, prefix, timeout_s=120)
    api = ApiProcess(env, tmp_path / "api.log")
    api.start()
    with httpx.Client(base_url=api.url) as http:
        key = authorize(http, settings_from(env))
    try:
        with Client(api.url, key, patience_s=30) as sdxl:
            yield sdxl
    finally:
        api.stop()
        worker.stop(signal.SIGKILL)


def test_preview_events_arrive_before_the_final_image_and_only_for_jobs_that_asked(stack):
    asked = stack.submit("a kite", width=64, height=64, steps=20, preview=True)
    plain = stack.submit("a kite", width=64, height=64, steps=20)  # the same batch, without previews
    events = list(stack.events(asked.id))
    assert [e.name for e in events][-1] == "succeeded" and events[-1].data["images"]
    shown = [i for i, e in enumerate(events) if e.preview]
    assert shown and max(shown) < len(events) - 1, [e.data for e in events]  # before the image
    steps = [events[i].data["progress"]["step"] for i in shown]
    assert steps == sorted(set(steps)) and all(5 <= s < 20 for s in steps), steps
    with Image.open(io.BytesIO(events[shown[0]].preview_bytes)) as im:
        assert im.format == "WEBP" and im.size == (8, 8)  # a 64 px image's latents
    assert "preview" not in (stack.get(asked.id).progress or {})  # the ended job keeps its image, not a preview
    assert not any(e.preview for e in stack.events(plain.id))
