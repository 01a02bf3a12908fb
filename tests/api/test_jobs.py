"""The API against a real Redis, with no worker: submit, read, list, cancel, idempotency, bad input."""

import pytest
import redis

from common.keys import Keys
from common.storage import LocalStorage

GOOD = {"prompt": "a cat in a hat", "width": 1024, "height": 1024}


def test_submit_answers_202_with_job_and_status_url(client):
    r = client.post("/v1/jobs", json=GOOD)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["queue_position"] >= 1
    assert job["status_url"] == f"http://testserver/v1/jobs/{job['id']}"
    assert 0 <= job["request"]["seed"] < 2**32  # random when absent, always returned
    assert job["request"]["steps"] == 20 and job["request"]["scheduler"] == "euler"
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["status"] == "queued" and got["images"] == []
    assert got["expires_at"] is None  # not known until it ends


def test_the_job_is_ready_for_its_tenants_turn_and_a_worker_is_woken(client, settings):
    """The message names no job, only its model (whichever worker holding it wakes takes the model's next job in
    fair order: common/job_store.py take)."""
    import json

    from common.job_store import JobStore

    job = client.post("/v1/jobs", json=GOOD).json()
    r = redis.Redis.from_url(settings.redis_url)
    messages = [json.loads(m) for m in r.lrange(settings.queue_name, 0, -1)]
    assert [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages] == [("sdxl.generate", "()")]
    assert messages[0]["headers"]["kwargsrepr"] == "{'model': None}"  # the default model's
    store = JobStore(r, settings.key_prefix, default_model=settings.model_entries[0].name)
    assert store.take("w", "another") is None and store.take("w") == job["id"]


def test_queue_position_counts_jobs_ahead(client):
    ids = [client.post("/v1/jobs", json=GOOD).json()["id"] for _ in range(3)]
    assert [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]


def test_cancel_queued_job(client, settings):
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json() == {"id": job_id, "status": "canceled", "outcome": "never_ran"}
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already ended (canceled)" in again.json()["detail"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["queue_position"] is None and job["expires_at"] == job["finished_at"] + settings.job_ttl_s
    ttl_s = redis.Redis.from_url(settings.redis_url).ttl(Keys(settings.key_prefix).job(job_id))
    assert settings.job_ttl_s - 5 <= ttl_s <= settings.job_ttl_s  # expires_at is when Redis drops the record


def test_unknown_job_is_404(client):
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_idempotency_key(client):
    h = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json=GOOD, headers=h)
    second = client.post("/v1/jobs", json=GOOD, headers=h)
    assert first.status_code == 202 and second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["request"]["seed"] == second.json()["request"]["seed"]
    other = client.post("/v1/jobs", json={**GOOD, "prompt": "a dog"}, headers=h)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]


