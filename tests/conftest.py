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
def tiny_refiner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny refiner (the second text encoder alone, 5 time ids), served beside the tiny model by live_stack."""
    from worker.engine import tiny

    folder = tmp_path_factory.getbasetemp() / "tiny-refiner"
    tiny.ensure(folder, preset="tiny-refiner")
    return folder


@pytest.fixture(scope="session")
def live_loras(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA adapters for the tiny model, served by live_stack (SDXL_LORA_DIR): kohya's layout with alphas on the
    UNet and both text encoders, diffusers/PEFT's on the UNet and the second, and a small kohya one."""
    from tests.worker.engine import variants

    folder = tmp_path_factory.mktemp("live-loras")
    variants.write_lora(tiny_dir, folder / "pixel-art.safetensors", "kohya", 4, 11, alpha=2.0)
    variants.write_lora(
        tiny_dir, folder / "watercolor.safetensors", "diffusers", 8, 12, parts=("unet", "text_encoder_2")
    )
    variants.write_lora(tiny_dir, folder / "ink.safetensors", "kohya", 2, 13, alpha=1.0)
    return folder


@pytest.fixture(scope="session")
def live_unet(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UNet-only weights file for the tiny model (as SDXL-Lightning ships its UNet): live_stack's second model
    is the tiny model with it (SDXL_MODELS `lightning=tiny;unet=...`)."""
    from tests.worker.engine import variants

    return variants.write_unet(tiny_dir, tmp_path_factory.mktemp("live-unet") / "unet.safetensors")


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


@pytest.fixture(scope="session")
def live_stack(
    redis_url: str,
    tiny_dir: Path,
    tiny_refiner_dir: Path,
    live_loras: Path,
    live_unet: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    """The service as a user reaches it, over HTTP: `uvicorn api.main:app` and `python -m worker` running the
    tiny JAX engine on this CPU (two models: `tiny`, the default, and `lightning`, the tiny model with another
    UNet; LoRA adapters from live_loras), local-folder storage, a real Redis. Shared by the client, OpenAI, event
    stream, browser and observability tests (one worker start for all of them). Yields (API url, API key,
    settings); both processes log JSON into `live_stack_folder` (api.log, worker.log), and the worker serves its
    metrics on settings.worker_metrics_port."""
    import uuid

    import redis

    from common.api_keys import ApiKeyStore
    from tests.servers import ApiProcess, WorkerProcess, free_port, settings_from

    prefix = f"live{uuid.uuid4().hex[:8]}"
    folder = live_stack_folder(tmp_path_factory)
    folder.mkdir()
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_BULK_QUEUE_NAME": f"{prefix}-bulk",
        "SDXL_TINY_DIR": str(tiny_dir),
        "SDXL_MODELS": f"tiny=tiny,lightning=tiny;unet={live_unet}",
        "SDXL_LORA_DIR": str(live_loras),
        "SDXL_LORA_MAX_RANK": "8",
        "SDXL_REFINER": str(tiny_refiner_dir),
        "SDXL_DTYPE": "float32",
        "SDXL_IMAGE_SIZES": "64x64,96x64",
        "SDXL_BATCH_ROWS": "4",
        "SDXL_BATCH_TIMEOUT_S": "1",
        "SDXL_LOCAL_STORAGE_DIR": str(folder / "images"),
        "SDXL_URL_SIGNING_SECRET": "l" * 32,
        "SDXL_COMPILE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "xla-cache"),
        "SDXL_LOG_FORMAT": "json",
        "SDXL_WORKER_METRICS_PORT": str(free_port()),
    }
    api = ApiProcess(env, folder / "api.log")
    env["SDXL_PUBLIC_BASE_URL"] = api.url
    worker = WorkerProcess(env, folder / "worker.log")
    worker.start(redis_url, prefix)
    api.start()
    settings = settings_from(env)
    _, key = ApiKeyStore(redis.Redis.from_url(redis_url), prefix).create("live", "tests")
    try:
        yield api.url, key, settings
    finally:
        api.stop()
        worker.stop()


def live_stack_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `live_stack` keeps its logs and images."""
    return tmp_path_factory.getbasetemp() / "live-stack"
