"""The data set CLI's answers to a refusal, against the real API app and Redis (no worker: nothing runs).
The whole CLI, with a worker, runs in tests/test_datasets.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from client.dataset import DatasetRunner, Refused
from common.settings import Settings
from tests.servers import authorize

OPTIONS = {"defaults": {"width": 64, "height": 64, "steps": 2}}


@pytest.fixture
def settings(redis_url, key_prefix, tmp_path) -> Settings:
    return Settings(
        redis_url=redis_url, key_prefix=key_prefix, queue_name=f"{key_prefix}-queue", sizes="64x64",
        local_storage_dir=str(tmp_path / "images"), url_signing_secret="s" * 32, max_active_datasets_per_tenant=1,
    )  # fmt: skip


def runner_on(app_client: TestClient, out) -> DatasetRunner:
    runner = DatasetRunner("http://testserver", None, out)
    runner.http = app_client  # the same httpx.Client interface, served in process
    return runner


# the CLI gives its upload a long timeout; starlette's in-process client warns that it cannot apply one
@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
def test_a_limit_or_a_bad_key_is_said_plainly(settings, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "a cat"}) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "b", "prompt": "a dog"}) + "\n")
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = "Bearer sdxl_nope_nope"
        with pytest.raises(Refused, match=r"^401: unknown or revoked API key"):
            runner_on(c, tmp_path / "out0").submit_or_resume(prompts, OPTIONS)
        authorize(c, settings)
        assert runner_on(c, tmp_path / "out1").submit_or_resume(prompts, OPTIONS)
        with pytest.raises(Refused) as refused:
            runner_on(c, tmp_path / "out2").submit_or_resume(other, OPTIONS)
        assert str(refused.value).startswith("429: this tenant already has 1 data set runs in progress")
        assert "retry in 60 s" in str(refused.value)
        assert not (tmp_path / "out2" / "run.json").exists()  # nothing to resume: the next try submits again
