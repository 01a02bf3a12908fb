"""IP-Adapters against PyTorch diffusers (fixtures/ip_adapters.npz, made by make_ip_adapter_reference.py on the same
tiny weights, float32): the image processor's pixels, the image encoder's embeddings, one UNet call with the
adapter's attention, and the SDXL pipeline with `ip_adapter_image` at two scales."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

from worker.engine import attention, clip_vision, compile_log, ip_adapter, ip_adapter_source
from worker.engine.engine import Engine, EngineInputError, ImagePrompt, Programs, Row
from worker.engine.layers import Projections
from worker.engine.model_source import ModelError
from worker.engine.unet import text_keys_values

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny32, tiny_ip_adapter):
    return ip_adapter_source.load("style", tiny_ip_adapter, tiny32.unet, np.float32)


def test_pixels_match_clipimageprocessor(loaded, ip_adapter_reference):
    ref = ip_adapter_reference
    for name in ("a", "b"):
        mine = clip_vision.preprocess(ref[f"ip/{name}"], loaded.config.encoder.image_size)
        assert np.abs(mine - ref[f"pixels/{name}"][0]).max() <= 1e-5, name


def test_image_embeds_match_clipvisionmodelwithprojection(loaded, ip_adapter_reference):
    ref = ip_adapter_reference
    pixels = np.concatenate([ref["pixels/a"], ref["pixels/b"]])
    encoder = clip_vision.VisionEncoder(loaded.config.encoder)
    got = np.asarray(jax.jit(encoder.apply)({"params": loaded.params["encoder"]}, pixels))
    want = np.concatenate([ref["embeds/a"], ref["embeds/b"]])
    assert np.abs(got - want).max() <= PARITY_TOL
    assert np.abs(want[0] - want[1]).max() > 0.1  # the two images' embeddings differ


def test_unet_with_image_tokens_matches_diffusers(tiny32, loaded, ip_adapter_reference):
    ref = ip_adapter_reference
    inputs = {k: ref[f"unet/in/{k}"] for k in ("sample", "timesteps", "context", "text_embeds", "time_ids")}
    unet = tiny32.configs.module("unet", np.float32, attention.einsum)
    params = tiny32.params["unet"]

    def run(embeds, scales):
        text = text_keys_values({"params": params}, inputs["context"], np.float32, Projections())
        project = ip_adapter.ImageProjection(loaded.config)
        tokens = project.apply({"params": loaded.params["image_proj"]}, embeds)
        mine = ip_adapter.keys_values(loaded.params["layers"], tokens, scales, np.float32)
        variables = {"params": params, "text": ip_adapter.merge(text, [mine])}
        return unet.apply(variables, *inputs.values())

    embeds = ref["unet/in/image_embeds"]
    got = np.asarray(jax.jit(run)(embeds, np.full((2,), 0.7, np.float32)))
    want = ref["unet/out"]
    print("unet: max abs error", np.abs(got - want).max())
    assert np.abs(got - want).max() <= PARITY_TOL
    plain = np.asarray(jax.jit(run)(embeds, np.zeros((2,), np.float32)))  # scale 0: the adapter dropped
    assert np.abs(plain - want).max() > 1e-3


def test_plus_adapters_are_refused_by_name(tiny32, tiny_ip_adapter, tmp_path):
    from safetensors.numpy import load_file, save_file

    state = load_file(tiny_ip_adapter)
    state = {k: v for k, v in state.items() if not k.startswith("image_proj.")}
    state["image_proj.latents"] = np.zeros((1, 16, 64), np.float32)
    path = tmp_path / "ip-adapter-plus.safetensors"
    save_file(state, path)
    with pytest.raises(ModelError, match="Resampler"):
        ip_adapter_source.load("plus", f"{path}:{tiny_ip_adapter.parent / 'image_encoder'}", tiny32.unet)


@pytest.fixture(scope="module")
def engine(tiny32, loaded) -> Engine:
    """The fixture's IP-Adapter, 4-row batches (a case and its three neighbours), 64x64."""
    made = Engine(tiny32, [(64, 64)], batch_rows=4, ip_adapters=[loaded])
    made.compile(Programs.guided | Programs.images | Programs.uint8 | Programs.float32)
    return made


def _row(ref, image_prompt: ImagePrompt | None, **change) -> Row:
    meta = ref["meta"]
    row = Row(
        meta["prompt"],
        meta["negative_prompt"],
        guidance_scale=meta["guidance_scale"],
        steps=meta["steps"],
        scheduler="euler",
        ip_adapter=image_prompt,
    )
    return dataclasses.replace(row, **change)


