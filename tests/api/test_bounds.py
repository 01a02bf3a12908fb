"""Issue 33 (many tenants): every input that gave a 5xx is a 4xx naming the field, and each request's work is
bounded (image pixels, data set line bytes, images after num_images, event streams and waits per key).
Against a real Redis and local storage, with no worker."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from tests.helpers.servers import at_once, authorize

GOOD = {"prompt": "a cat in a hat", "width": 96, "height": 64}
OPTIONS = {"defaults": {"width": 96, "height": 64, "steps": 4}, "seed": 11, "shard_size": 2}
SURROGATE = "\ud800"


def post_raw(client, path: str, body: object):
    """json.dumps escapes a lone surrogate as \\ud800, as a client in another language may send it (httpx's own
    encoder would refuse to write it)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def upload(client, lines, options=OPTIONS):
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    files = {"input": ("prompts.jsonl", text, "application/x-ndjson")}
    return client.post("/v1/datasets", files=files, data={"options": json.dumps(options)})


def field_of(r) -> str:
    return r.json()["errors"][0]["field"]


def webp(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="WEBP", quality=10)
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize(
    "update, field",
    [
        ({"prompt": f"a cat {SURROGATE}"}, "prompt"),
        ({"negative_prompt": SURROGATE}, "negative_prompt"),
        ({"model": SURROGATE}, "model"),
        ({"loras": [{"name": SURROGATE}]}, "loras.0.name"),
        ({"webhook_url": f"https://example.com/{SURROGATE}"}, "webhook_url"),
    ],
)
def test_a_lone_surrogate_in_any_text_field_is_422_naming_it(client, update, field):
    r = post_raw(client, "/v1/jobs", {**GOOD, **update})
    assert r.status_code == 422, r.text
    assert field_of(r) == field
    assert "surrogate" in r.json()["detail"] or "unicode" in r.json()["detail"]  # ours, or pydantic's own words


def test_a_lone_surrogate_in_a_data_set_line_names_the_line_and_field(client):
    line = json.dumps({"id": "a", "prompt": "x", "negative_prompt": SURROGATE})  # escaped: valid JSON
    r = upload(client, [line])
    assert r.status_code == 422, r.text
    assert r.json()["lines"][0] == {"line": 1, "field": "negative_prompt", "message": r.json()["lines"][0]["message"]}


def test_deeply_nested_json_is_4xx(client):
    deep = "[" * 100_000 + "]" * 100_000
    r = client.post("/v1/jobs", content=deep[:60_000], headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    nested = '{"id": "a", "prompt": "x", "metadata": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}}"
    r = upload(client, [nested])
    assert r.status_code == 422, r.text
    assert r.json()["lines"][0]["line"] == 1


def test_an_over_long_input_key_is_422_not_503(client, monkeypatch):
    storage = client.app.state.services.storage
    real_get = storage.get

    def s3_like_get(key: str) -> bytes:  # S3 answers KeyTooLongError, which reads as an outage (503)
        if len(key) > 1024:
            raise RuntimeError("KeyTooLongError")
        return real_get(key)

    monkeypatch.setattr(storage, "get", s3_like_get)
    key = "inputs/test/" + "a" * 1100 + ".png"
    r = client.post("/v1/jobs", json={**GOOD, "init_image": key})
    assert r.status_code == 422, r.text
    assert field_of(r) == "init_image"
    r = client.post("/v1/datasets", json={**OPTIONS, "input_key": "inputs/test/" + "b" * 1010})
    assert r.status_code == 422, r.text
    assert field_of(r) == "input_key"


def test_two_submits_of_one_image_at_once_both_succeed(client):
    image = webp(96, 64)
    outcomes = at_once(6, lambda i: client.post("/v1/jobs", json={**GOOD, "init_image": image, "seed": i}))
    assert [getattr(o, "status_code", o) for o in outcomes] == [202] * 6


@pytest.mark.parametrize("path", ["/v1/datasets/abc:rate", "/v1/datasets/abc:inflight", "/v1/jobs/abc:x"])
def test_an_id_that_names_another_redis_key_is_refused_before_redis(client, path):
    # the run `abc` exists, so `abc:rate` (its rate samples' list) is a real key of another type
    r = upload(client, [{"id": "a", "prompt": "x"}])
    run_id = r.json()["id"]
    datasets = client.app.state.services.datasets
    datasets.sample_rate(run_id, 0)  # as the feeder writes them
    datasets.mark_fed(run_id, 0, "job-1", "cursor")
    r = client.get(path.replace("abc", run_id))
    assert r.status_code in (404, 422), r.text


def test_an_over_long_id_is_422(client):
    assert client.get("/v1/jobs/" + "a" * 300).status_code == 422
    assert client.get("/v1/datasets/" + "a" * 300).status_code == 422


def test_a_malformed_adapter_file_is_listed_as_unusable(settings, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    bad_header = json.dumps({"a.lora_down.weight": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 0]}})
    bad_header = bad_header.replace("Infinity", "1e400").encode()
    (folder / "huge-rank.safetensors").write_bytes(struct.pack("<Q", len(bad_header)) + bad_header)
    deep = b"[" * 5000 + b"]" * 5000
    (folder / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    app = create_app(settings.model_copy(update={"lora_dir": str(folder), "auth_required": False}))
    with TestClient(app) as c:
        r = c.get("/v1/loras")
        assert r.status_code == 200, r.text
        assert set(r.json()["unusable"]) == {"huge-rank", "deep"}
        r = c.post("/v1/jobs", json={**GOOD, "loras": [{"name": "huge-rank"}]})
        assert r.status_code == 422 and field_of(r) == "loras.0.name", r.text


# ---------------------------------------------------------------------- bounded work per request


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(client):
    r = client.post("/v1/jobs", json={**GOOD, "init_image": webp(4096, 4096)})
    assert r.status_code == 422, r.text
    assert field_of(r) == "init_image" and "pixels" in r.json()["detail"]


def test_a_large_jpeg_is_drafted_down_not_refused(settings):
    # 2600x1800 is over the cap (4x 1024x1024): a PNG of it is refused, a JPEG decoded at 1/8 scale (325x225)
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 2**20}))) as c:
        authorize(c, settings)
        for fmt, status in (("JPEG", 202), ("PNG", 422)):
            out = io.BytesIO()
            Image.new("RGB", (2600, 1800), (10, 200, 30)).save(out, format=fmt, quality=5)
            r = c.post("/v1/jobs", json={**GOOD, "init_image": base64.b64encode(out.getvalue()).decode()})
            assert r.status_code == status, (fmt, r.text)


