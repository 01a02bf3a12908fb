"""Data sets through the whole service: the HTTP API, Redis, Celery, real `python -m worker` processes, storage.

- 200 lines with the tiny JAX engine, S3 storage (SeaweedFS), driven by the CLI (interrupted and resumed),
  read back with webdataset, Hugging Face datasets and pyarrow;
- priority, resume after SIGKILL and cancel with the fixed-duration stand-in engine: those tests are about
  delivery and ordering, not the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from common import inputs
from common.api_keys import ApiKeyStore
from common.batch_log import BatchLog
from common.datasets import Layout, derive_seed
from common.job_store import JobStore
from common.jobs import JobStatus
from common.storage import S3Storage
from tests.helpers.servers import (
    REPO,
    ApiProcess,
    WorkerPool,
    WorkerProcess,
    authorize,
    settings_from,
    standin_env,
    wait_for,
)
from worker import images


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


# ---------------------------------------------------------------------- the tiny engine, end to end


@pytest.fixture(scope="module")
def tiny_stack(redis_url, s3, tiny_dir, compile_cache, tmp_path_factory):
    prefix = f"ds{uuid.uuid4().hex[:8]}"
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_BULK_QUEUE_NAME": f"{prefix}-bulk",
        "SDXL_MODEL": "tiny",
        "SDXL_TINY_DIR": str(tiny_dir),
        "SDXL_DTYPE": "float32",
        "SDXL_IMAGE_SIZES": "64x64,96x64,64x96",
        "SDXL_BATCH_ROWS": "8",
        "SDXL_ASPECT_BUCKETS": "64x64,96x64,64x96",
        "SDXL_BATCH_TIMEOUT_S": "0.5",
        "SDXL_DATASET_FEED_DEPTH": "32",
        "SDXL_URL_SIGNING_SECRET": "u" * 32,
        "SDXL_COMPILE_CACHE_DIR": str(compile_cache),
        **s3.env(),
    }
    logs = tmp_path_factory.mktemp("ds-logs")
    worker = WorkerProcess(env, logs / "worker.log")
    worker.start(redis_url, prefix)
    api = ApiProcess(env, logs / "api.log")
    api.start()
    _, key = ApiKeyStore(redis.Redis.from_url(redis_url), prefix).create("data-team")
    yield api, key, env
    api.stop()
    worker.stop()


# `python -m client.dataset` with SIGINT handled as in a terminal: a shell starts background jobs (nohup ... &,
# some CI runners) with SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt.
# (A preexec_fn would do it too, but forks a process that has JAX's threads.)
CLI = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('client.dataset', run_name='__main__', alter_sys=True)"
)


def run_cli(api: ApiProcess, key: str, *args: str, timeout_s: float = 600) -> tuple[int, str]:
    """One CLI command to its end: (exit status, what it printed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "client.dataset", *args, "--api", api.url, "--key", key],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return proc.returncode, proc.stdout + proc.stderr


