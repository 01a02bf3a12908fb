"""The data set API against a real Redis and local storage, with no worker: submit (upload or object key),
bad lines, idempotency, status, cancel, files, tenants. Generation runs in tests/test_datasets.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import redis

from common.datasets import DatasetStatus, Layout, derive_seed
from tests.helpers.servers import authorize

GOOD = [{"id": f"p{i}", "prompt": f"a picture of {i}"} for i in range(5)]
OPTIONS = {"defaults": {"width": 96, "height": 64, "steps": 4}, "seed": 11, "shard_size": 2}


def jsonl(lines) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(client, lines, options=OPTIONS, **kw):
    files = {"input": ("prompts.jsonl", jsonl(lines), "application/x-ndjson")}
    return client.post("/v1/datasets", files=files, data={"options": json.dumps(options)}, **kw)


def raw_redis(client) -> redis.Redis:
    """A client of the API's Redis, to stage what the feeder would have written."""
    return redis.Redis.from_url(client.app.state.services.settings.redis_url)


def stored(client, settings, run_id: str) -> list[dict]:
    storage = client.app.state.services.storage
    return [json.loads(x) for x in storage.get(Layout(run_id).chunk(0)).splitlines()]


def test_upload_is_validated_stored_and_answered_with_the_run(client, settings):
    r = upload(client, GOOD)
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["status"] == "running" and run["seed"] == 11
    assert run["counts"] == {
        "total": 5,
        "queued": 5,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
        "skipped": 0,
    }
    assert run["status_url"].endswith(f"/v1/datasets/{run['id']}") and run["output_prefix"] == f"datasets/{run['id']}"
    lines = stored(client, settings, run["id"])
    assert [x["line"] for x in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["request"]["seed"] == derive_seed(11, "p0") and lines[0]["request"]["width"] == 96
    original = client.app.state.services.storage.get(Layout(run["id"]).original)
    assert original == jsonl(GOOD)  # the input as sent is kept beside the normalized chunks
    assert client.get(f"/v1/datasets/{run['id']}").json()["counts"]["total"] == 5


def test_bad_lines_are_reported_by_number_and_nothing_is_stored(client, settings):
    lines = [GOOD[0], "{oops", {"id": "p1", "prompt": "x", "steps": 999}, GOOD[1], {"id": "p0", "prompt": "dup"}]
    r = upload(client, lines)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["invalid_lines"] == 3 and "on_invalid=skip" in body["detail"]
    assert [(e["line"], e["field"]) for e in body["lines"]] == [(2, "line"), (3, "steps"), (5, "id")]
    assert "first used on line 1" in body["lines"][2]["message"]
    assert client.get("/v1/datasets").json()["total"] == 0
    assert not (client.app.state.services.storage.root / "datasets").exists()


def test_skip_runs_the_valid_lines_and_lists_the_rest(client, settings):
    r = upload(client, [*GOOD, {"id": "bad", "prompt": "x", "width": 7}], options={**OPTIONS, "on_invalid": "skip"})
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["counts"]["total"] == 5 and run["counts"]["skipped"] == 1
    assert run["invalid_lines"] == [{"line": 6, "field": "width", "message": run["invalid_lines"][0]["message"]}]
    files = client.get(f"/v1/datasets/{run['id']}/files").json()
    assert files["invalid"] and files["shards"] == [] and files["manifest_jsonl"] is None


def test_nothing_valid_is_refused(client):
    r = upload(client, ["{}", ""], options={"on_invalid": "skip"})
    assert r.status_code == 422 and "no valid line" in r.json()["detail"]
    assert upload(client, []).status_code == 422


def test_input_from_an_object_key(client, settings):
    storage = client.app.state.services.storage
    storage.put("inputs/test/team/prompts.jsonl", jsonl(GOOD), "application/x-ndjson")  # tenant "test"'s folder
    r = client.post("/v1/datasets", json={**OPTIONS, "input_key": "inputs/test/team/prompts.jsonl"})
    assert r.status_code == 202, r.text
    assert r.json()["counts"]["total"] == 5
    missing = client.post("/v1/datasets", json={"input_key": "inputs/test/none.jsonl"})
    assert missing.status_code == 422 and "no object at input_key" in missing.json()["detail"]
    outside = client.post("/v1/datasets", json={"input_key": "images/x/0.png"})
    assert outside.status_code == 422 and "must be under 'inputs/test/'" in outside.json()["detail"]
    climbing = client.post("/v1/datasets", json={"input_key": "inputs/test/../other/prompts.jsonl"})
    assert climbing.status_code == 422 and "must be under" in climbing.json()["detail"]
    assert client.post("/v1/datasets", json={}).json()["errors"][0]["field"] == "input_key"


def test_input_key_reads_only_the_tenants_own_folder(client, settings):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.helpers.servers import authorize

    # the manifest of a run holds its input's prompts: reading another tenant's input would leak them
    storage = client.app.state.services.storage
    storage.put("inputs/test/secret.jsonl", jsonl(GOOD), "application/x-ndjson")
    storage.put("inputs/testing/theirs.jsonl", jsonl(GOOD), "application/x-ndjson")
    with TestClient(create_app(settings)) as other:
        authorize(other, settings, tenant="testing")  # a tenant whose name starts with the first one's
        r = other.post("/v1/datasets", json={**OPTIONS, "input_key": "inputs/test/secret.jsonl"})
        assert r.status_code == 422 and "must be under 'inputs/testing/'" in r.json()["detail"]
        own = other.post("/v1/datasets", json={**OPTIONS, "input_key": "inputs/testing/theirs.jsonl"})
        assert own.status_code == 202, own.text
    r = client.post("/v1/datasets", json={**OPTIONS, "input_key": "inputs/testing/theirs.jsonl"})
    assert r.status_code == 422 and "must be under 'inputs/test/'" in r.json()["detail"]
    with TestClient(create_app(settings.model_copy(update={"auth_required": False}))) as single:
        # without API keys there is one tenant, and the whole prefix is its folder
        assert single.post("/v1/datasets", json={**OPTIONS, "input_key": "inputs/test/secret.jsonl"}).status_code == 202


@pytest.mark.parametrize(
    "options,field",
    [
        ({"shard_size": 0}, "shard_size"),
        ({"on_invalid": "ignore"}, "on_invalid"),
        ({"defaults": {"steps": 0}}, "defaults.steps"),
        ({"colour": 1}, "colour"),
    ],
)
def test_bad_options_name_the_field(client, options, field):
    r = upload(client, GOOD, options=options)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, r.text


def test_other_content_types_are_refused_with_a_hint(client):
    r = client.post("/v1/datasets", content=jsonl(GOOD), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_idempotent_submit(client):
    h = {"Idempotency-Key": "set-1"}
    first, second = upload(client, GOOD, headers=h), upload(client, GOOD, headers=h)
    assert first.status_code == 202 and second.status_code == 200 and first.json()["id"] == second.json()["id"]
    assert client.get("/v1/datasets").json()["total"] == 1
    other = upload(client, GOOD[:2], headers=h)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]


def test_cancel_retry_and_failures(client):
    run_id = upload(client, GOOD).json()["id"]
    assert client.post(f"/v1/datasets/{run_id}/retry").status_code == 409  # nothing failed
    r = client.post(f"/v1/datasets/{run_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceling"
    assert client.post(f"/v1/datasets/{run_id}/cancel").status_code == 409
    assert client.get(f"/v1/datasets/{run_id}/failures").json() == {
        "failures": [],
        "total": 0,
        "offset": 0,
        "limit": 100,
    }


def test_failed_lines_are_listed_and_retried_over_http(client):
    run_id = upload(client, GOOD).json()["id"]
    datasets, r = client.app.state.services.datasets, raw_redis(client)
    # What the feeder records when a line's job fails (tests/worker/test_feeder.py runs the real thing).
    for index in (3, 1):
        r.hset(datasets.keys.run(run_id).inflight, index, f"job{index}")
        datasets.reap(run_id, index, "none", "failed", {"line": index + 1, "id": f"p{index}", "error": "engine error"})
    page = client.get(f"/v1/datasets/{run_id}/failures", params={"limit": 1}).json()
    assert page["total"] == 2 and page["failures"] == [{"line": 2, "id": "p1", "error": "engine error"}]
    assert client.get(f"/v1/datasets/{run_id}").json()["counts"]["failed"] == 2
    r = client.post(f"/v1/datasets/{run_id}/retry")
    assert r.status_code == 200 and r.json()["retried"] == 2
    assert r.json()["dataset"]["counts"]["failed"] == 0 and datasets.retry_pending(run_id) == 2
    assert client.get(f"/v1/datasets/{run_id}/failures").json()["total"] == 0


def test_a_tenant_has_at_most_its_cap_of_runs_in_progress(settings, monkeypatch):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"max_active_datasets_per_tenant": 2}))) as c:
        authorize(c, settings)
        assert [upload(c, GOOD).status_code for _ in range(2)] == [202, 202]
        refused = upload(c, GOOD)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
        assert "already has 2 data set runs in progress (the limit is 2)" in refused.json()["detail"]
        assert c.get("/v1/datasets").json()["total"] == 2
        runs = settings.local_storage_dir + "/datasets"
        assert len(list(Path(runs).iterdir())) == 2  # refused before its file was read: nothing stored
        # Two uploads that both pass the first count: the second is refused when the run is stored, and what
        # its ingest wrote is removed, its Idempotency-Key freed.
        datasets = c.app.state.services.datasets
        monkeypatch.setattr(datasets, "active_count", lambda tenant: 0)
        late = upload(c, GOOD, headers={"Idempotency-Key": "late"})
        assert late.status_code == 429 and "in progress" in late.json()["detail"]
        accepted = {r["id"] for r in c.get("/v1/datasets").json()["datasets"]}
        assert {p.relative_to(runs).parts[0] for p in Path(runs).rglob("*") if p.is_file()} == accepted
        assert datasets.idempotent_run("test", hashlib.sha256(b"late").hexdigest()) is None
        other = TestClient(c.app)
        authorize(other, settings, tenant="other")  # another tenant's cap is its own
        assert upload(other, GOOD).status_code == 202
        monkeypatch.undo()
        first = c.get("/v1/datasets").json()["datasets"][-1]["id"]
        c.post(f"/v1/datasets/{first}/cancel")
        assert upload(c, GOOD).status_code == 429  # canceling still holds its place until the run winds down
        assert datasets.finish(first, DatasetStatus.canceling, DatasetStatus.canceled)
        assert upload(c, GOOD).status_code == 202  # room again


