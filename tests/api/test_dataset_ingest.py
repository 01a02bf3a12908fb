"""Every job field on a data set line (api/dataset_ingest.py, common/datasets.py), against a real Redis and local
storage, no worker: each line checked by the job route's own code (api/served.py check_request, api/job_inputs.py
read_key), so a bad value is refused with the job's field and reason; images named by the tenant's stored key only;
what a line asks for carried into its stored request, the engine's row and the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from common import inputs
from common.datasets import KEYS_ONLY, Layout, Line, manifest_row
from common.jobs import Job, JobStatus
from tests.helpers import variants
from tests.helpers.servers import authorize
from worker.loop.batch import InputPixels, rows_for

SIZE = {"width": 96, "height": 64}


@pytest.fixture
def served(settings, tiny_dir, tmp_path):
    """A deployment serving two models, a refiner, a LoRA, two ControlNets and an IP-Adapter (the API reads their
    names, never their weights), and the stored key of one image of tenant `test` (96x64) and of a mask
    (1024x1024: a job of another size stored it)."""
    folder = tmp_path / "loras"
    folder.mkdir()
    variants.write_lora(tiny_dir, folder / "pixel-art.safetensors", "kohya", 4, 1, alpha=2.0)
    settings = settings.model_copy(
        update={
            "models": "base=tiny,lightning=tiny;unet=/models/lightning.safetensors",
            "lora_dir": str(folder),
            "refiner": "tiny-refiner",
            "controlnets": "canny=/models/cn-canny,depth=/models/cn-depth",
            "ip_adapters": "style=/models/ip-adapter.safetensors",
        }
    )
    with TestClient(create_app(settings)) as c:
        authorize(c, settings)
        storage = c.app.state.services.storage
        rng = np.random.default_rng(0)
        c.image = put(storage, "test", Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)))
        c.mask = put(storage, "test", Image.fromarray(np.full((1024, 1024), 255, np.uint8)))
        yield c


def put(storage, tenant: str, image: Image.Image) -> str:
    digest, data = inputs.encode(image)
    storage.put(inputs.key(tenant, digest), data, "image/png")
    return inputs.key(tenant, digest)


def upload(client, lines: list[dict], **options):
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    options = {"defaults": {**SIZE, "steps": 4}, "seed": 3} | options
    files = {"input": ("prompts.jsonl", body, "application/x-ndjson")}
    return client.post("/v1/datasets", files=files, data={"options": json.dumps(options)})


def stored_lines(client, run_id: str) -> list[Line]:
    text = client.app.state.services.storage.get(Layout(run_id).chunk(0))
    return [Line.from_json(t) for t in text.splitlines()]


def test_a_line_takes_every_job_field_and_carries_it_to_the_engine_row_and_the_manifest(served):
    image, mask = served.image, served.mask
    lines = [
        {
            "id": "edit",
            "prompt": "a fox",
            "init_image": image,
            "mask_image": mask,
            "strength": 0.6,
            "timestep_spacing": "trailing",
            "loras": [{"name": "pixel-art", "scale": 0.5}],
            "controlnets": [{"name": "canny", "image": image, "scale": 0.7, "preprocess": "canny", "end": 0.8}],
            "ip_adapter": {"name": "style", "image": image, "scale": 0.6},
        },
        {"id": "refined", "prompt": "a hill", "refiner": {"switch_at": 0.7}, "model": "base"},
        {"id": "fast", "prompt": "a boat", "model": "lightning", "timestep_spacing": "leading"},
        {"id": "own-size", "prompt": "a cat", "init_image": image, "width": None, "height": None},
    ]
    r = upload(served, lines, defaults={"steps": 4})  # no size: the first served (1024x1024), or the init image's
    assert r.status_code == 202, r.text
    edit, refined, fast, own = stored_lines(served, r.json()["id"])
    e = edit.request
    assert (e.init_image, e.mask_image, e.strength, e.timestep_spacing) == (image, mask, 0.6, "trailing")
    assert (e.controlnets[0].name, e.controlnets[0].image, e.ip_adapter.image) == ("canny", image, image)
    assert refined.request.refiner.switch_at == 0.7 and fast.request.model == "lightning"
    assert (own.request.width, own.request.height) == (e.width, e.height) == (96, 64)  # as a job: the init image's
    assert (fast.request.width, fast.request.height) == (1024, 1024)  # no init image: the first served size

    # the feeder makes each line a job of this request (worker/feeder.py create_bulk): its engine rows
    picture = np.zeros((64, 96, 3), np.uint8)  # as admission reads them: at the line's size (the mask resized)
    pixels = InputPixels(picture, np.zeros((64, 96), np.uint8), (picture,), picture)
    (row,) = rows_for(Job(id="j", status=JobStatus.queued, request=e, created_at=0.0), pixels)
    assert (row.strength, row.timestep_spacing, row.loras) == (0.6, "trailing", (("pixel-art", 0.5),))
    assert row.image is not None and row.mask is not None
    assert [(c.name, c.scale, c.end) for c in row.controlnets] == [("canny", 0.7, 0.8)]
    assert row.ip_adapter is not None and (row.ip_adapter.name, row.ip_adapter.scale) == ("style", 0.6)
    (refined_row,) = rows_for(Job(id="k", status=JobStatus.queued, request=refined.request, created_at=0.0))
    assert refined_row.refiner_switch == 0.7

    # the manifest names the inputs by content hash, never by key (its folder names the tenant)
    row = manifest_row(edit, "k", "s")
    digest = inputs.content_hash(image)
    assert (row["init_image_sha256"], row["mask_image_sha256"]) == (digest, inputs.content_hash(mask))
    assert row["controlnets"][0]["image_sha256"] == digest and row["ip_adapter"]["image_sha256"] == digest
    assert (row["strength"], row["timestep_spacing"], row["refiner"]) == (0.6, "trailing", None)
    assert "inputs/" not in json.dumps(row) and manifest_row(refined, "k", "s")["refiner"]["switch_at"] == 0.7


def test_defaults_carry_images_and_the_rest_to_every_line(served):
    defaults = {
        **SIZE,
        "steps": 4,
        "controlnets": [{"name": "depth", "image": served.image}],
        "ip_adapter": {"name": "style", "image": served.image},
        "timestep_spacing": "trailing",
    }
    r = upload(served, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "controlnets": []}], defaults=defaults)
    assert r.status_code == 202, r.text
    a, b = stored_lines(served, r.json()["id"])
    assert [c.name for c in a.request.controlnets] == ["depth"] and b.request.controlnets == []  # a line's own wins
    assert a.request.ip_adapter.image == b.request.ip_adapter.image == served.image
    bad = upload(served, [{"id": "a", "prompt": "x"}], defaults={"ip_adapter": {"name": "style", "image": "iVBO"}})
    assert bad.status_code == 422 and bad.json()["errors"] == [
        {"field": "defaults.ip_adapter", "message": f"Value error, {KEYS_ONLY}"}
    ]


# (the change to a valid request, with IMG standing for the tenant's stored image key); each a job refuses
BAD = [
    {"timestep_spacing": "sideways"},
    {"init_image": "inputs/someone-else/" + "0" * 64 + ".png"},
    {"init_image": "inputs/test/nothing.png"},
    {"init_image": "inputs/test/" + "0" * 64 + ".png"},
    {"mask_image": "IMG"},
    {"strength": 0.5},
    {"init_image": "IMG", "strength": 1.5},
    {"init_image": "IMG", "strength": 0.1},
    {"refiner": {"switch_at": 1.0}},
    {"refiner": {}, "init_image": "IMG"},
    {"refiner": {}, "model": "lightning"},
    {"refiner": {}, "controlnets": [{"name": "canny", "image": "IMG"}]},
    {"controlnets": [{"name": "pose", "image": "IMG"}]},
    {"controlnets": [{"name": "canny", "image": "IMG", "start": 0.6, "end": 0.4}]},
    {"controlnets": [{"name": "canny", "image": "IMG", "scale": 9}]},
    {"controlnets": [{"name": "canny", "image": "inputs/other/" + "1" * 64 + ".png"}]},
    {"controlnets": [{"name": "canny", "image": "IMG"}, {"name": "canny", "image": "IMG"}]},
    {"controlnets": [{"name": "canny", "image": "IMG"}], "model": "lightning"},
    {"ip_adapter": {"name": "pose", "image": "IMG"}},
    {"ip_adapter": {"name": "style", "image": "IMG", "scale": 9}},
    {"ip_adapter": {"name": "style", "image": "inputs/test/" + "2" * 64 + ".png"}},
    {"ip_adapter": {"name": "style", "image": "IMG"}, "model": "lightning"},
    {"model": "nope"},
    {"loras": [{"name": "nope"}]},
    {"loras": [{"name": "pixel-art", "scale": 9}]},
]


@pytest.mark.parametrize("change", BAD, ids=lambda c: "+".join(c))
def test_a_bad_value_on_a_line_gets_the_jobs_field_and_reason(served, change):
    change = json.loads(json.dumps(change).replace('"IMG"', json.dumps(served.image)))
    job = served.post("/v1/jobs", json={"prompt": "x", **SIZE, "steps": 4, **change})
    assert job.status_code == 422, job.text
    first = job.json()["errors"][0]
    run = upload(served, [{"id": "ok", "prompt": "y"}, {"id": "a", "prompt": "x", **change}])
    assert run.status_code == 422, run.text
    assert run.json()["lines"] == [{"line": 2, "field": first["field"], "message": first["message"]}]
    assert served.get("/v1/jobs").json()["total"] == 0 and served.get("/v1/datasets").json()["total"] == 0


def test_a_line_cannot_name_another_tenants_image_or_send_one_inline(served, settings):
    with TestClient(create_app(served.app.state.services.settings)) as other:
        authorize(other, settings, tenant="other")
        job = other.post("/v1/jobs", json={"prompt": "theirs", "init_image": served.image.replace("inputs/test/", "")})
        assert job.status_code == 422  # not base64, not a key: a job's own refusal
        theirs = put(served.app.state.services.storage, "other", Image.new("RGB", (96, 64), "red"))
        for line in (
            {"id": "a", "prompt": "x", "init_image": theirs},
            {"id": "b", "prompt": "x", "controlnets": [{"name": "canny", "image": theirs}]},
            {"id": "c", "prompt": "x", "ip_adapter": {"name": "style", "image": theirs}},
        ):
            r = upload(served, [line], on_invalid="skip")
            assert r.status_code == 422 and "not under this tenant's inputs ('inputs/test/')" in r.text, r.text
        own = upload(other, [{"id": "a", "prompt": "x", "init_image": theirs}])
        assert own.status_code == 202, own.text  # the other tenant's own key is its to use
    inline = upload(served, [{"id": "a", "prompt": "x", "init_image": "data:image/png;base64,iVBORw0KGgo="}])
    assert inline.json()["lines"] == [{"line": 1, "field": "init_image", "message": KEYS_ONLY}]