def cli(api: ApiProcess, key: str, jsonl_path, out, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-c",
        CLI,
        str(jsonl_path),
        "--out",
        str(out),
        "--api",
        api.url,
        "--key",
        key,
        "--poll-s",
        "0.3",
        *extra,
    ]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_200_lines_to_a_local_folder_with_the_cli(tiny_stack, tmp_path):
    import webdataset as wds

    api, key, env = tiny_stack
    lines = [{"id": f"img-{i:03d}", "prompt": f"a watercolour of a lighthouse, variant {i}"} for i in range(200)]
    lines[5].update(seed=42, steps=3, scheduler="ddim", guidance_scale=1.0)  # a line's own parameters win
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(jsonl(lines))
    out = tmp_path / "out"
    options = ["--defaults", '{"width": 64, "height": 64, "steps": 2}', "--seed", "7", "--shard-size", "64"]

    # Interrupted once a shard is down, then the same command again: it resumes the same run.
    first = cli(api, key, source, out, *options)
    wait_for(lambda: any((out / "shards").glob("*.tar")) or first.poll() is not None, 300, 0.2)
    first.send_signal(signal.SIGINT)
    assert first.wait(30) == 130, first.stdout.read()
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    second = cli(api, key, source, out, *options)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    assert "completed: 200 images, 0 failed" in output
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as c:
        listing = c.get("/v1/datasets").json()
    assert listing["total"] == 1 and listing["datasets"][0]["id"] == run_id  # resumed, not resubmitted
    status = json.loads((out / "status.json").read_text())
    assert status["counts"] == {
        "total": 200,
        "queued": 0,
        "running": 0,
        "succeeded": 200,
        "failed": 0,
        "canceled": 0,
        "skipped": 0,
    }
    assert status["images_per_s"] > 0 and status["eta_s"] is None and status["finished_at"] >= status["started_at"]
    assert status["expires_at"] == status["finished_at"] + settings_from(env).job_ttl_s

    # Shards: 64 + 64 + 64 + 8 images, read back by webdataset.
    tars = sorted((out / "shards").glob("shard-*.tar"))
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(4)]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pil"))
    assert len(samples) == 200 and {s["__key__"] for s in samples} == {x["id"] for x in lines}
    assert all(s["png"].size == (64, 64) for s in samples)

    # The manifest (JSONL and Parquet) agrees with the shards, seeds and parameters.
    manifest = {m["id"]: m for m in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert len(manifest) == 200
    # the command downloads the shards, so the service kept no loose copy of any image (loose_images false)
    assert all(m["key"] is None and m["shard"].endswith(".tar") for m in manifest.values())
    storage = S3Storage(settings_from(env))
    assert list(storage.keys(Layout(run_id).images)) == [] and len(list(storage.keys(f"datasets/{run_id}/shards"))) == 4
    assert manifest["img-005"]["seed"] == 42 and manifest["img-005"]["scheduler"] == "ddim"
    assert manifest["img-006"]["seed"] == derive_seed(7, "img-006") and manifest["img-006"]["steps"] == 2
    raw = {s["__key__"]: s for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)}
    for line_id in ("img-000", "img-005", "img-199"):
        png = raw[line_id]["png"]
        assert hashlib.sha256(png).hexdigest() == manifest[line_id]["sha256"]
        params = images.read_parameters(png)  # the parameters travel inside each PNG too
        assert params["seed"] == manifest[line_id]["seed"] and params["prompt"] == manifest[line_id]["prompt"]
        assert json.loads(raw[line_id]["json"]) == manifest[line_id]

    # Hugging Face datasets loads both the shards and the Parquet manifest.
    from datasets import load_dataset

    shards = load_dataset("webdataset", data_files={"train": [str(t) for t in tars]}, split="train")
    assert shards.num_rows == 200 and set(shards.column_names) >= {"__key__", "png", "json"}
    table = load_dataset("parquet", data_files=str(out / "manifest.parquet"), split="train")
    assert table.num_rows == 200 and set(table["id"]) == set(manifest)
    assert (out / "failures.jsonl").read_text() == ""

    # Reproducible: the same lines and run seed in a new run give the same pictures.
    again = tmp_path / "again.jsonl"
    again.write_bytes(jsonl([x for x in lines if x["id"] in ("img-005", "img-006", "img-100")]))
    rerun = cli(api, key, again, tmp_path / "out2", *options)
    assert rerun.wait(300) == 0, rerun.stdout.read()
    rerun_samples = {
        s["__key__"]: s
        for s in wds.WebDataset(
            [str(t) for t in sorted((tmp_path / "out2" / "shards").glob("*.tar"))], shardshuffle=False
        )
    }
    assert sorted(rerun_samples) == ["img-005", "img-006", "img-100"]
    for line_id, sample in rerun_samples.items():
        a = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(raw[line_id]["png"])), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, line_id  # same seed, same image (other batch neighbours: <= 1/255)


