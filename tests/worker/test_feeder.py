"""The feeder against a real Redis, a real device loop and local storage. The engine is the stand-in, rigged
to fail on prompt 'poison' (from test_device_loop): these tests are about feeding, reaping, shards, failures,
retry and restarts, not the model or Celery delivery (tests/test_datasets.py runs the whole service)."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pyarrow.parquet as pq
import pytest
import redis

from api.dataset_ingest import create_run, ingest
from common.batch_log import BatchLog
from common.dataset_store import DatasetStore
from common.datasets import DatasetOptions, DatasetStatus, Layout
from common.job_store import JobStore
from common.jobs import JobStatus
from common.settings import Settings
from common.storage import LocalStorage
from common.worker_registry import WorkerRegistry
from tests.helpers.rigged import RiggedEngine
from tests.helpers.servers import wait_for
from worker.device_loop import DeviceLoop, LoopSettings
from worker.feeder import Feeder


class Rig:
    def __init__(self, redis_url: str, prefix: str, tmp_path, depth: int, batch_s: float = 0.02):
        self.redis = client = redis.Redis.from_url(redis_url)  # the tests look at what Redis holds directly
        self.store = JobStore(client, prefix, ttl_s=600)
        self.datasets = DatasetStore(client, prefix, ttl_s=600)
        self.storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
        self.engine = RiggedEngine([(64, 64)], 4, batch_s)
        self.loop = DeviceLoop(
            self.engine,
            self.store,
            self.storage,
            LoopSettings(batch_timeout_s=0.05),
            workers=WorkerRegistry(client, prefix),
            batches=BatchLog(client, prefix),
        )
        self.settings = Settings(
            redis_url=redis_url, key_prefix=prefix, image_sizes="64x64", url_signing_secret="s" * 32
        )
        self.sent: list[str] = []
        self.max_inflight = 0
        self.feeder = self.make_feeder(depth)

    def make_feeder(self, depth: int, owner: str = "w1") -> Feeder:
        def send(job_id: str, model: str | None) -> None:  # stands in for the bulk queue: straight into the loop
            self.sent.append(job_id)
            self.loop.submit(job_id)

        return Feeder(self.datasets, self.store, self.storage, send, owner=owner, depth=depth, interval_s=0.02)

    def submit(self, lines: list[dict], **options) -> str:
        opts = DatasetOptions(defaults={"width": 64, "height": 64, "steps": 2}, **options)
        text = "".join(json.dumps(x) + "\n" for x in lines).encode()
        ingested = ingest(io.BytesIO(text), opts, self.settings, self.storage)
        create_run(self.datasets, ingested, opts, "tenant", "test")
        return ingested.run_id

    def run_until(self, run_id: str, statuses: set[DatasetStatus], timeout_s: float = 60) -> None:
        def done() -> bool:
            self.feeder.step_all()
            self.max_inflight = max(self.max_inflight, len(self.datasets.inflight(run_id)))
            return self.datasets.get(run_id).status in statuses

        wait_for(done, timeout_s, every_s=0.02)


@pytest.fixture
def rig(redis_url, key_prefix, tmp_path):
    rig = Rig(redis_url, key_prefix, tmp_path, depth=6)
    rig.loop.start()
    yield rig
    rig.loop.stop()


def lines(n: int, poison: set[int] = frozenset()) -> list[dict]:
    return [{"id": f"l{i:03d}", "prompt": "poison" if i in poison else f"picture {i}"} for i in range(n)]


def test_a_run_is_fed_in_bounded_depth_and_written_as_shards(rig):
    run_id = rig.submit(lines(30), shard_size=8, seed=3)
    rig.run_until(run_id, {DatasetStatus.completed})
    run = rig.datasets.get(run_id)
    assert (run.total, run.succeeded, run.failed, run.shards, run.sharded) == (30, 30, 0, 4, 30)
    assert 0 < rig.max_inflight <= 6  # never more than `depth` lines on the queue or a device
    assert len(rig.sent) == 30 and len(set(rig.sent)) == 30
    layout = Layout(run_id)
    with tarfile.open(rig.storage.path(layout.shard(3))) as tar:
        assert len(tar.getnames()) == 3 * 6  # the last shard holds the 6 left over: image, json, txt each
    manifest = [json.loads(x) for x in rig.storage.get(layout.manifest("jsonl")).splitlines()]
    assert sorted(m["id"] for m in manifest) == [f"l{i:03d}" for i in range(30)]
    assert all(rig.storage.path(m["key"]).is_file() for m in manifest)
    assert all(m["key"].startswith(layout.prefix + "/images/") for m in manifest)
    assert {m["shard"] for m in manifest} == {layout.shard(i) for i in range(4)}
    assert pq.read_table(rig.storage.path(layout.manifest("parquet"))).num_rows == 30
    assert rig.storage.get(layout.failures) == b""
    # Redis keeps nothing per line once a run is done: no job records, no in-flight entries, no rows waiting.
    assert not list(rig.redis.scan_iter(match=rig.store.keys.job("*")))
    assert rig.datasets.inflight(run_id) == {} and rig.datasets.done_count(run_id) == 0
    assert run_id not in rig.datasets.active()


def test_without_loose_images_each_image_lives_only_in_its_shard(rig):
    import hashlib

    deletes = []
    real_delete_many = rig.storage.delete_many

    def delete_many(keys):  # the first shard's delete "crashes" after its commit: the run's end cleans up
        deletes.append(list(keys))
        if len(deletes) == 1:
            raise OSError("the feeder died here")
        real_delete_many(deletes[-1])

    rig.storage.delete_many = delete_many
    run_id = rig.submit(lines(20), shard_size=8, loose_images=False)
    rig.run_until(run_id, {DatasetStatus.completed})
    run = rig.datasets.get(run_id)
    assert (run.succeeded, run.shards) == (20, 3)
    layout = Layout(run_id)
    assert list(rig.storage.keys(layout.images)) == []  # none left, the "crashed" shard's included
    assert len(deletes[0]) == 8 and len(deletes) >= 3
    manifest = [json.loads(x) for x in rig.storage.get(layout.manifest("jsonl")).splitlines()]
    assert all(m["key"] is None for m in manifest) and len(manifest) == 20
    for m in manifest:  # every image is in the shard its row names, with the bytes its sha256 says
        with tarfile.open(rig.storage.path(m["shard"])) as tar:
            png = tar.extractfile(f"{m['id']}.png").read()
            assert hashlib.sha256(png).hexdigest() == m["sha256"] and png.startswith(b"\x89PNG")
            assert json.loads(tar.extractfile(f"{m['id']}.json").read()) == m
    assert pq.read_table(rig.storage.path(layout.manifest("parquet"))).column("key").null_count == 20


def test_failed_lines_are_listed_with_reasons_and_can_be_retried(rig):
    run_id = rig.submit(lines(10, poison={2, 7}), shard_size=4)
    rig.run_until(run_id, {DatasetStatus.completed})
    run = rig.datasets.get(run_id)
    assert (run.succeeded, run.failed) == (8, 2)
    failures = rig.datasets.failures(run_id)
    assert [(f["line"], f["id"]) for f in failures] == [(3, "l002"), (8, "l007")]
    assert all("FloatingPointError: poison row" in f["error"] for f in failures)
    assert [json.loads(x)["id"] for x in rig.storage.get(Layout(run_id).failures).splitlines()] == ["l002", "l007"]

    rig.engine.dispatch = lambda rows, h, w, **kw: RiggedEngine.__mro__[1].dispatch(rig.engine, rows, h, w)  # cured
    assert rig.datasets.retry(run_id) == 2
    assert rig.datasets.get(run_id).status == DatasetStatus.running and run_id in rig.datasets.active()
    rig.run_until(run_id, {DatasetStatus.completed})
    run = rig.datasets.get(run_id)
    assert (run.succeeded, run.failed, run.retries) == (10, 0, 1)
    manifest = [json.loads(x) for x in rig.storage.get(Layout(run_id).manifest("jsonl")).splitlines()]
    assert sorted(m["id"] for m in manifest) == [f"l{i:03d}" for i in range(10)]  # each line exactly once
    assert rig.datasets.retry(run_id) == 0  # nothing left to retry


def test_cancel_stops_feeding_and_keeps_what_finished(redis_url, key_prefix, tmp_path):
    rig = Rig(redis_url, key_prefix, tmp_path, depth=4, batch_s=0.3)
    rig.loop.start()
    try:
        run_id = rig.submit(lines(40), shard_size=5)
        rig.run_until(run_id, {DatasetStatus.running}, 5)
        wait_for(lambda: (rig.feeder.step_all(), rig.datasets.get(run_id).succeeded >= 6)[1], 30, 0.02)
        assert rig.datasets.cancel(run_id) == DatasetStatus.running
        rig.run_until(run_id, {DatasetStatus.canceled})
        run = rig.datasets.get(run_id)
        assert run.succeeded >= 6 and run.succeeded + run.canceled == 40 and run.failed == 0
        assert len(rig.sent) < 40  # feeding stopped
        manifest = [json.loads(x) for x in rig.storage.get(Layout(run_id).manifest("jsonl")).splitlines()]
        assert len(manifest) == run.succeeded and all(rig.storage.path(m["key"]).is_file() for m in manifest)
        assert rig.datasets.cancel(run_id) == DatasetStatus.canceled  # already over: nothing changes
    finally:
        rig.loop.stop()


def test_a_feeder_that_died_mid_feed_is_replaced_without_losing_or_doubling_lines(rig):
    run_id = rig.submit(lines(12), shard_size=5)
    dead = rig.make_feeder(depth=6, owner="dead")
    dead.send = lambda job_id, model: None  # it created jobs, then died before their messages went out
    assert rig.datasets.lock(run_id, "dead", ttl_s=0.2)
    dead.step(run_id)
    created = list(rig.redis.scan_iter(match=rig.store.keys.job("*")))
    assert len(created) == 6 and rig.datasets.get(run_id).cursor == 6
    # A crash between creating a line's job and recording it as fed: the same line is found, not doubled.
    run = rig.datasets.get(run_id)
    job_id = f"{run_id}-6-0"
    line = rig.feeder._line(run_id, 6)
    info = {"run": run_id, "index": 6, "id": line.id, "line": line.line}
    rig.store.create_bulk(job_id, line.request, "tenant", Layout(run_id).image(line.id, "png"), info)
    time.sleep(0.3)  # the dead feeder's lock expires; ours takes over
    # The stuck sweep would resend the first six after the visibility timeout; here we resend them as Celery would.
    for key in created:
        rig.loop.submit(key.decode().rsplit(":", 1)[1])
    rig.run_until(run_id, {DatasetStatus.completed})
    run = rig.datasets.get(run_id)
    assert (run.total, run.succeeded, run.failed) == (12, 12, 0)
    assert job_id in rig.sent  # re-sent because it was still queued
    manifest = [json.loads(x)["id"] for x in rig.storage.get(Layout(run_id).manifest("jsonl")).splitlines()]
    assert sorted(manifest) == [f"l{i:03d}" for i in range(12)]


def test_the_line_of_a_job_is_recorded_once_even_if_two_feeders_reap_it(rig):
    run_id = rig.submit(lines(3))
    rig.feeder.step(run_id)
    wait_for(lambda: all(rig.store.status(j) == JobStatus.succeeded for j in rig.datasets.inflight(run_id).values()))
    other = rig.make_feeder(depth=6, owner="w2")
    index, job_id = next(iter(rig.datasets.inflight(run_id).items()))
    assert rig.datasets.reap(run_id, index, job_id, "succeeded", {"id": "x"})
    assert not rig.datasets.reap(run_id, index, job_id, "succeeded", {"id": "x"})
    other._reap(rig.datasets.get(run_id))
    assert rig.datasets.get(run_id).succeeded == 3 and rig.datasets.done_count(run_id) == 3


def manifest_ids(rig: Rig, run_id: str) -> list[str]:
    return [json.loads(x)["id"] for x in rig.storage.get(Layout(run_id).manifest("jsonl")).splitlines()]


def test_cancel_then_resume_then_retry_ends_with_every_line_once(redis_url, key_prefix, tmp_path):
    """Resume feeds a canceled run's canceled lines with their seeds; the run ends `completed` (its failed line
    still failed), then a retry of that line makes every line succeed exactly once."""
    rig = Rig(redis_url, key_prefix, tmp_path, depth=4, batch_s=0.2)
    rig.loop.start()
    try:
        run_id = rig.submit(lines(30, poison={1}), shard_size=5, seed=11)
        wait_for(lambda: (rig.feeder.step_all(), rig.datasets.get(run_id).succeeded >= 5)[1], 30, 0.02)
        assert rig.datasets.cancel(run_id) == DatasetStatus.running
        rig.run_until(run_id, {DatasetStatus.canceled})
        run = rig.datasets.get(run_id)
        assert run.failed == 1 and run.canceled > 0 and run.succeeded + run.failed + run.canceled == 30
        first_round = run.succeeded
        assert rig.datasets.resume(run_id) == run.canceled  # resume first: the poison line still fails
        rig.run_until(run_id, {DatasetStatus.completed})
        run = rig.datasets.get(run_id)
        assert (run.succeeded, run.failed, run.canceled) == (29, 1, 0) and run.succeeded > first_round

        rig.engine.dispatch = lambda rows, h, w, **kw: RiggedEngine.__mro__[1].dispatch(rig.engine, rows, h, w)
        assert rig.datasets.resume(run_id) == -2  # nothing canceled any more: not a canceled run
        assert rig.datasets.retry(run_id) == 1
        rig.run_until(run_id, {DatasetStatus.completed})
        run = rig.datasets.get(run_id)
        assert (run.succeeded, run.failed, run.canceled) == (30, 0, 0)
        ids = manifest_ids(rig, run_id)
        assert sorted(ids) == [f"l{i:03d}" for i in range(30)]  # every line exactly once
        seeds = {
            json.loads(x)["id"]: json.loads(x)["seed"]
            for x in rig.storage.get(Layout(run_id).manifest("jsonl")).splitlines()
        }
        from common.datasets import derive_seed

        assert all(seeds[i] == derive_seed(11, i) for i in ids)  # resumed lines kept their seeds
    finally:
        rig.loop.stop()


def test_cancel_retry_resume_in_that_order(redis_url, key_prefix, tmp_path):
    """A canceled run stays `canceled` (never `completed`) through a retry of its failed lines while any line is
    canceled; resume then ends it `completed` with every line once."""
    rig = Rig(redis_url, key_prefix, tmp_path, depth=4, batch_s=0.2)
    rig.loop.start()
    try:
        run_id = rig.submit(lines(24, poison={0}), shard_size=5)
        wait_for(lambda: (rig.feeder.step_all(), rig.datasets.get(run_id).succeeded >= 4)[1], 30, 0.02)
        rig.datasets.cancel(run_id)
        rig.run_until(run_id, {DatasetStatus.canceled})
        canceled = rig.datasets.get(run_id).canceled
        assert canceled > 0 and rig.datasets.get(run_id).failed == 1
        rig.engine.dispatch = lambda rows, h, w, **kw: RiggedEngine.__mro__[1].dispatch(rig.engine, rows, h, w)
        assert rig.datasets.retry(run_id) == 1
        rig.run_until(run_id, {DatasetStatus.canceled})  # the failed line ran; the canceled ones are still owed
        run = rig.datasets.get(run_id)
        assert (run.failed, run.canceled) == (0, canceled)
        assert rig.datasets.resume(run_id) == canceled
        rig.run_until(run_id, {DatasetStatus.completed})
        run = rig.datasets.get(run_id)
        assert (run.succeeded, run.failed, run.canceled) == (24, 0, 0)
        assert sorted(manifest_ids(rig, run_id)) == [f"l{i:03d}" for i in range(24)]
    finally:
        rig.loop.stop()


def test_input_order_writes_each_window_in_order_once_all_its_lines_ended(rig):
    run_id = rig.submit(lines(20, poison={5}), shard_size=8, order="input")
    rig.run_until(run_id, {DatasetStatus.completed})
    layout = Layout(run_id)

    def shard_ids(index: int) -> list[str]:
        with tarfile.open(rig.storage.path(layout.shard(index))) as tar:
            return [n.removesuffix(".png") for n in tar.getnames() if n.endswith(".png")]

    run = rig.datasets.get(run_id)
    assert run.shards == 3
    assert shard_ids(0) == [f"l{i:03d}" for i in range(8) if i != 5]  # the failed line is not in its shard
    assert shard_ids(1) == [f"l{i:03d}" for i in range(8, 16)]
    assert shard_ids(2) == [f"l{i:03d}" for i in range(16, 20)]
    assert manifest_ids(rig, run_id) == [f"l{i:03d}" for i in range(20) if i != 5]  # the manifest too
    stats = json.loads(rig.storage.get(layout.stats))
    assert [(s["count"], s["failures"], s["first_line"]) for s in stats["shards"]] == [(7, 1, 1), (8, 0, 9), (4, 0, 17)]
    assert stats["counts"]["failed"] == 1 and all(s["image_bytes"] > 0 for s in stats["shards"])
    card = rig.storage.get(layout.card).decode()
    assert card.startswith("---\nconfigs:") and "path: shards/*.tar" in card and run_id in card

    rig.engine.dispatch = lambda rows, h, w, **kw: RiggedEngine.__mro__[1].dispatch(rig.engine, rows, h, w)
    assert rig.datasets.retry(run_id) == 1
    rig.run_until(run_id, {DatasetStatus.completed})
    assert rig.datasets.get(run_id).shards == 4 and shard_ids(3) == ["l005"]  # late lines: a last shard
    assert sorted(manifest_ids(rig, run_id)) == [f"l{i:03d}" for i in range(20)]


def test_a_run_whose_step_fails_every_time_fails_instead_of_looping(rig, monkeypatch):
    from worker import shards

    def broken(*args, **kwargs):
        raise ValueError("name is too long")  # what USTAR said of a 128-character id, at every tick

    monkeypatch.setattr(shards, "tar_shard", broken)
    rig.feeder = Feeder(
        rig.datasets, rig.store, rig.storage, rig.loop.submit, owner="w1", depth=6, interval_s=0.02, step_attempts=3
    )
    run_id = rig.submit(lines(4), shard_size=2)
    rig.run_until(run_id, {DatasetStatus.failed}, timeout_s=20)
    run = rig.datasets.get(run_id)
    assert "3 times in a row" in run.error and "name is too long" in run.error
    assert run_id not in rig.datasets.active()  # no feeder picks it up again
    assert rig.redis.ttl(rig.datasets.keys.run(run_id).record) > 0  # it expires like any finished run
