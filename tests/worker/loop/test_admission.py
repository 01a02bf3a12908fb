"""Admission: the verdict on a message from the job's record alone, and what an admitted job reads from storage
first, against an in-memory fake store and registry (tests/helpers/loop_fakes.py, which record every call) and a
local-folder storage."""

import io
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from PIL import Image

from common import inputs
from common.jobs import JobStatus
from common.outage import Outage
from common.storage import LocalStorage
from tests.helpers.loop_fakes import make_job, redis_retry, rig
from tests.helpers.pictures import encoded, photo
from worker.engine.standin import StandInEngine
from worker.loop.admission import ADMIT, Admission, Verdict, judge
from worker.loop.engine_port import Engines
from worker.loop.outcome import JobOutcome
from worker.loop.retry import StorageRetry

ENGINES = Engines({"tiny": StandInEngine([(64, 64)], 2, 0.0), "lightning": StandInEngine([(64, 64)], 2, 0.0)})


def test_the_verdict_from_the_record_alone():
    assert judge(None, None, 3, ENGINES) == Verdict(JobOutcome.missing)
    assert judge(make_job(status=JobStatus.canceled), None, 3, ENGINES) == Verdict(JobOutcome.canceled)
    assert judge(make_job(status=JobStatus.succeeded), 5, 3, ENGINES) == Verdict(JobOutcome.succeeded)
    # a message older than the record's generation was superseded; None (a feeder's message) is current
    assert judge(make_job(generation=2), 1, 3, ENGINES) == Verdict(JobOutcome.stale)
    assert judge(make_job(generation=2), None, 3, ENGINES) == ADMIT
    assert judge(make_job(generation=2), 2, 3, ENGINES) == ADMIT
    out = judge(make_job(status=JobStatus.running, attempts=3), None, 3, ENGINES)
    assert out.outcome is JobOutcome.failed and out.error is not None and "gave up after 3 attempts" in out.error
    assert judge(make_job(model="nope"), None, 3, ENGINES) == Verdict(JobOutcome.not_here)
    assert judge(make_job(model="lightning"), None, 3, ENGINES) == ADMIT
    assert judge(make_job(status=JobStatus.running, attempts=2), None, 3, ENGINES) == ADMIT  # a redelivery


class Adapters:
    """An adapter registry serving only `names` (path_of as common/loras.py's Registry answers it)."""

    def __init__(self, *names: str):
        self.names = names

    def path_of(self, name: str) -> Path:
        if name not in self.names:
            raise KeyError(name)
        return Path(f"{name}.safetensors")


def admission(r, storage: LocalStorage, sleeps: list[float], loras: Adapters | None = None) -> Admission:
    retry = StorageRetry(2, 0.5, 8.0, Outage("test: storage"), sleeps.append)
    return Admission(
        r.store, redis_retry(), r.presence, r.recorder, r.engines, storage, retry, max_attempts=3, loras=loras
    )  # type: ignore[arg-type]


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def test_an_admitted_job_is_held_and_carries_its_input_images_as_pixels(tmp_path: Path):
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    picture = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    storage.put("inputs/t/a.png", png(picture), "image/png")
    storage.put("inputs/t/m.png", png(mask), "image/png")
    job = make_job(init_image="inputs/t/a.png", mask_image="inputs/t/m.png")
    r = rig(tmp_path, job, storage=storage)
    future: Future = Future()
    admitted = admission(r, storage, []).admit(job.id, None, future)
    assert admitted is not None and admitted.job == job and admitted.future is future and not future.done()
    assert admitted.pixels.image is not None and admitted.pixels.mask is not None
    assert (admitted.pixels.image == picture).all() and admitted.pixels.mask.shape == (64, 64)
    assert r.registry.held_sets["w1"] == {job.id}
    assert r.store.calls == [("get", job.id)]  # no status change: that is the dispatcher's, when its batch starts


