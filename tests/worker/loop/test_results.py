"""The image writer: PNG parameters, encoding, keys and uploads into a local folder (no Redis)."""

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pytest

from common.outage import Outage
from common.storage import LocalStorage
from tests.helpers.loop_fakes import make_job
from worker import images
from worker.engine.program_kind import Role
from worker.engine.standin import StandInEngine, StandInModel
from worker.image_retention import image_key
from worker.loop.results import ImageWriter, parameters
from worker.loop.retry import StorageRetry

PIXELS = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)


@dataclass(frozen=True)
class Adapter:
    name: str
    sha256: str


class Refined(StandInEngine):
    """The stand-in serving a refiner beside its model."""

    def __init__(self) -> None:
        super().__init__([(64, 64)], 2, 0.0)
        self.models = {Role.base: self.model, Role.refiner: StandInModel("tiny-refiner", "r" * 64)}


class Flaky(LocalStorage):
    """A local folder whose first `failures` puts fail as a storage outage would."""

    def __init__(self, root, failures: int):
        super().__init__(root, "http://x", b"k" * 32)
        self.failures = failures

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("storage away")
        super().put(key, data, content_type)


def writer(storage: LocalStorage, sleeps: list[float] | None = None) -> ImageWriter:
    sleep = (sleeps if sleeps is not None else []).append
    return ImageWriter(storage, StorageRetry(3, 0.5, 8.0, Outage("test: storage"), sleep))


def test_a_text_to_image_jobs_parameters_say_what_made_it_and_nothing_else():
    engine = StandInEngine([(64, 64)], 2, 0.0)
    params = parameters(make_job("a cat"), 1, engine, [])
    assert params == {
        "prompt": "a cat",
        "negative_prompt": None,
        "seed": 8,
        "steps": 4,
        "guidance_scale": 5.0,
        "scheduler": "euler",
        "width": 64,
        "height": 64,
        "model": engine.model.name,
        "model_hash": "standin",
    }


def test_inputs_refiner_adapters_and_model_name_appear_where_the_job_asked():
    job = make_job(
        init_image="inputs/t/a.png",
        strength=0.5,
        refiner={"switch_at": 0.7},
        loras=[{"name": "ink", "scale": 0.5}],
        model="lightning",
    )
    params = parameters(job, 0, Refined(), [Adapter("ink", "f" * 64)])
    assert params["init_image_sha256"] == "a" and params["strength"] == 0.5 and "mask_image_sha256" not in params
    assert "inputs/t/" not in json.dumps(params)  # the key names the tenant: only the content hash is written
    assert params["refiner"]["switch_at"] == 0.7 and params["refiner_model"] == "tiny-refiner"
    assert params["refiner_hash"] == "r" * 64
    assert params["loras"] == [{"name": "ink", "scale": 0.5, "sha256": "f" * 64}]
    assert params["model_name"] == "lightning"


def test_an_image_is_encoded_with_its_parameters_and_uploaded_under_its_key(tmp_path):
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    job, engine = make_job("a cat", n=2), StandInEngine([(64, 64)], 2, 0.0)
    record = writer(storage).write(job, 1, PIXELS, engine)
    data = (storage.root / record.key).read_bytes()
    assert record.key == image_key(job, 1, "png") and record.key.endswith(f"/{job.id}/1.png")
    assert record.sha256 == hashlib.sha256(data).hexdigest() and record.seed == 8
    assert images.read_parameters(data) == parameters(job, 1, engine, [])
    assert record.model == engine.model.name and record.model_hash == "standin" and record.loras == []


def test_a_storage_blip_costs_retries_and_an_outage_beyond_them_raises(tmp_path):
    sleeps: list[float] = []
    engine = StandInEngine([(64, 64)], 2, 0.0)
    record = writer(Flaky(tmp_path / "a", failures=2), sleeps).write(make_job(), 0, PIXELS, engine)
    assert sleeps == [0.5, 1.0] and (tmp_path / "a" / record.key).is_file()
    with pytest.raises(ConnectionError):
        writer(Flaky(tmp_path / "b", failures=3)).write(make_job(), 0, PIXELS, engine)


def test_discarded_images_leave_no_object_and_no_folder(tmp_path):
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    job, engine = make_job(n=2), StandInEngine([(64, 64)], 2, 0.0)
    w = writer(storage)
    written = [w.write(job, i, PIXELS, engine) for i in range(2)]
    w.delete(written)
    assert not (storage.root / written[0].key).parent.exists()


def test_controlnets_appear_with_their_image_scale_and_window():
    key = "inputs/t/" + "c" * 64 + ".png"
    controls = [{"name": "canny", "image": key, "scale": 0.7, "end": 0.8, "preprocess": "canny"}]
    params = parameters(make_job(controlnets=controls), 0, StandInEngine([(64, 64)], 2, 0.0), [])
    (got,) = params["controlnets"]
    # the image by content hash, as the init image's: a key's folder names the tenant, and the PNG travels
    assert (got["name"], got["image_sha256"], got["scale"]) == ("canny", "c" * 64, 0.7) and "image" not in got
    assert (got["start"], got["end"]) == (0, 0.8)
    assert (got["preprocess"], got["low_threshold"], got["high_threshold"]) == ("canny", 100, 200)


def test_an_ip_adapter_appears_with_its_image_and_scale():
    prompt = {"name": "style", "image": "inputs/t/" + "5" * 64 + ".png", "scale": 0.6}
    params = parameters(make_job(ip_adapter=prompt), 0, StandInEngine([(64, 64)], 2, 0.0), [])
    assert params["ip_adapter"] == {"name": "style", "image_sha256": "5" * 64, "scale": 0.6}
    assert "ip_adapter" not in parameters(make_job(), 0, StandInEngine([(64, 64)], 2, 0.0), [])
