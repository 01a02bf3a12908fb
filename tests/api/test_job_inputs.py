"""Image-to-image and inpainting inputs at submit (api/job_inputs.py, common/inputs.py), against a real Redis and
local storage, no worker: the image stored by content hash and named by key, the size taken from it or resized
to the job's, every refusal a 422 naming the field and leaving nothing in storage."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from common import inputs
from tests.helpers.pictures import encoded, photo


def _b64(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def _stored(settings) -> list[Path]:
    root = Path(settings.local_storage_dir) / inputs.PREFIX
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_an_init_image_is_stored_and_named_by_key_with_the_size_it_has(client, settings):
    r = client.post("/v1/jobs", json={"prompt": "a cat", "init_image": _b64((96, 64)), "strength": 0.5})
    assert r.status_code == 202, r.text
    request = r.json()["request"]
    assert (request["width"], request["height"]) == (96, 64)  # the image's own size, a served one
    key = request["init_image"]
    assert key.startswith("inputs/") and key.endswith(".png") and request["strength"] == 0.5
    (path,) = _stored(settings)
    assert Image.open(path).size == (96, 64)
    # the key again, with a mask sent as a JPEG data URL at another size: resized to the job's
    mask = "data:image/jpeg;base64," + _b64((200, 100), "JPEG", mode="L")
    again = client.post("/v1/jobs", json={"prompt": "a dog", "init_image": key, "mask_image": mask})
    assert again.status_code == 202, again.text
    req = again.json()["request"]
    assert req["init_image"] == key and req["mask_image"] != key and req["strength"] is None
    stored = _stored(settings)
    assert len(stored) == 2 and {Image.open(p).size for p in stored} == {(96, 64)}
    assert {Image.open(p).mode for p in stored} == {"RGB", "L"}


def test_a_given_size_resizes_the_image(client, settings):
    r = client.post("/v1/jobs", json={"prompt": "x", "init_image": _b64((300, 200), "WEBP"), "width": 96, "height": 64})
    assert r.status_code == 202, r.text
    (path,) = _stored(settings)
    assert Image.open(path).size == (96, 64) and Image.open(path).mode == "RGB"


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        ({"strength": 0.5}, "strength", "needs init_image"),
        ({"mask_image": "AAAA"}, "mask_image", "needs init_image"),
        ({"init_image": "not base64!"}, "init_image", "neither base64"),
        ({"init_image": base64.b64encode(b"GIF89a....").decode()}, "init_image", "could not be read"),
        ({"init_image": "BMP"}, "init_image", "BMP"),  # replaced below by a real BMP
        ({"init_image": "SIZE"}, "init_image", "not served"),  # an image of a size nobody serves, no width/height
        ({"init_image": "inputs/someone-else/abc.png"}, "init_image", "not under this tenant"),
        ({"init_image": "inputs/test/nothing.png"}, "init_image", "not an input key"),  # no sha256: not asked for
        ({"init_image": f"inputs/test/{'0' * 64}.png"}, "init_image", "no stored input"),
        ({"init_image": "IMG", "strength": 0.1, "steps": 4}, "strength", "runs none"),
        ({"init_image": "IMG", "strength": 1.5}, "strength", "less than or equal to 1"),
        ({"scheduler": "lcm", "steps": 60}, "steps", "at most 50"),
        ({"timestep_spacing": "sideways"}, "timestep_spacing", "leading"),
        ({"refiner": {"switch_at": 0.8}}, "refiner", "serves no refiner"),
        ({"refiner": {"switch_at": 1.0}}, "refiner.switch_at", "less than 1"),
        ({"refiner": {}, "init_image": "IMG"}, "refiner", "not served with init_image"),
    ],
)
def test_bad_inputs_are_422_naming_the_field_and_store_nothing(client, settings, change, field, hint):
    images = {"BMP": _b64((96, 64), "BMP"), "SIZE": _b64((50, 50)), "IMG": _b64((96, 64))}
    body = {"prompt": "x"} | {k: images.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert any(e["field"] == field and hint in e["message"] for e in problem["errors"]), problem
    assert _stored(settings) == []


@pytest.fixture
def controlled(settings):
    """The API of a deployment serving two ControlNets (their names: the API reads no weights)."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    settings = settings.model_copy(update={"controlnets": "canny=/models/cn-canny,depth=/models/cn-depth"})
    with TestClient(create_app(settings)) as c:
        authorize(c, settings)
        yield c