def test_the_cli_prints_bad_lines_and_stores_nothing(tiny_stack, tmp_path):
    api, key, _ = tiny_stack
    source = tmp_path / "bad.jsonl"
    source.write_bytes(jsonl([{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": "x", "steps": 0}]))
    proc = cli(api, key, source, tmp_path / "out", "--defaults", '{"width": 64, "height": 64}', "--no-progress")
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and "line 2: steps: Input should be greater than or equal to 1" in output, output
    assert not (tmp_path / "out" / "run.json").exists()


def test_two_runs_of_one_file_give_the_same_bytes_and_carry_the_users_fields(tiny_stack, tmp_path):
    """The same 300-line file and run seed, run twice at once into two folders (so batches mix both runs' lines
    differently): every image byte-identical, manifests equal but for the run ids; metadata and captions read
    back by webdataset and by Hugging Face `datasets` from the folder as it is (its card); aspect-ratio buckets
    and several images per line end to end; a line of image-to-image and inpainting (its images by the tenant's
    stored keys, stored at other sizes than the line's) with a timestep spacing."""
    import webdataset as wds
    from datasets import load_dataset

    api, key, env = tiny_stack
    storage = S3Storage(settings_from(env))
    keys = []
    for image in (
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), np.uint8)),
        Image.new("L", (128, 128), 255),
    ):
        digest, data = inputs.encode(image)
        keys.append(inputs.key("data-team", digest))  # as a job of the tenant would have stored it
        storage.put(keys[-1], data, "image/png")
    lines = []
    for i in range(300):
        line: dict = {"id": f"s{i:03d}", "prompt": f"a study of shapes, number {i}"}
        if i % 3 == 0:
            line["metadata"] = {"label": i % 7, "split": "val" if i % 2 else "train", "source": f"src-{i}"}
        if i % 5 == 0:
            line["caption"] = f"caption for {i}"
        lines.append(line)
    lines[10]["aspect_ratio"] = "3:2"  # -> 96x64
    lines[11]["aspect_ratio"] = 0.6  # -> 64x96
    lines[13]["num_images"] = 2  # -> s013_0, s013_1
    edit = {"init_image": keys[0], "mask_image": keys[1], "strength": 0.5, "timestep_spacing": "trailing"}
    lines[14] |= edit | {"width": 64, "height": 64}  # the worker resizes both images to the line's size
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(jsonl(lines))
    options = ["--defaults", '{"steps": 2}', "--seed", "5", "--shard-size", "100", "--order", "input", "--no-progress"]
    runs = [cli(api, key, source, tmp_path / f"out{k}", *options) for k in (1, 2)]
    for proc in runs:
        assert proc.wait(600) == 0, proc.stdout.read()
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    run_ids = [json.loads((o / "run.json").read_text())["run_id"] for o in (out1, out2)]
    assert run_ids[0] != run_ids[1]

    def manifest(out, run_id: str) -> list[dict]:
        text = (out / "manifest.jsonl").read_text().replace(run_id, "RUN")  # only `shard` names the run
        return [json.loads(x) for x in text.splitlines()]

    rows1, rows2 = manifest(out1, run_ids[0]), manifest(out2, run_ids[1])
    assert rows1 == rows2 and len(rows1) == 301  # the same rows in the same order (input order)
    assert [r["id"] for r in rows1[:15]] == [*[f"s{i:03d}" for i in range(13)], "s013_0", "s013_1"]

    def pngs(out) -> dict[str, bytes]:
        tars = sorted(str(t) for t in (out / "shards").glob("*.tar"))
        return {s["__key__"]: s["png"] for s in wds.WebDataset(tars, shardshuffle=False)}

    first, second = pngs(out1), pngs(out2)
    assert len(first) == 301 and first.keys() == second.keys()
    different = [k for k in first if first[k] != second[k]]
    assert different == [], f"{len(different)} images differ between the runs, e.g. {different[:3]}"
    assert all(hashlib.sha256(first[r["id"]]).hexdigest() == r["sha256"] for r in rows1)
    params = images.read_parameters(first["s000"])
    assert "job_id" not in params and params["model_hash"] == rows1[0]["model_hash"] and len(params["model_hash"]) == 64

    by_id = {r["id"]: r for r in rows1}
    assert (by_id["s010"]["width"], by_id["s010"]["height"], by_id["s010"]["aspect_ratio"]) == (96, 64, 1.5)
    assert (by_id["s011"]["width"], by_id["s011"]["height"]) == (64, 96)
    assert by_id["s013_1"]["source_id"] == "s013" and by_id["s013_1"]["seed"] == derive_seed(5, "s013_1")
    assert all(r["model"] == "tiny" and r["attempts"] == 1 and r["truncated"] is False for r in rows1)
    hashes = [inputs.content_hash(k) for k in keys]
    s014 = by_id["s014"]
    assert (s014["init_image_sha256"], s014["mask_image_sha256"], s014["strength"]) == (*hashes, 0.5)
    assert (s014["timestep_spacing"], s014["width"], s014["height"]) == ("trailing", 64, 64)
    assert images.read_parameters(first["s014"])["init_image_sha256"] == hashes[0]
    assert by_id["s000"]["init_image_sha256"] is None and by_id["s000"]["controlnets"] == []
    assert "inputs/" not in (out1 / "manifest.jsonl").read_text()  # never a key: its folder names the tenant

    samples = {
        s["__key__"]: s
        for s in wds.WebDataset(sorted(str(t) for t in (out1 / "shards").glob("*.tar")), shardshuffle=False)
    }
    for i in (0, 3, 5, 7):
        sidecar = json.loads(samples[f"s{i:03d}"]["json"])
        assert sidecar.get("metadata") == lines[i].get("metadata")  # verbatim, or null
        assert samples[f"s{i:03d}"]["txt"].decode() == lines[i].get("caption", lines[i]["prompt"])

    hf = load_dataset(str(out1), split="train")  # the card's YAML header: configs and declared features
    assert hf.num_rows == 301 and {"png", "json", "txt"} <= set(hf.column_names)
    found = {r["__key__"]: r for r in hf}
    assert found["s003"]["json"]["metadata"] == lines[3]["metadata"] and found["s005"]["txt"] == "caption for 5"
    assert found["s001"]["json"]["metadata"] is None and found["s010"]["png"].size == (96, 64)
    assert found["s014"]["json"]["init_image_sha256"] == hashes[0] and found["s001"]["json"]["refiner"] is None
    table = load_dataset("parquet", data_files=str(out1 / "manifest.parquet"), split="train")
    assert json.loads(table[3]["metadata"]) == lines[3]["metadata"]

    stats = json.loads((out1 / "stats.json").read_text())
    assert stats["counts"]["succeeded"] == 301 and [s["count"] for s in stats["shards"]] == [100, 100, 100, 1]
    assert (out1 / "README.md").read_text().startswith("---\nconfigs:")


def test_the_cli_commands_and_their_exit_codes(tiny_stack, tmp_path):
    api, key, _ = tiny_stack
    good = [{"id": f"g{i}", "prompt": f"a pebble {i}"} for i in range(4)]
    bad_line = '{"id": "bad", "prompt": "p", "steps": 0}'
    source = tmp_path / "skip.jsonl"
    source.write_text(jsonl(good).decode() + bad_line + "\n")
    out = tmp_path / "skip"
    code, said = run_cli(
        api,
        key,
        "run",
        str(source),
        "--out",
        str(out),
        "--defaults",
        '{"steps": 2}',
        "--on-invalid",
        "skip",
        "--no-progress",
    )
    assert code == 1, said  # one line was not generated
    assert (out / "remaining.jsonl").read_text() == bad_line + "\n" and "1 lines not generated" in said
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    code, said = run_cli(api, key, "status", run_id)
    assert code == 0 and said.startswith(f"{run_id}  completed") and "4/4 succeeded" in said
    code, said = run_cli(api, key, "status", run_id, "--json")
    assert code == 0 and json.loads(said)["counts"]["skipped"] == 1
    code, said = run_cli(api, key, "list")
    assert code == 0 and run_id in said
    for command, message in (("retry", "no failed lines"), ("resume", "only a canceled run")):
        code, said = run_cli(api, key, command, run_id)
        assert code == 4 and said.startswith("refused: 409") and message in said and "Traceback" not in said, said
    code, said = run_cli(api, key, "status", "no-such-run")
    assert code == 4 and said.startswith("refused: 404"), said
    code, said = run_cli(api, "sdxl_not_a_key", "status", run_id)
    assert code == 4 and said.startswith("refused: 401") and said[-1] == "\n" and said.count("\n") == 1, said
    code, said = run_cli(api, key, "run", str(source), "--out", str(tmp_path / "x"), "--defaults", "{nope")
    assert code == 2 and said.startswith("refused: --defaults is not JSON"), said
    code, said = run_cli(api, key, "run", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "y"))
    assert code == 2 and "no such file" in said, said
    code, said = run_cli(api, key, "resume")
    assert code == 2 and "the following arguments are required: run_id" in said
    code, said = run_cli(api, key, "download", run_id, "--out", str(tmp_path / "dl"))
    assert code == 0 and (tmp_path / "dl" / "stats.json").exists() and (tmp_path / "dl" / "README.md").exists()
    assert len(list((tmp_path / "dl" / "shards").glob("*.tar"))) == 1

    # cancel -> exit 1 with the canceled lines in remaining.jsonl -> resume -> the same run command: exit 0
    slow = [{"id": f"c{i:02d}", "prompt": f"a pebble {i}"} for i in range(40)]
    source = tmp_path / "slow.jsonl"
    source.write_bytes(jsonl(slow))
    out = tmp_path / "slow"
    args = ["run", str(source), "--out", str(out), "--defaults", '{"steps": 40}', "--shard-size", "8", "--no-progress"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "client.dataset", *args, "--api", api.url, "--key", key, "--poll-s", "0.3"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: (out / "run.json").exists(), 60, 0.2)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as c:
        wait_for(lambda: c.get(f"/v1/datasets/{run_id}").json()["counts"]["succeeded"] >= 1, 300, 0.2)
    code, said = run_cli(api, key, "cancel", run_id)
    assert code == 0 and "canceling" in said, said
    assert follower.wait(300) == 1, follower.stdout.read()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "canceled" and status["counts"]["canceled"] > 0
    remaining = [json.loads(x)["id"] for x in (out / "remaining.jsonl").read_text().splitlines()]
    assert len(remaining) == status["counts"]["canceled"]
    code, said = run_cli(api, key, "resume", run_id)
    assert code == 0 and said.startswith(f"{status['counts']['canceled']} canceled lines sent back"), said
    code, said = run_cli(api, key, *args, "--poll-s", "0.3")
    assert code == 0 and "completed: 40 images, 0 failed, 0 canceled" in said, said
    assert not (out / "remaining.jsonl").exists()
    ids = [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"c{i:02d}" for i in range(40)]