def test_an_input_kept_as_sent_is_read_as_the_pixels_the_api_made_of_it(tmp_path: Path):
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    sent = encoded(photo(48, 32))  # a JPEG half the job's size, kept as sent (common/inputs.stored_form)
    made = inputs.normalize(inputs.read(sent, inputs.MAX_PIXELS, (96, 64)), 96, 64, mask=False)  # at submit
    mask_made = inputs.normalize(inputs.read(sent, inputs.MAX_PIXELS, (96, 64)), 96, 64, mask=True)
    storage.put("inputs/t/j.png", sent, "image/jpeg")
    job = make_job(init_image="inputs/t/j.png", mask_image="inputs/t/j.png", width=96, height=64)
    admitted = admission(rig(tmp_path, job, storage=storage), storage, []).admit(job.id, None, Future())
    assert admitted is not None and admitted.pixels.image is not None and admitted.pixels.mask is not None
    assert np.array_equal(admitted.pixels.image, np.asarray(made))
    assert np.array_equal(admitted.pixels.mask, np.asarray(mask_made))


def test_a_refused_message_is_released_and_answered(tmp_path: Path):
    job = make_job(status=JobStatus.canceled)
    r = rig(tmp_path, job)
    future: Future = Future()
    assert admission(r, r.storage, []).admit(job.id, None, future) is None
    assert future.result() is JobOutcome.canceled and r.registry.held_sets["w1"] == set()


def test_out_of_attempts_the_job_fails_and_is_notified(tmp_path: Path):
    job = make_job(status=JobStatus.queued, attempts=3, webhook_url="https://example.com/hook")
    r = rig(tmp_path, job)
    future: Future = Future()
    assert admission(r, r.storage, []).admit(job.id, None, future) is None
    assert future.result() is JobOutcome.failed and r.store.jobs[job.id].status is JobStatus.failed
    assert r.notified == [job.id]


def test_an_input_image_gone_from_storage_fails_the_queued_job(tmp_path: Path):
    job = make_job(init_image="inputs/t/gone.png")
    r = rig(tmp_path, job)
    sleeps: list[float] = []
    future: Future = Future()
    assert admission(r, r.storage, sleeps).admit(job.id, None, future) is None
    assert future.result() is JobOutcome.failed and sleeps == []  # missing is an answer: no retries
    stored = r.store.jobs[job.id]
    assert (
        stored.status is JobStatus.failed and stored.error == "input image 'inputs/t/gone.png' is no longer in storage"
    )


def test_a_wake_up_takes_only_from_a_model_this_worker_holds(tmp_path: Path):
    r = rig(tmp_path, engine=dict(ENGINES.items()))  # type: ignore[arg-type]
    made = admission(r, r.storage, [])
    held, other, old = Future(), Future(), Future()
    assert made.admit(None, None, held, "lightning") is None and held.result() is JobOutcome.idle
    assert made.admit(None, None, other, "nope") is None and other.result() is JobOutcome.not_here
    assert made.admit(None, None, old) is None and old.result() is JobOutcome.idle  # no model: the default's
    assert r.store.calls == [("take", "lightning"), ("take", "None")]  # none for the model not held


class Away(LocalStorage):
    def get(self, key: str) -> bytes:
        raise ConnectionError("storage away")


def test_storage_away_beyond_the_backoff_gives_the_job_back(tmp_path: Path):
    job = make_job(init_image="inputs/t/a.png")
    storage = Away(tmp_path, "http://x", b"k" * 32)
    r = rig(tmp_path, job, storage=storage)
    sleeps: list[float] = []
    future: Future = Future()
    assert admission(r, storage, sleeps).admit(job.id, None, future) is None
    assert future.result() is JobOutcome.requeue and sleeps == [0.5]
    assert r.store.jobs[job.id].status is JobStatus.queued and r.registry.held_sets["w1"] == set()
    assert ("give_back", job.id) in r.store.calls  # ready again for any worker to take