def test_list_is_paginated_newest_first(client):
    ids = [client.post("/v1/jobs", json=GOOD).json()["id"] for _ in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert [j["id"] for j in client.get("/v1/jobs", params={"offset": 2}).json()["jobs"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"limit": 1000}).status_code == 422


@pytest.mark.parametrize(
    "body,field,hint",
    [
        ({"width": 1024, "height": 1024}, "prompt", "Field required"),
        ({**GOOD, "prompt": ""}, "prompt", "at least 1 character"),
        ({**GOOD, "width": 512, "height": 512}, "width", "choose one of: 1024x1024"),
        ({**GOOD, "width": 96, "height": 1024}, "height", "choose one of"),
        ({**GOOD, "steps": 0}, "steps", "greater than or equal to 1"),
        ({**GOOD, "steps": 151}, "steps", "less than or equal to 150"),
        ({**GOOD, "guidance_scale": "NaN"}, "guidance_scale", "finite"),
        ({**GOOD, "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ({**GOOD, "seed": -1}, "seed", "greater than or equal to 0"),
        ({**GOOD, "seed": 2**32}, "seed", "less than or equal to 4294967295"),
        ({**GOOD, "num_images": 0}, "num_images", "greater than or equal to 1"),
        ({**GOOD, "num_images": 5}, "num_images", "at most 4 per job"),
        ({**GOOD, "scheduler": "heun"}, "scheduler", "'euler', 'euler_ancestral', 'dpmpp_2m_karras', 'ddim' or 'lcm'"),
        ({**GOOD, "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({**GOOD, "prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({**GOOD, "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({**GOOD, "steps": "many"}, "steps", "valid integer"),
        ({**GOOD, "preview": "yes"}, "preview", "valid boolean"),
        ({**GOOD, "preview": 1}, "preview", "valid boolean"),
        ({**GOOD, "preview": None}, "preview", "valid boolean"),
    ],
)
def test_bad_requests_name_the_field(client, body, field, hint):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert any(f["field"] == field for f in payload["errors"]), payload
    assert hint in payload["detail"] and field in payload["detail"]


def test_malformed_json_is_422(client):
    r = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]


def test_models_and_health(client):
    m = client.get("/v1/models").json()
    assert {"width": 96, "height": 64} in m["sizes"] and m["schedulers"] == [
        "euler",
        "euler_ancestral",
        "dpmpp_2m_karras",
        "ddim",
        "lcm",
    ]
    assert m["timestep_spacings"] == ["leading", "linspace", "trailing"] and "init_image" in m["options"]
    assert m["limits"]["max_steps"] == 150 and m["limits"]["max_wait_s"] == 55
    assert client.get("/healthz").json() == {"ok": True}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "no live worker" in ready.json()["problems"]


def test_readyz_sees_a_worker_heartbeat(client, settings):
    from common.worker_registry import WorkerRegistry
    from common.worker_status import WorkerStatus

    workers = WorkerRegistry(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    workers.beat(WorkerStatus("w1", "tiny", [(64, 96)], 4, 1, started_at=1.0, at=2.0), ttl_s=15)
    assert client.get("/readyz").json() == {"ready": True, "workers": 1, "problems": []}


def test_local_files_need_a_valid_signature(client, settings):
    storage = LocalStorage(settings.local_storage_dir, "http://testserver", settings.signing_key())
    storage.put("images/x/0.png", b"\x89PNG...", "image/png")
    url = storage.url("images/x/0.png", 60)
    ok = client.get(url)
    assert ok.status_code == 200 and ok.content == b"\x89PNG..." and ok.headers["content-type"] == "image/png"
    assert client.get(url.replace("signature=", "signature=0")).status_code == 403
    assert client.get(url.replace("0.png", "1.png")).status_code == 403
    expired = storage.url("images/x/0.png", -5)
    r = client.get(expired)
    assert r.status_code == 403 and "expired" in r.json()["detail"]


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/models", "/readyz"} <= set(spec["paths"])
    # each handler's one-line docstring is its summary; longer text, where there is any, its description
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert all(op["summary"].endswith(".") and "\n" not in op["summary"] for op in operations), operations
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert submit["summary"] == "Submit a text-to-image job." and "Prefer: wait=N" in submit["description"]


def test_redis_down_is_503_with_retry_after(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as c:
        r = c.post("/v1/jobs", json=GOOD, headers={"Authorization": "Bearer sdxl_any_key"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert "unreachable" in r.json()["detail"]


# ---------------------------------------------------------------- access


def test_no_key_or_a_bad_key_is_401(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/jobs", json=GOOD)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
        assert r.headers["WWW-Authenticate"] == "Bearer"
        bad = c.get("/v1/jobs", headers={"Authorization": "Bearer sdxl_nope_nope"})
        assert bad.status_code == 401 and "unknown or revoked" in bad.json()["detail"]
        assert c.get("/healthz").status_code == 200 and c.get("/v1/models").status_code == 200  # public


def test_revoked_key_is_refused(client, settings):
    from common.api_keys import ApiKeyStore

    keys = ApiKeyStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    key_id = client.headers["Authorization"].split("_")[1]
    assert client.get("/v1/jobs").status_code == 200
    assert keys.revoke(key_id)
    assert client.get("/v1/jobs").status_code == 401


def test_keys_are_stored_hashed(client, settings):
    key = client.headers["Authorization"].removeprefix("Bearer ")
    r = redis.Redis.from_url(settings.redis_url)
    names = [name for glob in Keys(settings.key_prefix).everything for name in r.scan_iter(match=glob)]
    assert any(r.type(name) == b"hash" for name in names)  # the key's own record among them
    for name in names:
        if r.type(name) == b"hash":
            assert key.encode() not in b"".join(k + v for k, v in r.hgetall(name).items())


def test_another_tenants_job_is_404_everywhere(client, settings):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    mine = client.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "same"}).json()["id"]
    with TestClient(create_app(settings)) as other:
        authorize(other, settings, tenant="other")
        assert other.get(f"/v1/jobs/{mine}").status_code == 404
        assert other.post(f"/v1/jobs/{mine}/cancel").status_code == 404
        assert other.get("/v1/jobs").json()["total"] == 0
        theirs = other.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "same"}).json()["id"]
        assert theirs != mine  # idempotency keys are per tenant
    assert client.get(f"/v1/jobs/{mine}").json()["status"] == "queued"  # untouched


def test_rate_limits_count_reads_and_writes_apart(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    limits = {"rate_limit_per_min": 2, "read_rate_limit_per_min": 3}
    with TestClient(create_app(settings.model_copy(update=limits))) as c:
        authorize(c, settings)
        codes = [c.get("/v1/jobs").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/v1/jobs")
        assert 1 <= int(r.headers["Retry-After"]) <= 61
        assert "3 read requests per minute" in r.json()["detail"] and "?wait_s=" in r.json()["detail"]
        # polling used up the reads, not the writes
        writes = [c.post("/v1/jobs", json=GOOD).status_code for _ in range(3)]
        assert writes == [202, 202, 429]
        r = c.post("/v1/jobs", json=GOOD)
        assert "2 write requests per minute" in r.json()["detail"] and "wait_s" not in r.json()["detail"]


def test_queued_cap_is_429(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    with TestClient(create_app(settings.model_copy(update={"max_queued_per_tenant": 2}))) as c:
        authorize(c, settings)
        answers = [c.post("/v1/jobs", json=GOOD) for _ in range(3)]
        assert [r.status_code for r in answers] == [202, 202, 429]
        assert "already has 2 queued jobs" in answers[2].json()["detail"] and answers[2].headers["Retry-After"]
        assert c.get("/v1/jobs").json()["total"] == 2  # the refused job was not stored
        replay = c.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "k"})
        assert replay.status_code == 429  # new work at the cap
        first = c.get("/v1/jobs").json()["jobs"][-1]["id"]
        c.post(f"/v1/jobs/{first}/cancel")  # one fewer queued: room again
        made = c.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "k"})
        assert made.status_code == 202  # now at the cap again
        again = c.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "k"})
        assert again.status_code == 200 and again.json()["id"] == made.json()["id"]  # a replay is still answered
        c.post(f"/v1/jobs/{made.json()['id']}/cancel")
        r = c.post("/v1/jobs", json=GOOD)
        assert r.status_code == 202


def test_oversized_body_is_413(client):
    r = client.post(
        "/v1/jobs", content=b'{"prompt": "' + b"x" * 70_000 + b'"}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["detail"]


def test_a_chunked_body_over_the_limit_is_413_too(client):
    """No Content-Length (chunked): the limit is counted on the stream, and the answer is still a 413 problem,
    not the 400 "error parsing the body" the app gives when its body read is cut off."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["status"] == 413
    small = client.post(
        "/v1/jobs",
        content=iter([b'{"prompt": "a', b' cat", "steps": 2}']),
        headers={"Content-Type": "application/json"},
    )
    assert small.status_code == 202, small.text


def test_keys_command(settings, monkeypatch, capsys):
    from api import keys

    monkeypatch.setenv("SDXL_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("SDXL_KEY_PREFIX", settings.key_prefix)
    from common.settings import get_settings

    get_settings.cache_clear()
    try:
        assert keys.main(["create", "--tenant", "acme", "--name", "ci"]) == 0
        key = capsys.readouterr().out.strip()
        assert key.startswith("sdxl_")
        assert keys.main(["list"]) == 0
        listed = capsys.readouterr().out
        assert "acme\tactive\tci" in listed and key not in listed
        key_id = key.split("_")[1]
        assert keys.main(["revoke", key_id]) == 0 and keys.main(["revoke", "nope"]) == 1
        assert keys.main(["create", "--tenant", "bad tenant!"]) == 2
    finally:
        get_settings.cache_clear()


def test_webhook_url_is_checked_at_submit(client, settings):
    r = client.post("/v1/jobs", json={**GOOD, "webhook_url": "https://93.184.215.14/hook"})
    assert r.status_code == 422 and "webhooks are not configured" in r.json()["detail"]
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    with TestClient(create_app(settings.model_copy(update={"webhook_secret": "whsec_" + "A" * 32}))) as c:
        authorize(c, settings)
        bad = c.post("/v1/jobs", json={**GOOD, "webhook_url": "http://169.254.169.254/latest"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "webhook_url"
        assert "non-public address" in bad.json()["detail"]
        assert c.post("/v1/jobs", json={**GOOD, "webhook_url": "https://93.184.215.14/hook"}).status_code == 202


@pytest.mark.parametrize("port", ["99999", "http", "-1"])
def test_a_webhook_url_with_a_bad_port_is_a_422_naming_the_field(settings, port):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    with TestClient(create_app(settings.model_copy(update={"webhook_secret": "whsec_" + "A" * 32}))) as c:
        authorize(c, settings)
        r = c.post("/v1/jobs", json={**GOOD, "webhook_url": f"https://93.184.215.14:{port}/hook"})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "webhook_url" and "port" in r.json()["detail"]


def test_status_url_is_built_on_the_public_base_url_not_the_host_header(client):
    job = client.post("/v1/jobs", json=GOOD, headers={"Host": "evil.example"}).json()
    assert job["status_url"] == f"http://testserver/v1/jobs/{job['id']}"  # tests/api/conftest.py's public_base_url
    got = client.get(f"/v1/jobs/{job['id']}", headers={"Host": "evil.example:666"}).json()
    assert got["status_url"] == job["status_url"]


def test_malformed_json_names_the_body_not_a_character_offset(client):
    r = client.post("/v1/jobs", content=b'{"prompt": "a cat",, }', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    (error,) = r.json()["errors"]
    assert error["field"] == "body" and "not valid JSON" in error["message"], r.json()


def test_absent_width_and_height_are_the_first_served_size(client, settings):
    r = client.post("/v1/jobs", json={"prompt": "a cat", "steps": 2})
    assert r.status_code == 202, r.text
    (h, w) = settings.served_sizes[0]
    assert (r.json()["request"]["width"], r.json()["request"]["height"]) == (w, h)
    narrow = client.post("/v1/jobs", json={"prompt": "a cat", "width": 96})  # only 96x64 has width 96
    assert (narrow.json()["request"]["width"], narrow.json()["request"]["height"]) == (96, 64)
    unserved = client.post("/v1/jobs", json={"prompt": "a cat", "height": 333})
    assert unserved.status_code == 422 and unserved.json()["errors"][0]["field"] == "height"