def test_another_tenants_run_is_not_found(client, settings):
    run_id = upload(client, GOOD).json()["id"]
    authorize(client, settings, tenant="someone-else")
    for path in ("", "/files", "/failures"):
        assert client.get(f"/v1/datasets/{run_id}{path}").status_code == 404
    assert client.post(f"/v1/datasets/{run_id}/cancel").status_code == 404
    assert client.get("/v1/datasets").json()["total"] == 0


def test_upload_size_has_its_own_limit(client, settings):
    big = jsonl([{"id": f"p{i}", "prompt": "x" * 50} for i in range(2000)])  # ~150 kB: over the job body limit
    assert len(big) > settings.max_body_bytes
    files = {"input": ("p.jsonl", big, "application/x-ndjson")}
    assert client.post("/v1/datasets", files=files, data={"options": json.dumps(OPTIONS)}).status_code == 202
    assert client.post("/v1/jobs", content=big, headers={"content-type": "application/json"}).status_code == 413


def test_an_upload_over_the_data_set_limit_is_413(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    small = settings.model_copy(update={"max_dataset_bytes": 4096})
    with TestClient(create_app(small)) as c:
        authorize(c, small)
        r = upload(c, [{"id": f"p{i}", "prompt": "x" * 100} for i in range(100)])
        assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["detail"]
        assert c.get("/v1/datasets").json()["total"] == 0


def test_no_eta_while_no_line_finishes(client, settings):
    """A run whose lines wait out a recovery (or an outage) finishes none for a while: its status says how
    long it has stalled and gives no ETA, instead of the last rate's few seconds; the ETA returns with
    progress. The feeder's progress samples are written here as it writes them."""
    import time

    run_id = upload(client, [{"id": f"q{i}", "prompt": f"a field {i}"} for i in range(40)]).json()["id"]
    datasets = client.app.state.services.datasets
    now = time.time()
    for t, done in [(-60, 0), (-55, 20), (-50, 30)]:  # 30 lines in 10 s, then nothing for 50 s
        datasets.sample_rate(run_id, done, now=now + t)
    for t in range(-45, 0, 5):
        datasets.sample_rate(run_id, 30, now=now + t)
    raw_redis(client).hset(datasets.keys.run(run_id).record, "succeeded", 30)
    stalled = client.get(f"/v1/datasets/{run_id}").json()
    assert stalled["eta_s"] is None and 45 <= stalled["stalled_s"] <= 52, stalled
    datasets.sample_rate(run_id, 31, now=time.time() + 5)  # a line finished: moving again
    raw_redis(client).hset(datasets.keys.run(run_id).record, "succeeded", 31)
    moving = client.get(f"/v1/datasets/{run_id}").json()
    assert moving["stalled_s"] is None and moving["eta_s"] > 0, moving


def test_resume_over_http_feeds_the_canceled_lines_again(client):
    run_id = upload(client, GOOD).json()["id"]
    datasets = client.app.state.services.datasets
    assert client.post(f"/v1/datasets/{run_id}/resume").status_code == 409  # running: nothing to resume
    # What the feeder does on cancel (tests/worker/test_feeder.py runs the real thing): one line was fed and
    # canceled, two never fed, and the run wound down.
    assert datasets.mark_fed(run_id, 0, "job0", "cursor")
    datasets.reap(run_id, 0, "none", "canceled", {"line": 1, "id": "p0"})
    raw_redis(client).hset(datasets.keys.run(run_id).record, "cursor", 3)
    datasets.skip_rest(run_id, 3, 5)
    raw_redis(client).hset(datasets.keys.run(run_id).record, "status", DatasetStatus.canceled.value)
    assert client.get(f"/v1/datasets/{run_id}").json()["counts"]["canceled"] == 3
    r = client.post(f"/v1/datasets/{run_id}/resume")
    assert r.status_code == 200 and r.json()["resumed"] == 3, r.text
    body = r.json()["dataset"]
    assert body["status"] == "running" and body["counts"]["canceled"] == 0
    run = datasets.get(run_id)
    assert (run.cursor, datasets.retry_indices(run_id), run.retries) == (3, [0], 1)  # 3, 4 by the cursor again
    assert client.post(f"/v1/datasets/{run_id}/resume").status_code == 409
    assert client.post("/v1/datasets/nope/resume").status_code == 404


def test_a_bom_metadata_captions_and_several_images_per_line(client, settings):
    lines = [
        {"id": "a", "prompt": "a cat", "caption": "tabby", "metadata": {"label": 1}, "num_images": 2},
        {"id": "b", "prompt": "a dog"},
    ]
    files = {"input": ("p.jsonl", b"\xef\xbb\xbf" + jsonl(lines), "application/x-ndjson")}
    r = client.post("/v1/datasets", files=files, data={"options": json.dumps(OPTIONS)})
    assert r.status_code == 202, r.text
    assert r.json()["counts"]["total"] == 3  # one per image
    rows = stored(client, settings, r.json()["id"])
    assert [(x["id"], x["caption"], x["metadata"], x["source_id"]) for x in rows] == [
        ("a_0", "tabby", {"label": 1}, "a"),
        ("a_1", "tabby", {"label": 1}, "a"),
        ("b", "a dog", None, "b"),
    ]


def test_invalid_lines_keep_their_text(client):
    lines = [*GOOD, '{"id": "bad", "prompt": "p", "steps": 0}']
    r = upload(client, lines, {**OPTIONS, "on_invalid": "skip"})
    assert r.status_code == 202
    storage = client.app.state.services.storage
    (bad,) = [json.loads(x) for x in storage.get(Layout(r.json()["id"]).invalid).splitlines()]
    assert bad["line"] == 6 and bad["field"] == "steps" and bad["text"] == lines[-1]
