"""The batch key, an admitted job as the batcher holds it, and the engine rows a job makes."""

from concurrent.futures import Future

import numpy as np

from common.vocabulary import REFINER_AESTHETIC_SCORE, REFINER_NEGATIVE_AESTHETIC_SCORE
from tests.helpers.loop_fakes import make_job
from worker.loop.batch import Admitted, BatchKey, InputPixels, rows_for


def test_the_key_separates_sizes_guidance_refiner_and_models_but_not_adapters():
    plain = BatchKey.of(make_job())
    assert plain == BatchKey(height=64, width=64, guided=True, refined=False, model="")
    assert BatchKey.of(make_job(guidance_scale=1.0)).guided is False
    assert BatchKey.of(make_job(refiner={"switch_at": 0.7})).refined is True
    assert BatchKey.of(make_job(model="lightning")).model == "lightning"
    assert BatchKey.of(make_job(loras=[{"name": "ink"}])) == plain


def test_a_job_makes_one_row_per_image_with_consecutive_seeds_and_its_pixels():
    image, mask = np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.uint8)
    job = make_job("a boat", n=3, loras=[{"name": "ink", "scale": 0.5}], timestep_spacing="trailing")
    rows = rows_for(job, InputPixels(image, mask))
    assert [r.seed for r in rows] == [7, 8, 9] and {r.prompt for r in rows} == {"a boat"}
    assert all(r.image is image and r.mask is mask for r in rows)
    assert rows[0].loras == (("ink", 0.5),) and rows[0].timestep_spacing == "trailing"
    assert rows[0].refiner_switch is None


def test_refiner_conditioning_is_the_jobs_or_the_vocabularys_defaults():
    (plain,) = rows_for(make_job())
    assert (plain.aesthetic_score, plain.negative_aesthetic_score) == (
        REFINER_AESTHETIC_SCORE,
        REFINER_NEGATIVE_AESTHETIC_SCORE,
    )
    (refined,) = rows_for(make_job(refiner={"switch_at": 0.7, "aesthetic_score": 7.5}))
    assert refined.refiner_switch == 0.7 and refined.aesthetic_score == 7.5


def test_an_admitted_job_is_an_item_of_its_rows_key_and_lane():
    future: Future = Future()
    admitted = Admitted(make_job(n=2), future)
    item = admitted.item(arrived_s=3.0)
    assert (item.job_id, item.rows, item.arrived_s, item.priority) == (admitted.id, 2, 3.0, 0)
    assert item.shape == BatchKey.of(admitted.job) and item.payload is admitted
    assert Admitted(make_job(lane="bulk"), future).item(0.0).priority == 1  # data set lines go after


def test_a_jobs_controlnets_become_each_rows_controls_with_their_maps():
    edges, depth = np.zeros((64, 64, 3), np.uint8), np.ones((64, 64, 3), np.uint8)
    controls = [
        {"name": "canny", "image": "inputs/t/a.png", "scale": 0.7, "start": 0.1},
        {"name": "depth", "image": "inputs/t/b.png", "end": 0.5},
    ]
    rows = rows_for(make_job(n=2, controlnets=controls), InputPixels(controls=(edges, depth)))
    for row in rows:
        (a, b) = row.controlnets
        assert (a.name, a.image is edges, a.scale, a.start, a.end) == ("canny", True, 0.7, 0.1, 1.0)
        assert (b.name, b.image is depth, b.scale, b.start, b.end) == ("depth", True, 1.0, 0.0, 0.5)


def test_a_jobs_ip_adapter_becomes_each_rows_image_prompt():
    picture = np.zeros((80, 120, 3), np.uint8)
    job = make_job(n=2, ip_adapter={"name": "style", "image": "inputs/t/s.png", "scale": 0.6})
    for row in rows_for(job, InputPixels(ip_image=picture)):
        assert (row.ip_adapter.name, row.ip_adapter.image is picture, row.ip_adapter.scale) == ("style", True, 0.6)
    assert all(row.ip_adapter is None for row in rows_for(make_job(n=1), InputPixels()))