def test_control_images_are_stored_like_init_images_and_named_by_key(controlled, settings):
    listed = controlled.get("/v1/models").json()
    assert listed["controlnets"] == ["canny", "depth"]
    controls = [
        {"name": "canny", "image": _b64((120, 80), seed=1), "scale": 0.7, "preprocess": "canny"},
        {"name": "depth", "image": "data:image/png;base64," + _b64((96, 64), seed=2), "end": 0.5},
    ]
    r = controlled.post("/v1/jobs", json={"prompt": "x", "width": 96, "height": 64, "controlnets": controls})
    assert r.status_code == 202, r.text
    got = r.json()["request"]["controlnets"]
    assert [c["name"] for c in got] == ["canny", "depth"] and got[0]["preprocess"] == "canny"
    assert all(c["image"].startswith("inputs/") for c in got) and got[0]["image"] != got[1]["image"]
    stored = _stored(settings)
    assert len(stored) == 2 and {Image.open(p).size for p in stored} == {(96, 64)}  # resized to the job's size
    # a stored key again, beside an init image
    again = {"prompt": "y", "init_image": _b64((96, 64)), "controlnets": [{"name": "depth", "image": got[1]["image"]}]}
    r = controlled.post("/v1/jobs", json=again)
    assert r.status_code == 202, r.text
    assert r.json()["request"]["controlnets"][0]["image"] == got[1]["image"]


@pytest.mark.parametrize(
    ("control", "extra", "field", "hint"),
    [
        ({"name": "pose"}, {}, "controlnets", "no ControlNet named 'pose'"),
        ({"name": "canny", "image": "not base64!"}, {}, "controlnets[0].image", "neither base64"),
        ({"name": "canny", "start": 0.6, "end": 0.4}, {}, "controlnets", "must be below end"),
        ({"name": "canny", "scale": 9}, {}, "controlnets", "less than or equal to 4"),
        ({"name": "canny"}, {"refiner": {}}, "refiner", "not served with controlnets"),
    ],
)
def test_bad_controlnets_are_422_naming_the_field_and_store_nothing(controlled, settings, control, extra, field, hint):
    control = {"image": _b64((96, 64))} | control
    r = controlled.post("/v1/jobs", json={"prompt": "x", "width": 96, "height": 64, "controlnets": [control]} | extra)
    assert r.status_code == 422, r.text
    assert hint in r.text and field in r.text, r.text
    assert _stored(settings) == []


@pytest.fixture
def imaged(settings):
    """A client whose deployment serves two IP-Adapters (the API reads names only, never the weights)."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    settings = settings.model_copy(update={"ip_adapters": "style=/models/ip-adapter_sdxl.safetensors,face=/m/f"})
    with TestClient(create_app(settings)) as c:
        authorize(c, settings)
        yield c


def test_an_image_prompt_is_stored_like_init_images_and_named_by_key(imaged, settings):
    assert imaged.get("/v1/models").json()["ip_adapters"] == ["style", "face"]
    prompt = {"name": "style", "image": _b64((120, 80), seed=3), "scale": 0.6}
    r = imaged.post("/v1/jobs", json={"prompt": "x", "width": 96, "height": 64, "ip_adapter": prompt})
    assert r.status_code == 202, r.text
    got = r.json()["request"]["ip_adapter"]
    assert got["name"] == "style" and got["scale"] == 0.6 and got["image"].startswith("inputs/")
    assert [Image.open(p).size for p in _stored(settings)] == [(96, 64)]


@pytest.mark.parametrize(
    ("prompt", "extra", "field", "hint"),
    [
        ({"name": "pose"}, {}, "ip_adapter", "no IP-Adapter named 'pose'"),
        ({"name": "style", "image": "not base64!"}, {}, "ip_adapter.image", "neither base64"),
        ({"name": "style", "scale": 9}, {}, "ip_adapter", "less than or equal to 4"),
        ({"name": "style"}, {"refiner": {}}, "refiner", "not served with ip_adapter"),
    ],
)
def test_bad_image_prompts_are_422_naming_the_field_and_store_nothing(imaged, settings, prompt, extra, field, hint):
    prompt = {"image": _b64((96, 64))} | prompt
    r = imaged.post("/v1/jobs", json={"prompt": "x", "width": 96, "height": 64, "ip_adapter": prompt} | extra)
    assert r.status_code == 422, r.text
    assert hint in r.text and field in r.text, r.text
    assert _stored(settings) == []


# ---------------------------------------------------------------------------------------------- inputs' life


@pytest.fixture
def life(settings):
    """A client with its own settings (given as changes), its tenant's input records and its job store."""
    from api.main import create_app
    from tests.helpers.servers import authorize

    opened = []

    def open_with(**changes):
        s = settings.model_copy(update=changes)
        c = TestClient(create_app(s)).__enter__()
        opened.append(c)
        authorize(c, s)
        return c, c.app.state.services

    yield open_with
    for c in opened:
        c.__exit__(None, None, None)


