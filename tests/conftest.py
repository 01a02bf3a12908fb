"""Fixtures shared by the whole suite: the tiny model folder (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as PyTorch-layout safetensors, where worker subprocesses find it too."""
    from worker.engine import tiny

    folder = tmp_path_factory.getbasetemp() / "tiny"
    tiny.ensure(folder)
    os.environ["SDXL_TINY_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis-compatible server (embedded Valkey) owned by this test run, AOF on, noeviction."""
    from common import redis_server

    server = redis_server.start_embedded(tmp_path_factory.mktemp("valkey"))
    yield f"redis://127.0.0.1:{server.port}/0"
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key prefix per test: tests never see each other's records, and nothing is flushed (flushing
    would also drop Celery's queue bindings under a running worker)."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    from tests.servers import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()
