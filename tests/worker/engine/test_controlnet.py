"""ControlNets against PyTorch diffusers (fixtures/controlnets.npz, made by make_controlnet_reference.py on the same
tiny weights, float32): one ControlNet's residuals alone, then the ControlNet pipelines (text-to-image with one and
two ControlNets, scales and step windows, image-to-image, inpainting), each case beside its neighbours in the
same batch (another scale, the ControlNet dropped, another control image), which must miss."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from worker.engine import attention, compile_log, controlnet_source
from worker.engine.controlnet import ControlNet
from worker.engine.engine import Control, Engine, EngineInputError, Programs, Row

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny32, tiny_controlnets):
    return {
        name: controlnet_source.load(name, folder, tiny32.unet, np.float32) for name, folder in tiny_controlnets.items()
    }


def test_residuals_match_diffusers_controlnetmodel(loaded, controlnet_reference):
    ref = controlnet_reference
    net = loaded["a"]
    inputs = [ref[f"residuals/in/{k}"] for k in ("sample", "timesteps", "context", "text_embeds", "time_ids", "cond")]
    got = jax.jit(ControlNet(net.config, attention.einsum).apply)({"params": net.params}, *inputs)
    assert len(got.down) == sum(k.startswith("residuals/down_") for k in ref)
    for name, mine in [*((f"down_{i}", d) for i, d in enumerate(got.down)), ("mid", got.mid)]:
        want = ref[f"residuals/{name}"]
        assert np.abs(np.asarray(mine).transpose(0, 3, 1, 2) - want).max() <= PARITY_TOL, name
    # the zero convolutions are not zero: the residuals carry the control image
    assert np.abs(want).max() > 0.1


@pytest.fixture(scope="module")
def engine(tiny32, loaded) -> Engine:
    """The fixture's two ControlNets, 4-row batches (a case and its three neighbours), 64x64."""
    made = Engine(tiny32, [(64, 64)], batch_rows=4, controlnets=[loaded["a"], loaded["b"]])
    made.compile(Programs.guided | Programs.encode | Programs.controls | Programs.uint8 | Programs.float32)
    return made


def _row(ref, controls, **change) -> Row:
    meta = ref["meta"]
    row = Row(
        meta["prompt"],
        meta["negative_prompt"],
        guidance_scale=meta["guidance_scale"],
        steps=meta["steps"],
        scheduler="euler",
        controlnets=tuple(controls),
    )
    return dataclasses.replace(row, **change)


def _controls(ref, chosen) -> list[Control]:
    return [Control(name, ref[f"control/{image}"], scale, start, end) for name, image, scale, start, end in chosen]


def _inputs(ref, kind: str, strength) -> dict:
    if kind == "text":
        return {}
    out = {"image": ref["image"], "strength": strength}
    return out | ({"mask": ref["mask"]} if kind == "inpaint" else {})


@pytest.mark.parametrize("case", ["one", "scaled", "window", "two", "img2img", "inpaint"])
def test_parity_with_diffusers_controlnet_pipelines(engine, controlnet_reference, case):
    ref = controlnet_reference
    chosen, kind, strength = ref["meta"]["cases"][case]
    controls = _controls(ref, chosen)
    other = {"a": "b", "b": "a"}
    rows = [
        _row(ref, controls),
        # neighbours in the same batch: another scale, the ControlNets dropped, another control image
        _row(ref, [dataclasses.replace(c, scale=c.scale * 0.8) for c in controls]),
        _row(ref, []),
        _row(ref, [dataclasses.replace(controls[0], image=ref[f"control/{other[chosen[0][1]]}"]), *controls[1:]]),
    ]
    rows = [dataclasses.replace(r, **_inputs(ref, kind, strength)) for r in rows]
    latents = np.repeat(ref["latents"], len(rows), axis=0)
    got = engine.generate(rows, 64, 64, latents=latents, output="float32").images
    want = ref[f"{case}/image"][0]
    error = np.abs(got[0] - want).max()
    misses = [float(np.abs(n - want).max()) for n in got[1:]]
    print(f"{case}: max abs error {error:.2e}, neighbours miss by {misses}")
    assert error <= PARITY_TOL
    assert min(misses) > 10 * PARITY_TOL