def test_an_adapter_no_longer_served_fails_the_job(tmp_path: Path):
    served = make_job("served", loras=[{"name": "ink"}])
    gone = make_job("gone", loras=[{"name": "ink"}, {"name": "removed"}])
    r = rig(tmp_path, served, gone)
    admit = admission(r, r.storage, [], Adapters("ink")).admit
    assert admit(served.id, None, Future()) is not None
    future: Future = Future()
    assert admit(gone.id, None, future) is None and future.result() is JobOutcome.failed
    assert r.store.jobs[gone.id].error == "LoRA adapter 'removed' is no longer served"


def test_control_images_are_read_and_preprocessed_as_the_job_asks(tmp_path: Path):
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    storage.put("inputs/t/s.png", png(square), "image/png")
    controls = [
        {"name": "canny", "image": "inputs/t/s.png", "preprocess": "canny"},
        {"name": "depth", "image": "inputs/t/s.png"},
    ]
    job = make_job(controlnets=controls)
    r = rig(tmp_path, job, storage=storage)
    admitted = admission(r, storage, []).admit(job.id, None, Future())
    assert admitted is not None
    edges, given = admitted.pixels.controls
    assert (given == square).all()  # a prepared map goes in as it is
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert not edges[24:40, 24:40].any() and edges[16:48, 14:18].any()  # the square's outline, not its inside


def test_a_data_set_job_for_a_model_not_held_here_is_sent_on_to_its_models_queue_not_handed_back(tmp_path: Path):
    job = make_job(model="turbo", lane="bulk")  # a message from before model queues, on the lane's own queue
    r = rig(tmp_path, job)
    sent: list[str] = []
    made = admission(r, r.storage, [])
    made.reroute = lambda j: sent.append(j.request.model)
    future: Future = Future()
    assert made.admit(job.id, None, future) is None
    assert future.result() is JobOutcome.rerouted and sent == ["turbo"] and r.registry.held_sets["w1"] == set()
    assert not JobOutcome.rerouted.requeues  # its message is acknowledged: no hand-back loop

    def broker_away(j):
        raise ConnectionError("broker away")

    made.reroute = broker_away  # it cannot be sent on: handed back, as before
    future = Future()
    made.admit(job.id, None, future)
    assert future.result() is JobOutcome.not_here


def test_an_image_prompt_is_read_with_the_job(tmp_path: Path):
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    picture = np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3)
    storage.put("inputs/t/p.png", png(picture), "image/png")
    # at the job's size, as the API stores it (the worker reads every input at its job's size)
    job = make_job(ip_adapter={"name": "style", "image": "inputs/t/p.png", "scale": 0.5}, width=96, height=64)
    r = rig(tmp_path, job, storage=storage)
    admitted = admission(r, storage, []).admit(job.id, None, Future())
    assert admitted is not None
    assert (admitted.pixels.ip_image == picture).all() and admitted.pixels.controls == ()


def test_a_stored_input_of_another_size_is_read_at_the_jobs(tmp_path: Path):
    # a data set line may name an image a job of another size stored (api/job_inputs.py StoredImages): every image
    # comes at the line's size, which the engine takes, the image prompt too (one read for all, as a job's)
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    wide = np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3)
    storage.put("inputs/t/w.png", png(wide), "image/png")
    storage.put("inputs/t/m.png", png(np.zeros((128, 128), np.uint8)), "image/png")
    job = make_job(
        init_image="inputs/t/w.png",
        mask_image="inputs/t/m.png",
        controlnets=[{"name": "canny", "image": "inputs/t/w.png"}],
        ip_adapter={"name": "style", "image": "inputs/t/w.png"},
    )
    r = rig(tmp_path, job, storage=storage)
    admitted = admission(r, storage, []).admit(job.id, None, Future())
    assert admitted is not None
    got = admitted.pixels
    assert got.image is not None and got.mask is not None and got.ip_image is not None
    assert (got.image.shape, got.mask.shape, got.controls[0].shape) == ((64, 64, 3), (64, 64), (64, 64, 3))
    assert got.ip_image.shape == (64, 64, 3)
