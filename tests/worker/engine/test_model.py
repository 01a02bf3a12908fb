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


def test_a_variant_folder_is_read_only_when_asked_for(tmp_path, tiny32):
    """The hub's fp16 variant naming (model.fp16.safetensors): read with variant="fp16", in the serving dtype."""
    folder = tmp_path / "fp16"
    tiny.write(folder, dtype=np.float16, variant="fp16")
    assert sorted(p.name for p in folder.glob("unet/*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(model.ModelError) as err:  # no variant asked for: the error names the files and the setting
        model.load_folder(folder, np.float32)
    assert "diffusion_pytorch_model.fp16.safetensors" in str(err.value) and "SDXL_MODEL_VARIANT" in str(err.value)

    m = model.load_folder(folder, np.float32, variant="fp16")
    got, want = convert.flatten(m.params), convert.flatten(tiny32.params)
    assert got.keys() == want.keys()
    for k in want:  # the same weights, rounded through float16
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], np.asarray(want[k]).astype(np.float16).astype(np.float32))
    with pytest.raises(model.ModelError, match=r"model\.bf16\.safetensors.*SDXL_MODEL_VARIANT=bf16"):
        model.load_folder(folder, np.float32, variant="bf16")


# The weight files of stabilityai/stable-diffusion-xl-base-1.0 (each in float32 and the fp16 variant, with
# Flax, ONNX and OpenVINO copies beside them), plus a sharded text encoder as transformers names its shards.
SDXL_BASE_FILES = [
    "model_index.json", "sd_xl_base_1.0.safetensors", "scheduler/scheduler_config.json",
    "tokenizer/vocab.json", "tokenizer_2/merges.txt", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_flax_model.msgpack", "unet/model.onnx_data", "unet/openvino_model.bin",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/flax_model.msgpack",
    "text_encoder_2/model.safetensors.index.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.fp16.json",
    "text_encoder_2/model.fp16-00001-of-00002.safetensors", "text_encoder_2/model.fp16-00002-of-00002.safetensors",
]  # fmt: skip


@pytest.mark.parametrize("variant", ["", "fp16"])
def test_hub_download_takes_one_precision_only(variant):
    from huggingface_hub.utils import filter_repo_objects  # what snapshot_download filters the repo's files with

    chosen = set(filter_repo_objects(SDXL_BASE_FILES, allow_patterns=model.hub_patterns(variant)))
    weights = {f for f in chosen if ".safetensors" in f}
    tag = ".fp16" if variant else ""
    assert weights == {
        f"unet/diffusion_pytorch_model{tag}.safetensors",
        f"vae/diffusion_pytorch_model{tag}.safetensors",
        f"text_encoder/model{tag}.safetensors",
        f"text_encoder_2/model.safetensors.index{tag}.json",
        f"text_encoder_2/model{tag}-00001-of-00002.safetensors",
        f"text_encoder_2/model{tag}-00002-of-00002.safetensors",
    }
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json"} <= chosen
    assert not any(f.endswith((".msgpack", ".onnx_data", ".bin")) for f in chosen)


def test_shape_cache_key_ignores_private_fields(tmp_path):
    """diffusers' `_use_default_values` is a set turned into a list: its order changes per process, and a key
    built from it missed the cache on most starts of the full SDXL config (seen in bench/start.py)."""
    traced = []

    def trace():
        traced.append(1)
        return {"kernel": np.zeros((2, 3), np.float32)}

    config = {"block_out_channels": [320, 640], "_use_default_values": ["dropout", "split_head_dim"]}
    model._shapes("unet", config, trace, tmp_path)
    reordered = config | {"_use_default_values": ["split_head_dim", "dropout"]}
    again = model._shapes("unet", reordered, trace, tmp_path)
    assert len(traced) == 1 and again["kernel"].shape == (2, 3)
    model._shapes("unet", config | {"block_out_channels": [320, 641]}, trace, tmp_path)  # a real change: traced
    assert len(traced) == 2


def test_background_load_gives_the_same_engine(tiny_dir, tiny32):
    """load(background=True) returns with the weights' shapes while a thread reads them; Engine.compile()
    places them after the programs. Same weights, same images as a plain load."""
    m = model.load_folder(tiny_dir, np.float32, background=True)
    for leaf in convert.flatten(m.params).values():  # shapes in the serving dtype until the read ends
        assert leaf.dtype == np.float32 and hasattr(leaf, "shape")
    engine = Engine(m, [(64, 64)], batch_rows=1)
    assert engine.params is None
    engine.compile()
    assert m.pending is None and m.weights_s > 0 and engine.params is not None
    got, want = convert.flatten(m.params), convert.flatten(tiny32.params)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    rows = [Row("a bowl of fruit", seed=3, steps=3)]
    np.testing.assert_array_equal(
        engine.generate(rows, 64, 64).images, Engine(tiny32, [(64, 64)], batch_rows=1).generate(rows, 64, 64).images
    )


def test_background_load_reports_problems(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    vae = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1000])  # readable header, data cut short: found only when read
    m = model.load_folder(tmp_path / "m", np.float32, background=True)
    with pytest.raises(model.ModelError, match="truncated or corrupt"):
        Engine(m, [(64, 64)], batch_rows=1).compile()
    vae.unlink()  # a missing file is reported before anything is read or compiled
    with pytest.raises(model.ModelError, match=r"no weights in .*vae"):
        model.load_folder(tmp_path / "m", np.float32, background=True)