def test_rows_with_other_controlnets_or_none_share_a_batch_and_nothing_compiles(engine, controlnet_reference):
    ref = controlnet_reference
    a, b = _controls(ref, [("a", "a", 1.0, 0.0, 1.0), ("b", "b", 0.6, 0.2, 0.9)])
    rows = [
        _row(ref, [a], seed=1),
        _row(ref, [], seed=2),
        _row(ref, [a, b], seed=3, prompt="a boat"),
        _row(ref, [b], seed=4, steps=5),
        _row(ref, [dataclasses.replace(a, scale=0.4)], seed=5, image=ref["image"], strength=0.7),
        _row(ref, [], seed=6, image=ref["image"], strength=0.5),
    ]
    alone = {i: engine.generate([r], 64, 64).images[0] for i, r in enumerate(rows)}
    counter = compile_log.install()
    before, controlled = counter.requests, engine.dispatched["control"]
    for batch in ([0, 1, 2, 3], [4, 1, 5, 0], [3, 5, 2]):
        out = engine.generate([rows[i] for i in batch], 64, 64)
        for i, got in zip(batch, out.images, strict=True):
            assert np.abs(got.astype(int) - alone[i].astype(int)).max() <= 1, (batch, i)
    assert engine.dispatched["control"] == controlled + 3
    # a batch in which no row names a ControlNet runs the plain programs
    engine.generate([rows[1], rows[5]], 64, 64)
    assert engine.dispatched["control"] == controlled + 3
    assert counter.requests == before


def test_the_guidance_free_step_runs_controlnets_as_the_guided_one_does(engine, controlnet_reference):
    # guidance 1: the guided program takes the conditional row alone (as diffusers skips guidance), the guidance-free
    # one runs that row alone; both with the ControlNets on it, so they give the same image
    ref = controlnet_reference
    controls = _controls(ref, [("a", "a", 0.8, 0.0, 1.0), ("b", "b", 0.5, 0.3, 1.0)])
    rows = [_row(ref, controls, guidance_scale=1.0), _row(ref, [], guidance_scale=1.0, seed=2)]
    free = engine.dispatch(rows, 64, 64).fetch().images
    guided = engine.dispatch(rows, 64, 64, guided=True).fetch().images
    assert np.abs(free.astype(int) - guided.astype(int)).max() <= 1
    assert engine.compile_s.keys() >= {"4x64x64/advance-free-control", "4x64x64/advance-control"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "nope"}, "no ControlNet named 'nope'"),
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"start": 0.8, "end": 0.2}, "0 <= start < end <= 1"),
        ({"image": np.zeros((32, 32, 3), np.uint8)}, "the control image must be (64, 64, 3) uint8"),
    ],
)
def test_bad_controls_name_the_field_and_the_controlnet(engine, controlnet_reference, change, message):
    (a,) = _controls(controlnet_reference, [("a", "a", 1.0, 0.0, 1.0)])
    with pytest.raises(EngineInputError, match="controlnets") as raised:
        engine.validate(_row(controlnet_reference, [dataclasses.replace(a, **change)]), 64, 64)
    assert message in str(raised.value)


def test_the_same_controlnet_twice_on_a_row_is_refused(engine, controlnet_reference):
    a, b = _controls(controlnet_reference, [("a", "a", 1.0, 0.0, 1.0), ("a", "b", 0.5, 0.0, 1.0)])
    with pytest.raises(EngineInputError, match="at most once"):
        engine.validate(_row(controlnet_reference, [a, b]), 64, 64)


def test_an_engine_without_controlnets_refuses_them(engine32, controlnet_reference):
    (a,) = _controls(controlnet_reference, [("a", "a", 1.0, 0.0, 1.0)])
    with pytest.raises(EngineInputError, match="serves no ControlNets"):
        engine32.validate(_row(controlnet_reference, [a]), 64, 64)


