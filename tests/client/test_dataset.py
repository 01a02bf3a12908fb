"""The data set CLI's answers to a refusal, against the real API app and Redis (no worker: nothing runs).
The whole CLI, with a worker, runs in tests/test_datasets.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from client.dataset import DatasetRunner, Refused, Unreachable
from common import redis_server
from common.settings import Settings
from tests.helpers.servers import authorize, free_port

# the CLI gives its requests timeouts; starlette's in-process client warns that it cannot apply them
pytestmark = pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
OPTIONS = {"defaults": {"width": 64, "height": 64, "steps": 2}}


@pytest.fixture
def settings(redis_url, key_prefix, tmp_path) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        queue_name=f"{key_prefix}-queue",
        image_sizes="64x64",
        local_storage_dir=str(tmp_path / "images"),
        url_signing_secret="s" * 32,
        max_active_datasets_per_tenant=1,
    )


def runner_on(app_client: TestClient, out) -> DatasetRunner:
    runner = DatasetRunner("http://testserver", None, out)
    runner.api.http = app_client  # the same httpx.Client interface, served in process
    return runner


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


def test_a_service_outage_during_a_run_is_waited_out(tmp_path, capsys):
    # A real restart: the API's own Valkey stops (the API answers 503 + Retry-After) and comes back on the
    # same port and data; the CLI's status poll waits it out. With too little patience it gives up, exit 3.
    port, data = free_port(), tmp_path / "valkey"
    server = redis_server.start_embedded(data, port)
    prefix = f"cli{port}"
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{port}/0",
        key_prefix=prefix,
        queue_name=f"{prefix}-q",
        image_sizes="64x64",
        local_storage_dir=str(tmp_path / "images"),
        url_signing_secret="s" * 32,
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "a cat"}) + "\n")
    try:
        with TestClient(create_app(settings)) as c:
            authorize(c, settings)
            runner = runner_on(c, tmp_path / "out")
            runner.poll_s = 0.2
            run_id = runner.submit_or_resume(prompts, OPTIONS)
            server.stop()
            runner.patience_s = 1  # the API asks for 5 s: more than that
            with pytest.raises(Unreachable, match="no answer for 1 s"):
                runner.status(run_id)
            runner.patience_s = 60
            restarted: list = []
            restart = threading.Timer(2.0, lambda: restarted.append(redis_server.start_embedded(data, port)))
            restart.start()
            t0 = time.monotonic()
            st = runner.status(run_id)  # waits while Redis is away, then answers
            restart.join()
            server = restarted[0]
            assert st["id"] == run_id and st["status"] == "running" and time.monotonic() - t0 >= 2
            said = capsys.readouterr().err
            assert f"GET /v1/datasets/{run_id}: 503; trying again in 5 s" in said
    finally:
        server.stop()


def test_exit_statuses_of_commands_that_cannot_reach_the_service_or_are_used_wrongly(tmp_path, capsys):
    from client.dataset import main

    gone = ["--api", "http://127.0.0.1:9", "--patience-s", "0.2"]  # nothing listens on the discard port
    assert main(["status", "some-run", *gone]) == 3
    assert "no answer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["frobnicate"])  # taken as `run frobnicate`, which needs --out
    assert usage.value.code == 2
    assert main(["run", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o"), *gone]) == 2
    assert capsys.readouterr().err.strip().endswith("absent.jsonl: no such file")