def test_a_small_jpeg_for_a_larger_job_is_stored_as_sent_and_its_key_keeps_the_jobs_size(life, settings):
    client, services = life()
    sent = encoded(photo(512, 512), quality=85)  # a request body is at most 64 KiB: photos come small
    body = {"prompt": "x", "init_image": base64.b64encode(sent).decode(), "width": 1024, "height": 1024}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    key = r.json()["request"]["init_image"]
    (path,) = _stored(settings)
    # k = 1: the upload itself (before: the PNG of the enlarged pixels, 1,018,802 bytes, 23.5 times the upload)
    assert path.read_bytes() == sent and services.inputs.used_bytes("test") == len(sent)
    again = client.post("/v1/jobs", json={"prompt": "y", "init_image": key})  # no size: its pixels' size
    assert again.status_code == 202, again.text
    assert (again.json()["request"]["width"], again.json()["request"]["height"]) == (1024, 1024)
    assert again.json()["request"]["init_image"] == key and len(_stored(settings)) == 1  # one object, two jobs
    assert services.inputs.used_bytes("test") == len(sent)  # charged once
    assert services.inputs.references("test", inputs.content_hash(key))[1] == sorted(
        [r.json()["id"], again.json()["id"]]
    )


def test_an_input_is_swept_once_its_job_has_ended_expired_and_its_grace_passed(life, settings):
    from common.jobs import ImageRecord, JobStatus
    from worker.input_retention import sweep

    client, services = life(input_grace_s=600)
    sent = encoded(photo(96, 64))
    r = client.post("/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(sent).decode()})
    assert r.status_code == 202, r.text
    job_id, key = r.json()["id"], r.json()["request"]["init_image"]
    store, records, storage = services.store, services.inputs, services.storage
    assert store.transition(job_id, JobStatus.running)[0]  # as a worker does
    image = ImageRecord(key="images/x/0.png", seed=1, width=96, height=64, sha256="0" * 64)
    assert store.succeed(job_id, [image], truncated=False)
    after_grace = time.time() + 601
    assert sweep(storage, records, store, 600, now=time.time())["deleted"] == 0  # within its grace: not looked at
    assert sweep(storage, records, store, 600, now=after_grace) == {"deleted": 0, "freed_bytes": 0, "kept": 1}
    assert storage.get(key) == sent  # the job's record lives (until SDXL_JOB_TTL_S after it ended)

    redis.Redis.from_url(settings.redis_url).delete(store.keys.job(job_id))  # the record expires
    done = sweep(storage, records, store, 600, now=after_grace + 600)
    assert done == {"deleted": 1, "freed_bytes": len(sent), "kept": 0}
    assert _stored(settings) == [] and records.used_bytes("test") == 0
    gone = client.post("/v1/jobs", json={"prompt": "y", "init_image": key})
    assert gone.status_code == 422 and "no stored input" in gone.text


def test_the_tenants_input_quota_is_429_naming_it_and_stores_nothing_more(life, settings):
    first, second = encoded(photo(96, 64, seed=1)), encoded(photo(96, 64, seed=2))
    client, services = life(max_input_bytes_per_tenant=len(first) + len(second) - 1)
    ok = client.post("/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(first).decode()})
    assert ok.status_code == 202, ok.text
    over = client.post("/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(second).decode()})
    assert over.status_code == 429 and "SDXL_MAX_INPUT_BYTES_PER_TENANT" in over.json()["detail"]
    assert over.headers["Retry-After"] and len(_stored(settings)) == 1
    assert services.inputs.used_bytes("test") == len(first)
    key = ok.json()["request"]["init_image"]
    assert client.post("/v1/jobs", json={"prompt": "y", "init_image": key}).status_code == 202  # stored: free

    client, services = life(max_input_bytes_per_tenant=len(first))  # now at its quota
    early = client.post("/v1/jobs", json={"prompt": "x", "init_image": "not base64!"})
    assert early.status_code == 429, early.text  # refused before any image is decoded (else a 422)
    assert client.post("/v1/jobs", json={"prompt": "y", "init_image": key}).status_code == 202


def test_an_input_stored_for_a_job_the_queue_cap_refuses_is_deleted_and_uncharged(life, settings):
    client, services = life(max_queued_per_tenant=1)
    first, second = encoded(photo(96, 64, seed=1)), encoded(photo(96, 64, seed=2))
    assert client.post("/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(first).decode()}).is_success
    refused = client.post("/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(second).decode()})
    assert refused.status_code == 429 and "queued jobs" in refused.json()["detail"]
    assert [p.read_bytes() for p in _stored(settings)] == [first]
    assert services.inputs.used_bytes("test") == len(first) and len(services.inputs.due(float("inf"))) == 1


def test_a_replay_lets_go_of_its_claim_and_the_first_job_keeps_the_input(life, settings):
    client, services = life()
    body = {"prompt": "x", "init_image": base64.b64encode(encoded(photo(96, 64))).decode()}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    replay = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and replay.json()["id"] == first.json()["id"]
    digest = inputs.content_hash(first.json()["request"]["init_image"])
    assert services.inputs.references("test", digest)[1] == [first.json()["id"]]  # the replay's id let go
    assert len(_stored(settings)) == 1