def test_a_controlnet_for_another_model_is_refused_by_name(tiny_controlnets, tiny32):
    other = dataclasses.replace(tiny32.unet, cross_attention_dim=48)  # the refiner's text width
    with pytest.raises(controlnet_source.ModelError, match="'a' is for another model"):
        controlnet_source.load("a", tiny_controlnets["a"], other)


def test_a_single_file_in_diffusers_layout_reads_as_its_folder(loaded, tiny_controlnets, tmp_path, tiny32):
    import shutil

    from worker.engine.controlnet import ControlNetConfig
    from worker.engine.model_source import read_state

    single = tmp_path / "controlnet-a.safetensors"
    shutil.copy(tiny_controlnets["a"] / "diffusion_pytorch_model.safetensors", single)
    # alone, its config is inferred from the tensors (and the served UNet's heads and time embedding width)
    inferred = controlnet_source.infer_config(read_state([single]), tiny32.unet)
    assert ControlNetConfig.from_diffusers(inferred, 32) == loaded["a"].config
    assert controlnet_source.load("a", single, tiny32.unet, np.float32).config == loaded["a"].config
    # beside a config.json: that config, and the folder's weights
    shutil.copy(tiny_controlnets["a"] / "config.json", tmp_path / "config.json")
    got = controlnet_source.load("a", single, tiny32.unet, np.float32)
    assert got.config == loaded["a"].config
    for x, y in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(loaded["a"].params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_job_with_controlnets_runs_through_the_device_loop(
    engine, controlnet_reference, redis_url, key_prefix, tmp_path
):
    """The worker's path for a job's ControlNets, in process on this module's engine: the control images read
    back from storage (one preprocessed to canny edges), the rows made, the image recorded: the engine's own for
    the same row."""
    import io

    import redis
    from PIL import Image

    from common import inputs
    from common.batch_log import BatchLog
    from common.job_store import JobStore
    from common.jobs import JobRequest
    from common.storage import LocalStorage
    from common.worker_registry import WorkerRegistry
    from worker.device_loop import DeviceLoop, LoopSettings
    from worker.engine import canny

    ref = controlnet_reference
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    keys = {}
    for name, picture in (("photo", ref["image"]), ("map", ref["control/b"])):
        digest, data = inputs.encode(Image.fromarray(picture))
        keys[name] = inputs.key("t", digest)
        storage.put(keys[name], data, "image/png")
    client = redis.Redis.from_url(redis_url)
    loop = DeviceLoop(
        engine,
        JobStore(client, key_prefix, ttl_s=60),
        storage,
        LoopSettings(0.2),
        workers=WorkerRegistry(client, key_prefix),
        batches=BatchLog(client, key_prefix),
    )
    controls = [
        {"name": "a", "image": keys["photo"], "preprocess": "canny", "scale": 0.8, "end": 0.7},
        {"name": "b", "image": keys["map"], "scale": 0.5},
    ]
    request = JobRequest(prompt="a castle", width=64, height=64, seed=3, steps=3, controlnets=controls)
    job_id = loop.store.create(request)[0]
    loop.start()
    try:
        assert loop.submit(job_id).result(timeout=120) == "succeeded"
    finally:
        loop.stop()
    (record,) = loop.store.get(job_id).images
    got = np.asarray(Image.open(io.BytesIO((storage.root / record.key).read_bytes())).convert("RGB"), dtype=int)
    edges = canny.edges(ref["image"])
    row = Row(
        "a castle",
        seed=3,
        steps=3,
        controlnets=(Control("a", edges, 0.8, 0.0, 0.7), Control("b", ref["control/b"], 0.5)),
    )
    want = engine.generate([row], 64, 64).images[0].astype(int)
    assert np.abs(got - want).max() <= 1
    plain = engine.generate([Row("a castle", seed=3, steps=3)], 64, 64).images[0].astype(int)
    assert np.abs(got - plain).max() > 10  # the ControlNets did act
