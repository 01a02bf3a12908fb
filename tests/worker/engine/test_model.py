"""Loading: safetensors and Flax msgpack folders of the same weights, hub ids, bad folders, bfloat16."""

from pathlib import Path

import numpy as np
import pytest

from worker.engine import convert, model, tiny
from worker.engine.engine import Engine, Row


@pytest.fixture(scope="module")
def msgpack_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-msgpack")
    tiny.write(folder, fmt="flax")
    assert not list(folder.glob("*/*.safetensors"))
    return folder


def test_safetensors_and_msgpack_give_the_same_images(tiny_dir, msgpack_dir, tiny32):
    assert list(tiny_dir.glob("unet/*.safetensors"))
    from_msgpack = model.load_folder(msgpack_dir, np.float32)
    a, b = convert.flatten(tiny32.params), convert.flatten(from_msgpack.params)
    assert a.keys() == b.keys()
    rows = [Row("a bowl of fruit", "dark", seed=3, steps=3)]
    img_a = Engine(tiny32, [(64, 64)], batch_rows=1).generate(rows, 64, 64).images
    img_b = Engine(from_msgpack, [(64, 64)], batch_rows=1).generate(rows, 64, 64).images
    np.testing.assert_array_equal(img_a, img_b)


def test_default_dtype_is_bfloat16_and_images_are_finite(tiny_dir):
    m = model.load("tiny", tiny_dir=tiny_dir)
    leaves = convert.flatten(m.params).values()
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    out = Engine(m, [(64, 64)], batch_rows=1).generate([Row("x", steps=4)], 64, 64)
    assert out.finite == [True] and out.images.dtype == np.uint8 and out.images.std() > 10


def test_hub_id_offline_names_the_id_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(model.ModelError) as err:
        model.fetch_hub("stabilityai/stable-diffusion-xl-base-1.0", cache_dir=str(tmp_path))
    assert "stabilityai/stable-diffusion-xl-base-1.0" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_not_a_model(tmp_path):
    with pytest.raises(model.ModelError, match=r"no model_index\.json"):
        model.load_folder(tmp_path)
    with pytest.raises(model.ModelError, match="neither 'tiny', an existing folder, nor a hub id"):
        model.load("no-such-thing")


def test_missing_weights_are_named(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(model.ModelError, match=r"no weights in .*vae"):
        model.load_folder(tmp_path / "m")


def test_parameter_shapes_are_cached_between_starts(tiny_dir, tmp_path, monkeypatch):
    first = model.load_folder(tiny_dir, np.float32, shape_cache=tmp_path)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json")) == ["unet", "vae"]

    def traced(*_, **__):
        pytest.fail("the UNet or VAE init was traced again")

    monkeypatch.setattr(model.FlaxUNet2DConditionModel, "init_weights", traced)
    monkeypatch.setattr(model.FlaxAutoencoderKL, "init_weights", traced)
    second = model.load_folder(tiny_dir, np.float32, shape_cache=tmp_path)  # shapes from the cache, no tracing
    a, b = convert.flatten(first.params), convert.flatten(second.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.asarray(v).dtype == np.float32 and np.asarray(v).flags.c_contiguous for v in b.values())