def test_a_data_set_line_over_the_byte_cap_is_refused_by_number_unparsed(client, settings):
    big = json.dumps({"id": "big", "prompt": "x", "metadata": {"pad": "y" * (2 * 2**20)}})
    r = upload(client, [{"id": "a", "prompt": "x"}, big, {"id": "b", "prompt": "y"}])
    assert r.status_code in (413, 422), r.text
    line = r.json()["lines"][0]
    assert line["line"] == 2 and str(settings.max_dataset_line_bytes) in line["message"]


def test_images_per_run_count_num_images(settings):
    app = create_app(settings.model_copy(update={"max_dataset_images": 100}))
    with TestClient(app) as c:
        authorize(c, settings)
        lines = [{"id": f"l{i}", "prompt": "x", "num_images": 64} for i in range(2)]
        r = upload(c, lines)
        assert r.status_code == 413, r.text
        assert "128 images" in r.json()["detail"] and "100" in r.json()["detail"]


def test_images_per_tenant_count_every_active_run(settings):
    app = create_app(settings.model_copy(update={"max_dataset_images_per_tenant": 100}))
    with TestClient(app) as c:
        authorize(c, settings)
        first = upload(c, [{"id": "a", "prompt": "x", "num_images": 64}])
        assert first.status_code == 202, first.text
        second = upload(c, [{"id": "b", "prompt": "x", "num_images": 64}])
        assert second.status_code == 429, second.text
        assert second.headers["Retry-After"]


def test_waits_are_capped_per_key(settings):
    app = create_app(settings.model_copy(update={"max_waits_per_key": 2}))
    with TestClient(app) as c:
        authorize(c, settings)
        job_id = c.post("/v1/jobs", json=GOOD).json()["id"]
        started = threading.Barrier(3)

        def wait(i: int):
            started.wait()
            return c.get(f"/v1/jobs/{job_id}", params={"wait_s": 2})

        outcomes = []
        threads = [threading.Thread(target=lambda i=i: outcomes.append(wait(i))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(o.status_code for o in outcomes)
        assert codes == [200, 200, 429], codes
        refused = next(o for o in outcomes if o.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert c.get(f"/v1/jobs/{job_id}", params={"wait_s": 0.1}).status_code == 200  # slots given back


def test_an_upload_takes_a_tenant_slot_before_its_body_is_read(client):
    uploads = client.app.state.services.uploads
    give_back = [uploads.take("test") for _ in range(uploads.limit)]  # this tenant's uploads, all in progress
    r = upload(client, [{"id": "a", "prompt": "x"}])
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
    assert "SDXL_MAX_UPLOADS_PER_TENANT" in r.json()["detail"]
    for give in give_back:
        give()
    assert upload(client, [{"id": "a", "prompt": "x"}]).status_code == 202


def test_decodes_wait_for_a_slot_and_give_up_with_503(client):
    from api.job_inputs import DecodeLimits

    services = client.app.state.services
    busy = DecodeLimits(services.decodes.max_pixels, threading.BoundedSemaphore(1), services.decodes.workers, 0.2)
    services.decodes = busy
    services.decodes.slots.acquire()  # the one decoder is busy
    r = client.post("/v1/jobs", json={**GOOD, "init_image": webp(96, 64)})
    assert r.status_code == 503 and r.headers["Retry-After"], r.text
    services.decodes.slots.release()
    assert client.post("/v1/jobs", json={**GOOD, "init_image": webp(96, 64)}).status_code == 202
