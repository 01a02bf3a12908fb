"""LoRA adapters and several models through the whole service (live_stack: uvicorn, the worker serving the tiny
model `tiny` and `lightning` (the tiny model with another UNet) with the adapters of live_loras, Redis, local
storage): jobs with different adapters share a batch and each image is the one the engine gives for its row
alone; jobs for the two models interleave, run in batches of their own model, and each image is its model's;
the PNG and the job's images record the model, its weights hash and the adapters with their hashes."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
import redis
from PIL import Image

from client.api import ApiError, Client
from common.batch_log import BatchLog, BatchRecord
from worker import images
from worker.engine import model
from worker.engine.engine import Adapters, Engine, Row


@pytest.fixture(scope="module")
def engines(tiny_dir, live_loras, live_unet):
    """The worker's two models, as it builds them (float32, 4 rows), with the same adapters."""
    adapters = Adapters(lambda name: live_loras / f"{name}.safetensors", rank=8, slots=4, per_row=2)
    tiny = model.load_folder(tiny_dir, model.LoadOptions(np.float32), name="tiny")
    lightning = model.load_folder(tiny_dir, model.LoadOptions(np.float32, unet=live_unet), name="lightning")
    made = {
        "tiny": Engine(tiny, [(64, 96)], batch_rows=4, adapters=adapters),
        "lightning": Engine(lightning, [(64, 96)], batch_rows=4, adapters=adapters),
    }
    for m in (tiny, lightning):
        m.digest_weights()
    return made


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


def _batches(settings, job_ids: list[str]) -> list[BatchRecord]:
    """The worker's batch records holding these jobs, once every job is in one."""
    log = BatchLog(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    deadline = time.monotonic() + 10
    while True:
        mine = [b for b in log.recent() if set(b.jobs) & set(job_ids)]
        if {j for b in mine for j in b.jobs} >= set(job_ids) or time.monotonic() > deadline:
            return mine
        time.sleep(0.2)


def test_jobs_with_different_adapters_share_a_batch_each_with_its_own_image(live_stack, engines, live_loras):
    url, key, settings = live_stack
    asked = {
        "pixel": [("pixel-art", 1.0)],
        "two": [("watercolor", 0.5), ("ink", 0.8)],
        "none": [],
        "pixel-half": [("pixel-art", 0.5)],
    }
    with Client(url, key) as client:
        listed = {a["name"]: a for a in client.loras()["loras"]}
        assert sorted(listed) == ["ink", "pixel-art", "watercolor"]
        jobs = {
            name: client.submit(
                f"a lighthouse, {name}",
                seed=3,
                steps=4,
                width=96,
                height=64,
                loras=[{"name": n, "scale": s} for n, s in chosen],
            )
            for name, chosen in asked.items()
        }
        done = {name: client.wait(job.id, timeout_s=300) for name, job in jobs.items()}
        for name, job in done.items():
            assert job.status == "succeeded", (name, job.error)
            data = client.download(job.images[0])
            row = Row(f"a lighthouse, {name}", seed=3, steps=4, loras=tuple(asked[name]))
            want = engines["tiny"].generate([row], 64, 96).images[0].astype(int)
            assert np.abs(_pixels(data) - want).max() <= 1, name
            params = images.read_parameters(data)
            want_loras = [
                {
                    "name": n,
                    "scale": s,
                    "sha256": hashlib.sha256((live_loras / f"{n}.safetensors").read_bytes()).hexdigest(),
                }
                for n, s in asked[name]
            ]
            assert params.get("loras", []) == want_loras, name
            assert list(job.images[0].loras) == want_loras and job.images[0].model_hash == params["model_hash"]
            assert all(lr["sha256"] == listed[lr["name"]]["sha256"] for lr in want_loras)
            assert params["model"] == "tiny" and "model_name" not in params
        # a job with adapters and one without differ: the adapter did something
        assert np.abs(_pixels(client.download(done["pixel"].images[0])) - want).max() > 8
    # rows with other adapters (and none) ran together: adapters do not split batches
    batches = _batches(settings, [j.id for j in done.values()])
    assert max(len(b.jobs) for b in batches) >= 2, batches


def test_two_models_interleaved_each_image_is_its_models(live_stack, engines, live_unet):
    url, key, settings = live_stack
    order = [None, "lightning", "tiny", "lightning", None]
    with Client(url, key) as client:
        served = {m["name"]: m for m in client.models()["models"]}
        assert served["tiny"]["default"] and served["tiny"]["workers"] == 1 and served["tiny"]["bytes"] > 0
        assert served["lightning"]["workers"] == 1 and served["lightning"]["unet"] == str(live_unet)
        assert served["tiny"]["weights_sha256"] != served["lightning"]["weights_sha256"]
        jobs = [
            client.submit("a red barn", seed=20 + i, steps=3, width=96, height=64, **({"model": m} if m else {}))
            for i, m in enumerate(order)
        ]
        lora_job = client.submit(
            "a red barn",
            seed=30,
            steps=3,
            width=96,
            height=64,
            model="lightning",
            loras=[{"name": "ink", "scale": 1.0}],
        )
        done = [client.wait(j.id, timeout_s=300) for j in [*jobs, lora_job]]
        rows = [Row("a red barn", seed=20 + i, steps=3) for i in range(len(order))]
        rows.append(Row("a red barn", seed=30, steps=3, loras=(("ink", 1.0),)))
        for job, m, row in zip(done, [*order, "lightning"], rows, strict=True):
            assert job.status == "succeeded", job.error
            name = m or "tiny"
            data = client.download(job.images[0])
            want = engines[name].generate([row], 64, 96).images[0].astype(int)
            assert np.abs(_pixels(data) - want).max() <= 1, (name, row.seed)
            params = images.read_parameters(data)
            assert params["model_hash"] == engines[name].model.weights_hash
            assert params["model"] == ("tiny" if name == "tiny" else f"tiny+unet:{live_unet.name}")
            assert params.get("model_name") == m
        # the two models' images of one seed differ: the second model is served, not the first twice
        assert (
            np.abs(_pixels(client.download(done[0].images[0])) - _pixels(client.download(done[1].images[0]))).max() > 8
        )
        # a model not served at all: refused at submit, naming it
        with pytest.raises(ApiError) as err:
            client.submit("x", model="nope")
        assert err.value.status == 422 and "no model named 'nope'" in str(err.value)
    # batches are per model: none holds jobs of both
    model_of = {j.id: (m or "tiny") for j, m in zip(done, [*order, "lightning"], strict=True)}
    for batch in _batches(settings, list(model_of)):
        assert len({model_of[j] for j in batch.jobs if j in model_of}) == 1, batch
