"""Image-to-image, inpainting and guidance-free jobs through the whole service (live_stack: uvicorn, the worker on
the tiny float32 engine, Redis, local storage): each image is the one the engine gives for the same row alone,
its PNG says what made it, and guided and guidance-free jobs never share a batch."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import redis
from PIL import Image

from client.api import Client, encode_image
from common import inputs
from common.batch_log import BatchLog
from worker import images
from worker.engine.engine import Engine, Row


@pytest.fixture(scope="module")
def engine(tiny_dir, tiny_refiner_dir):
    from worker.engine import model

    # the worker's model, refiner, dtype and batch rows
    refiner = model.load_folder(tiny_refiner_dir, model.LoadOptions(np.float32), name="tiny-refiner")
    return Engine(
        model.load_folder(tiny_dir, model.LoadOptions(np.float32), name="tiny"),
        [(64, 96)],
        batch_rows=4,
        refiner=refiner,
    )


def _picture() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:96]
    return np.stack([yy * 3, xx * 2, (xx + yy)], -1).astype(np.uint8)


def test_img2img_inpaint_and_turbo_jobs_give_the_engines_images(live_stack, engine, tiny_refiner_dir):
    url, key, settings = live_stack
    picture = _picture()
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:80] = 255
    with Client(url, key) as client:
        jobs = {
            "img2img": client.submit(
                "a castle", seed=5, steps=6, init_image=encode_image(picture), strength=0.6, scheduler="dpmpp_2m_karras"
            ),
            "inpaint": client.submit(
                "a door",
                seed=6,
                steps=6,
                init_image=encode_image(picture),
                mask_image=encode_image(mask),
                scheduler="ddim",
            ),
            "turbo": client.submit(
                "a bird", seed=7, steps=2, guidance_scale=0.0, timestep_spacing="trailing", width=96, height=64
            ),
            "ancestral": client.submit("a fish", seed=8, steps=3, scheduler="euler_ancestral", width=96, height=64),
            "refined": client.submit(
                "a ship", seed=9, steps=5, width=96, height=64, refiner={"switch_at": 0.7, "aesthetic_score": 7.0}
            ),
        }
        done = {name: client.wait(job.id, timeout_s=300) for name, job in jobs.items()}
        for name, job in done.items():
            assert job.status == "succeeded", (name, job.error)
        rows = {
            "img2img": Row("a castle", seed=5, steps=6, image=picture, strength=0.6, scheduler="dpmpp_2m_karras"),
            "inpaint": Row("a door", seed=6, steps=6, image=picture, mask=mask, scheduler="ddim"),
            "turbo": Row("a bird", seed=7, steps=2, guidance_scale=0.0, timestep_spacing="trailing"),
            "ancestral": Row("a fish", seed=8, steps=3, scheduler="euler_ancestral"),
            "refined": Row("a ship", seed=9, steps=5, refiner_switch=0.7, aesthetic_score=7.0),
        }
        for name, job in done.items():
            data = client.download(job.images[0])
            got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
            want = engine.generate([rows[name]], 64, 96).images[0].astype(int)
            assert np.abs(got - want).max() <= 1, name
            params = images.read_parameters(data)
            if name in ("img2img", "inpaint"):
                assert job.request["init_image"].startswith(inputs.prefix("live"))  # the job keeps the key
                # the PNG records its content hash
                assert params["init_image_sha256"] == inputs.content_hash(job.request["init_image"])
                assert "init_image" not in params
            assert ("mask_image_sha256" in params) == (name == "inpaint")
            assert ("strength" in params) == (name == "img2img")
            assert params.get("timestep_spacing") == ("trailing" if name == "turbo" else None)
            if name == "refined":
                assert params["refiner"]["switch_at"] == 0.7 and params["refiner_model"] == str(tiny_refiner_dir)
                assert len(params["refiner_hash"]) == 64
            else:
                assert "refiner" not in params
    # the guidance-free job ran in a batch of its own program: never beside a guided one
    log = BatchLog(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    deadline = time.monotonic() + 10
    while True:
        batches = log.recent()
        with_turbo = [b for b in batches if done["turbo"].id in b.jobs]
        if with_turbo or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert with_turbo and all(b.jobs == [done["turbo"].id] for b in with_turbo), with_turbo
    refined = [b for b in batches if done["refined"].id in b.jobs]
    assert refined and all(b.jobs == [done["refined"].id] for b in refined), refined  # the refiner's own batch