@pytest.mark.parametrize("case", ["half", "full"])
def test_parity_with_diffusers_load_ip_adapter(engine, ip_adapter_reference, case):
    ref = ip_adapter_reference
    image, scale = ref["meta"]["cases"][case]
    prompt = ImagePrompt("style", ref[f"ip/{image}"], scale)
    other = {"a": "b", "b": "a"}[image]
    rows = [
        _row(ref, prompt),
        # neighbours in the same batch: the other case's scale, the adapter dropped, another image
        _row(ref, dataclasses.replace(prompt, scale=1.5 - scale)),
        _row(ref, None),
        _row(ref, dataclasses.replace(prompt, image=ref[f"ip/{other}"])),
    ]
    latents = np.repeat(ref["latents"], len(rows), axis=0)
    got = engine.generate(rows, 64, 64, latents=latents, output="float32").images
    want = ref[f"{case}/image"][0]
    error = np.abs(got[0] - want).max()
    misses = [float(np.abs(n - want).max()) for n in got[1:]]
    print(f"{case}: max abs error {error:.2e}, neighbours miss by {misses}")
    assert error <= PARITY_TOL
    assert min(misses) > 10 * PARITY_TOL


def test_rows_with_an_image_prompt_or_none_share_a_batch_and_nothing_compiles(engine, ip_adapter_reference):
    ref = ip_adapter_reference
    a, b = ImagePrompt("style", ref["ip/a"], 0.8), ImagePrompt("style", ref["ip/b"], 0.4)
    rows = [
        _row(ref, a, seed=1),
        _row(ref, None, seed=2),
        _row(ref, b, seed=3, prompt="a boat"),
        _row(ref, None, seed=4),
    ]
    alone = {i: engine.generate([r], 64, 64).images[0] for i, r in enumerate(rows)}
    counter = compile_log.install()
    before, imaged = counter.requests, engine.dispatched["ip_adapter"]
    for batch in ([0, 1, 2, 3], [3, 2, 1]):
        out = engine.generate([rows[i] for i in batch], 64, 64)
        for i, got in zip(batch, out.images, strict=True):
            assert np.abs(got.astype(int) - alone[i].astype(int)).max() <= 1, (batch, i)
    assert engine.dispatched["ip_adapter"] == imaged + 2
    engine.generate([rows[1], rows[3]], 64, 64)  # no image prompt: the plain programs
    assert engine.dispatched["ip_adapter"] == imaged + 2
    assert counter.requests == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "nope"}, "no IP-Adapter named 'nope'"),
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"image": np.zeros((32, 32), np.uint8)}, "the image must be (H, W, 3) uint8"),
    ],
)
def test_bad_image_prompts_are_refused_by_field(engine, ip_adapter_reference, change, message):
    prompt = dataclasses.replace(ImagePrompt("style", ip_adapter_reference["ip/a"], 1.0), **change)
    with pytest.raises(EngineInputError, match=re.escape(message)) as info:
        engine.validate(_row(ip_adapter_reference, prompt), 64, 64)
    assert info.value.field == "ip_adapter"


def test_a_job_with_an_ip_adapter_runs_through_the_device_loop(
    engine, ip_adapter_reference, redis_url, key_prefix, tmp_path
):
    """The worker's path for a job's image prompt, in process on this module's engine: the image read back from
    storage, the rows made, the image recorded: the engine's own for the same row."""
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

    ref = ip_adapter_reference
    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)
    digest, data = inputs.encode(Image.fromarray(ref["ip/b"]))
    key = inputs.key("t", digest)
    storage.put(key, data, "image/png")
    client = redis.Redis.from_url(redis_url)
    loop = DeviceLoop(
        engine,
        JobStore(client, key_prefix, ttl_s=60),
        storage,
        LoopSettings(0.2),
        workers=WorkerRegistry(client, key_prefix),
        batches=BatchLog(client, key_prefix),
    )
    prompt = {"name": "style", "image": key, "scale": 0.7}
    request = JobRequest(prompt="a castle", width=64, height=64, seed=3, steps=3, ip_adapter=prompt)
    job_id = loop.store.create(request)[0]
    loop.start()
    try:
        assert loop.submit(job_id).result(timeout=120) == "succeeded"
    finally:
        loop.stop()
    (record,) = loop.store.get(job_id).images
    got = np.asarray(Image.open(io.BytesIO((storage.root / record.key).read_bytes())).convert("RGB"), dtype=int)
    # the worker reads every input at the job's size, as the API stores a job's (its encoder resizes it again)
    at_job_size = inputs.pixels(data, mask=False, size=(64, 64))
    row = Row("a castle", seed=3, steps=3, ip_adapter=ImagePrompt("style", at_job_size, 0.7))
    want = engine.generate([row], 64, 64).images[0].astype(int)
    assert np.abs(got - want).max() <= 1
    plain = engine.generate([Row("a castle", seed=3, steps=3)], 64, 64).images[0].astype(int)
    assert np.abs(got - plain).max() > 10  # the adapter did act