# ---------------------------------------------------------------------- the stand-in engine: delivery


@pytest.fixture
def standin_stack(redis_url, tmp_path, request):
    overrides = {
        "SDXL_STANDIN_BATCH_S": "0.5",
        "SDXL_BATCH_TIMEOUT_S": "0.3",
        "SDXL_DATASET_FEED_DEPTH": "40",
        **getattr(request, "param", {}),
    }
    prefix, env = standin_env(
        redis_url, tmp_path, "dsb", SDXL_BULK_QUEUE_NAME=f"{uuid.uuid4().hex[:6]}-bulk", **overrides
    )
    settings = settings_from(env)
    pool = WorkerPool(env, redis_url, prefix, tmp_path)

    def make_client() -> TestClient:
        client = TestClient(create_app(settings))
        client.__enter__()
        authorize(client, settings, tenant="bulk")
        return client

    clients: list[TestClient] = []

    def client() -> TestClient:
        clients.append(make_client())
        return clients[-1]

    yield client, pool.start, settings
    for c in clients:
        c.__exit__(None, None, None)
    pool.close()


def submit(client, n: int, **options) -> str:
    lines = [{"id": f"l{i:03d}", "prompt": f"p{i}"} for i in range(n)]
    opts = {"defaults": {"width": 64, "height": 64, "steps": 2}, **options}
    r = client.post("/v1/datasets", files={"input": ("x.jsonl", jsonl(lines))}, data={"options": json.dumps(opts)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def counts(client, run_id: str) -> dict:
    return client.get(f"/v1/datasets/{run_id}").json()["counts"]


def test_interactive_jobs_go_before_waiting_bulk_lines(standin_stack):
    client_of, start_worker, _ = standin_stack
    start_worker()
    client = client_of()
    run_id = submit(client, 40, shard_size=10)  # 40 lines = 10 batches of 4; depth 40: all on the bulk queue
    wait_for(lambda: counts(client, run_id)["succeeded"] >= 4, 60)
    before = counts(client, run_id)
    waiting = before["total"] - before["succeeded"] - before["running"]
    ids = []
    for i in range(4):
        r = client.post("/v1/jobs", json={"prompt": f"urgent {i}", "width": 64, "height": 64, "steps": 2})
        assert r.status_code == 202
        ids.append(r.json()["id"])
    wait_for(lambda: all(client.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in ids), 60, 0.05)
    after = counts(client, run_id)
    bulk_meanwhile = after["succeeded"] - before["succeeded"]
    # FIFO would put ~`waiting` bulk lines (>= 24) first; with priority only the batches already held by the
    # worker (two batches of 4, one on the device and one queued behind it) finish before the interactive ones.
    assert waiting >= 24, before
    assert bulk_meanwhile <= 12, (before, after)
    wait_for(lambda: client.get(f"/v1/datasets/{run_id}").json()["status"] == "completed", 120)  # bulk resumes


@pytest.mark.parametrize("standin_stack", [{"SDXL_VISIBILITY_TIMEOUT_S": "10"}], indirect=True)
def test_a_run_survives_a_killed_worker_and_a_restarted_api_without_redoing_finished_lines(standin_stack):
    client_of, start_worker, settings = standin_stack
    first = start_worker()
    client = client_of()
    run_id = submit(client, 60, shard_size=10)
    wait_for(lambda: counts(client, run_id)["succeeded"] >= 12, 60)
    first.stop(signal.SIGKILL)  # mid-run: batches on the device, lines queued, a feeder holding the run's lock
    r = redis.Redis.from_url(settings.redis_url)
    log, store = BatchLog(r, settings.key_prefix), JobStore(r, settings.key_prefix)
    logged = log.recent()
    ran_before = {j for e in logged for j in e.jobs}
    # Finished lines are reaped: their job records are gone (or say succeeded, waiting for the next reap).
    finished_before = {j for j in ran_before if store.status(j) in (None, JobStatus.succeeded)}
    assert len(finished_before) >= 12

    client = client_of()  # a new API process's view: the run lives in Redis and storage, not in the API
    start_worker()
    wait_for(lambda: client.get(f"/v1/datasets/{run_id}").json()["status"] == "completed", 180)
    run = client.get(f"/v1/datasets/{run_id}").json()
    assert run["counts"]["succeeded"] == 60 and run["counts"]["failed"] == 0
    ran_after = [j for e in log.recent() if e.worker != logged[0].worker for j in e.jobs]
    assert not finished_before & set(ran_after), "a line that had finished ran again"
    files = client.get(f"/v1/datasets/{run_id}/files").json()
    manifest = [json.loads(x) for x in client.get(files["manifest_jsonl"]).text.splitlines()]
    assert sorted(m["id"] for m in manifest) == [f"l{i:03d}" for i in range(60)]  # each line exactly once
    assert len(files["shards"]) == 6


def test_cancel_keeps_the_finished_images(standin_stack):
    client_of, start_worker, _ = standin_stack
    start_worker()
    client = client_of()
    run_id = submit(client, 60, shard_size=5)
    wait_for(lambda: counts(client, run_id)["succeeded"] >= 8, 60)
    assert client.post(f"/v1/datasets/{run_id}/cancel").json()["status"] == "canceling"
    wait_for(lambda: client.get(f"/v1/datasets/{run_id}").json()["status"] == "canceled", 60)
    run = client.get(f"/v1/datasets/{run_id}").json()
    c = run["counts"]
    assert c["succeeded"] >= 8 and c["succeeded"] + c["canceled"] == 60 and c["canceled"] > 0, c
    files = client.get(f"/v1/datasets/{run_id}/files").json()
    manifest = [json.loads(x) for x in client.get(files["manifest_jsonl"]).text.splitlines()]
    assert len(manifest) == c["succeeded"]
    png = client.get(client.app.state.services.storage.url(manifest[0]["key"], 60)).content
    assert hashlib.sha256(png).hexdigest() == manifest[0]["sha256"]
    assert sum(1 for _ in files["shards"]) == -(-c["succeeded"] // 5)
    # what decided the bytes, as the worker recorded it: in every row, and counted in the card
    assert {(m["conditions"]["platform"], m["conditions"]["batch_rows"]) for m in manifest} == {("standin", 4)}
    assert f"- {c['succeeded']} images: model_hash standin; dtype uint8" in client.get(files["card"]).text
