"""What the deployment serves, as the API checks a job against it (api/served.py, common/loras.py), with a real
Redis and no worker: the models of SDXL_MODELS and which live workers hold them (their heartbeats), and the
LoRA adapters of SDXL_LORA_DIR (GET /v1/loras). Every refusal is a 422 naming the field (and the adapter or
model) and stores no job."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from common import worker_status
from common.settings import Settings
from common.worker_registry import WorkerRegistry
from tests.helpers import variants


@pytest.fixture
def lora_dir(tiny_dir, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    variants.write_lora(tiny_dir, folder / "pixel-art.safetensors", "kohya", 4, 1, alpha=2.0)
    variants.write_lora(tiny_dir, folder / "watercolor.safetensors", "diffusers", 8, 2, parts=("unet",))
    variants.write_lora(tiny_dir, folder / "wide.safetensors", "diffusers", 16, 3, parts=("unet",))
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((folder / "pixel-art.safetensors").read_bytes())
    (folder / "escape.safetensors").symlink_to(outside)  # a link out of the folder: never served
    return folder


@pytest.fixture
def client(settings, lora_dir):
    from tests.helpers.servers import authorize

    served = settings.model_copy(
        update={
            "models": "base=tiny,lightning=tiny;unet=/models/lightning.safetensors",
            "lora_dir": str(lora_dir),
            "lora_max_rank": 8,
            "refiner": "tiny-refiner",
        }
    )
    with TestClient(create_app(served)) as c:
        authorize(c, served)
        c.served_settings = served
        yield c


def _problem(r, field, hint):
    assert r.status_code == 422, r.text
    assert any(e["field"] == field and hint in e["message"] for e in r.json()["errors"]), r.json()


def _jobs(client) -> int:
    return client.get("/v1/jobs").json()["total"]


def test_loras_lists_the_adapters_with_what_they_touch(client, lora_dir):
    body = client.get("/v1/loras").json()
    by_name = {a["name"]: a for a in body["loras"]}
    assert sorted(by_name) == ["pixel-art", "watercolor", "wide"]
    pixel = by_name["pixel-art"]
    data = (lora_dir / "pixel-art.safetensors").read_bytes()
    assert pixel["bytes"] == len(data) and pixel["sha256"] == hashlib.sha256(data).hexdigest()
    assert (pixel["layout"], pixel["rank"], pixel["touches"]) == (
        "kohya",
        4,
        ["text_encoder", "text_encoder_2", "unet"],
    )
    assert (by_name["watercolor"]["layout"], by_name["watercolor"]["touches"]) == ("diffusers", ["unet"])
    assert "not JSON" in body["unusable"]["broken"] and "link out of the folder" in body["unusable"]["escape"]
    assert (body["max_per_job"], body["max_rank"]) == (2, 8)


def test_models_lists_every_model_and_who_holds_it(client, settings):
    body = client.get("/v1/models").json()
    assert body["model"] == "base"
    assert [(m["name"], m["default"], m["workers"], m["bytes"]) for m in body["models"]] == [
        ("base", True, 0, None),
        ("lightning", False, 0, None),
    ]
    assert body["models"][1]["unet"] == "/models/lightning.safetensors"
    _beat(settings, [{"name": "base", "source": "tiny", "bytes": 1234, "weights_sha256": "ab" * 32}])
    time.sleep(2.1)  # the API reads heartbeats at most every 2 s
    base = client.get("/v1/models").json()["models"][0]
    assert (base["workers"], base["bytes"], base["weights_sha256"]) == (1, 1234, "ab" * 32)


def _beat(settings: Settings, models: list[dict]) -> None:
    status = worker_status.WorkerStatus(
        name="w1",
        model="tiny",
        sizes=[(64, 64)],
        batch_rows=4,
        devices=1,
        started_at=time.time(),
        at=time.time(),
        models=models,
    )
    WorkerRegistry(redis.Redis.from_url(settings.redis_url), settings.key_prefix).beat(status, ttl_s=60)


def test_a_model_no_live_worker_holds_is_refused(client, settings):
    # no worker alive: queued, as any job is while workers start
    assert client.post("/v1/jobs", json={"prompt": "x", "model": "lightning"}).status_code == 202
    _beat(settings, [{"name": "base", "source": "tiny", "bytes": 1, "weights_sha256": ""}])
    time.sleep(2.1)
    _problem(client.post("/v1/jobs", json={"prompt": "x", "model": "lightning"}), "model", "no live worker serves")
    assert client.post("/v1/jobs", json={"prompt": "x", "model": "base"}).status_code == 202
    assert client.post("/v1/jobs", json={"prompt": "x"}).status_code == 202  # the default: base
    assert _jobs(client) == 3


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        ({"model": "nope"}, "model", "no model named 'nope'"),
        ({"model": "lightning", "refiner": {}}, "refiner", "default model 'base' only"),
        ({"loras": [{"name": "nope"}]}, "loras.0.name", "no adapter named 'nope'"),
        ({"loras": [{"name": "escape"}]}, "loras.0.name", "no adapter named 'escape'"),
        ({"loras": [{"name": "../secret"}]}, "loras.0.name", "no adapter named '../secret'"),
        ({"loras": [{"name": "broken"}]}, "loras.0.name", "'broken' cannot be used"),
        ({"loras": [{"name": "wide"}]}, "loras.0.name", "'wide' has rank 16; this deployment serves up to 8"),
        ({"loras": [{"name": "pixel-art"}, {"name": "pixel-art", "scale": 0.5}]}, "loras.1.name", "named twice"),
        ({"loras": [{"name": "pixel-art"}, {"name": "watercolor"}, {"name": "wide"}]}, "loras", "at most 2"),
        ({"loras": [{"name": "pixel-art", "scale": 9}]}, "loras.0.scale", "less than or equal to 4"),
        ({"loras": [{"name": "pixel-art", "weight": 1}]}, "loras.0.weight", "Extra inputs"),
    ],
)
def test_bad_models_and_adapters_are_422_naming_them_and_store_nothing(client, change, field, hint):
    _problem(client.post("/v1/jobs", json={"prompt": "x"} | change), field, hint)
    assert _jobs(client) == 0


def test_good_adapters_are_taken_and_kept_in_the_request(client):
    r = client.post(
        "/v1/jobs", json={"prompt": "x", "loras": [{"name": "pixel-art", "scale": 0.8}, {"name": "watercolor"}]}
    )
    assert r.status_code == 202, r.text
    assert r.json()["request"]["loras"] == [{"name": "pixel-art", "scale": 0.8}, {"name": "watercolor", "scale": 1.0}]


def test_a_deployment_without_adapters_refuses_them(settings):
    from tests.helpers.servers import authorize

    with TestClient(create_app(settings)) as c:
        authorize(c, settings)
        _problem(c.post("/v1/jobs", json={"prompt": "x", "loras": [{"name": "a"}]}), "loras", "serves no LoRA")
        assert c.get("/v1/loras").json()["loras"] == []


def test_data_set_lines_may_name_a_model_and_adapters(client):
    lines = [
        {"id": "a", "prompt": "x", "model": "lightning", "loras": [{"name": "pixel-art", "scale": 0.5}]},
        {"id": "b", "prompt": "y", "model": "nope"},
        {"id": "c", "prompt": "z", "loras": [{"name": "nope"}]},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    files = {"input": ("prompts.jsonl", body, "application/x-ndjson")}
    options = {"defaults": {"width": 96, "height": 64, "steps": 4}, "on_invalid": "skip"}
    r = client.post("/v1/datasets", files=files, data={"options": json.dumps(options)})
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["counts"]["total"] == 1 and run["counts"]["skipped"] == 2
    errors = {e["line"]: e for e in run["invalid_lines"]}
    assert errors[2]["field"] == "model" and "no model named 'nope'" in errors[2]["message"]
    assert errors[3]["field"] == "loras.0.name" and "no adapter named 'nope'" in errors[3]["message"]


def test_adapters_from_a_storage_prefix(settings, lora_dir, tmp_path):
    from tests.helpers.servers import authorize

    served = settings.model_copy(update={"lora_dir": "storage:team/loras", "lora_cache_dir": str(tmp_path / "c")})
    with TestClient(create_app(served)) as c:
        authorize(c, served)
        storage = c.app.state.services.storage
        data = (lora_dir / "pixel-art.safetensors").read_bytes()
        storage.put("team/loras/pixel-art.safetensors", data, "application/octet-stream")
        listed = c.get("/v1/loras").json()["loras"]
        assert [(a["name"], a["sha256"]) for a in listed] == [("pixel-art", hashlib.sha256(data).hexdigest())]
        ok = c.post("/v1/jobs", json={"prompt": "x", "loras": [{"name": "pixel-art", "scale": 0.5}]})
        assert ok.status_code == 202, ok.text
        _problem(c.post("/v1/jobs", json={"prompt": "x", "loras": [{"name": "ink"}]}), "loras.0.name", "'ink'")
