"""Loading: diffusers folders, single-file checkpoints, hub ids, bad folders and files, bfloat16."""

import json

import jax
import numpy as np
import pytest

from worker.engine import convert, model, model_source, single_file, tensor_file, tiny
from worker.engine.engine import Engine, Programs, Row


def test_single_file_and_folder_hold_the_same_weights(tiny_single_file, tiny_dir, tiny32):
    m = model.load_single_file(tiny_single_file, model.LoadOptions(np.float32, config_dir=tiny_dir))
    a, b = convert.flatten(tiny32.params), convert.flatten(m.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


INFERRED = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "projection_class_embeddings_input_dim",
    "addition_time_embed_dim",
    "use_linear_projection",
    "latent_channels",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "max_position_embeddings",
    "hidden_act",
)


def test_single_file_configs_are_inferred_from_the_tensors(tiny_single_file, tiny_dir):
    """Everything the tensors say matches the folder's configs; the head count follows SDXL's 64-wide heads
    (the tiny model's are narrower, which is why its tests give the folder's configs, as diffusers' do)."""
    inferred = single_file.infer_configs(tensor_file.read(tiny_single_file), "sdxl")
    for part in model_source.COMPONENTS:
        want = json.loads((tiny_dir / part / "config.json").read_text())
        for key in INFERRED:
            if key in want:
                assert inferred[part][key] == want[key], (part, key)
    assert inferred["unet"]["attention_head_dim"] == [1, 1, 1]  # max(1, width // 64)
    # cross-attention levels take their own depth; the one without takes the mid block's (diffusers' [-1])
    assert inferred["unet"]["transformer_layers_per_block"][1:] == [1, 2]


def test_single_file_without_a_config_folder_uses_sdxl_defaults(tiny_single_file, tmp_path):
    """SDXL_MODEL=/path/model.safetensors alone: the tokenizers are CLIP's (49,408 tokens), so a checkpoint
    with another vocabulary is refused by name, not misread."""
    with pytest.raises(model.ModelError, match="vocabulary has 514 entries, not CLIP's 49,408"):
        model.load(str(tiny_single_file), model.LoadOptions(np.float32))


def test_a_single_file_alone_just_works(tiny_dir, tmp_path):
    """SDXL_MODEL=/path/model.safetensors with nothing beside it: configs inferred from the tensors, CLIP's
    tokenizers (the tiny weights with CLIP-sized token embeddings), SDXL's scheduler; an image comes out."""
    parts, configs = single_file.from_folder(tiny_dir)
    rng = np.random.default_rng(0)
    for part in ("text_encoder", "text_encoder_2"):
        key = "text_model.embeddings.token_embedding.weight"
        parts[part][key] = rng.standard_normal((49408, parts[part][key].shape[1])).astype(np.float32)
    path = tmp_path / "my-finetune.safetensors"
    single_file.write(path, parts, configs)
    m = model.load(str(path), model.LoadOptions(np.float32))
    assert m.name == str(path) and len(m.tokenizer) == 49408 and m.noise.timestep_spacing == "leading"
    out = Engine(m, [(64, 64)], batch_rows=1).generate([Row("a photo of a cat", steps=2)], 64, 64)
    assert out.finite == [True] and out.images.std() > 1


def test_builtin_tokenizers_are_clips(tmp_path, monkeypatch):
    from worker.engine import tokenizer

    monkeypatch.setenv("SDXL_TOKENIZER_DIR", str(tmp_path / "tok"))
    folder = tokenizer.default_folder()
    first, second = tokenizer.load(folder / "tokenizer"), tokenizer.load(folder / "tokenizer_2")
    assert len(first) == len(second) == 49408
    # OpenAI CLIP's ids for these words; the second tokenizer pads with "!" (0), the first with <|endoftext|>
    assert first("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = lambda tok: tok("a cat", padding="max_length", max_length=6).input_ids  # noqa: E731
    assert padded(first) == [49406, 320, 2368, 49407, 49407, 49407]
    assert padded(second) == [49406, 320, 2368, 49407, 0, 0]


def _state_with(keys: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, np.float16) for k, shape in keys.items()}


@pytest.mark.parametrize(
    "keys,named",
    [
        ({"model.diffusion_model.joint_blocks.0.x.weight": (2,)}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.qkv.weight": (2,)}, "Flux"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (2,),
                "cond_stage_model.transformer.x": (2,),
                "first_stage_model.x": (2,),
            },
            "Stable Diffusion 1.x",
        ),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": (2,), "cond_stage_model.model.x": (2,)},
            "Stable Diffusion 2",
        ),
        ({"lora_unet_down_blocks_0.lora_down.weight": (2,)}, "LoRA"),
        ({"down_blocks.0.resnets.0.conv1.weight": (2,)}, "one diffusers component"),
        ({"something.else": (2,)}, "no SDXL part"),
    ],
)
def test_a_checkpoint_of_another_family_is_named(tmp_path, keys, named):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file(_state_with(keys), path)
    with pytest.raises(model.ModelError, match=f"not an SDXL checkpoint: it looks like .*{named}"):
        model.load(str(path))


def test_the_refiner_alone_is_refused_by_name(tmp_path):
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.model.text_projection",
        "first_stage_model.x",
    ]
    assert single_file.identify(keys) == "sdxl-refiner"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(model.ModelError, match="no such file or folder"):
        model.load(str(tmp_path / "nope.safetensors"))


def test_default_dtype_is_bfloat16_and_images_are_finite(tiny_dir):
    m = model.load("tiny", model.LoadOptions(tiny_dir=tiny_dir))
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
    with pytest.raises(model.ModelError, match="neither 'tiny', an existing folder or file, nor a hub id"):
        model.load("no-such-thing")


def test_missing_weights_are_named(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(model.ModelError, match=r"no weights in .*vae"):
        model.load_folder(tmp_path / "m")


def test_parameter_shapes_are_cached_between_starts(tiny_dir, tmp_path, monkeypatch):
    first = model.load_folder(tiny_dir, model.LoadOptions(np.float32, shape_cache=tmp_path))
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json")) == sorted(model_source.COMPONENTS)

    def traced(*_, **__):
        pytest.fail("a network's init was traced again")

    from worker.engine.clip import TextEncoder
    from worker.engine.unet import UNet
    from worker.engine.vae import VAE

    for cls in (UNet, VAE, TextEncoder):
        monkeypatch.setattr(cls, "shapes", traced)
    second = model.load_folder(
        tiny_dir, model.LoadOptions(np.float32, shape_cache=tmp_path)
    )  # shapes from the cache, no tracing
    a, b = convert.flatten(first.params), convert.flatten(second.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.asarray(v).dtype == np.float32 and np.asarray(v).flags.c_contiguous for v in b.values())


def test_a_variant_folder_is_read_only_when_asked_for(tmp_path, tiny32):
    """The hub's fp16 variant naming (model.fp16.safetensors): read with variant="fp16", in the serving dtype."""
    folder = tmp_path / "fp16"
    tiny.write(folder, dtype=np.float16, variant="fp16")
    assert sorted(p.name for p in folder.glob("unet/*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(model.ModelError) as err:  # no variant asked for: the error names the files and the setting
        model.load_folder(folder, model.LoadOptions(np.float32))
    assert "diffusion_pytorch_model.fp16.safetensors" in str(err.value) and "SDXL_MODEL_VARIANT" in str(err.value)

    m = model.load_folder(folder, model.LoadOptions(np.float32, variant="fp16"))
    got, want = convert.flatten(m.params), convert.flatten(tiny32.params)
    assert got.keys() == want.keys()
    for k in want:  # the same weights, rounded through float16
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], np.asarray(want[k]).astype(np.float16).astype(np.float32))
    with pytest.raises(model.ModelError, match=r"model\.bf16\.safetensors.*SDXL_MODEL_VARIANT=bf16"):
        model.load_folder(folder, model.LoadOptions(np.float32, variant="bf16"))


# The weight files of stabilityai/stable-diffusion-xl-base-1.0 (each in float32 and the fp16 variant, with
# Flax, ONNX and OpenVINO copies beside them), plus a sharded text encoder as transformers names its shards.
SDXL_BASE_FILES = [
    "model_index.json",
    "sd_xl_base_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx_data",
    "unet/openvino_model.bin",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/flax_model.msgpack",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.fp16.json",
    "text_encoder_2/model.fp16-00001-of-00002.safetensors",
    "text_encoder_2/model.fp16-00002-of-00002.safetensors",
]


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


def test_flax_msgpack_folders_are_refused_with_advice(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    unet = tmp_path / "m" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_flax_model.msgpack")
    with pytest.raises(model.ModelError, match=r"Flax msgpack and PyTorch \.bin weights are not read"):
        model.load_folder(tmp_path / "m")


def test_a_config_that_is_not_sdxl_is_named(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    config = tmp_path / "m" / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"addition_embed_type": None}))
    with pytest.raises(model.ModelError, match="not an SDXL base model: the UNet's addition_embed_type is None"):
        model.load_folder(tmp_path / "m")


def test_vae_dtype_float32_on_a_bfloat16_model(tiny_dir):
    import jax.numpy as jnp

    m = model.load_folder(tiny_dir, model.LoadOptions(jnp.bfloat16, vae_dtype="float32"))
    assert {str(np.asarray(x).dtype) for x in convert.flatten(m.params["vae"]).values()} == {"float32"}
    assert {str(np.asarray(x).dtype) for x in convert.flatten(m.params["unet"]).values()} == {"bfloat16"}
    out = Engine(m, [(64, 64)], batch_rows=1).generate([Row("x", steps=2)], 64, 64)
    assert out.finite == [True]
    assert model.resolve_vae_dtype("auto", jnp.bfloat16, m.vae) == jnp.bfloat16  # bf16 has float32's range
    assert model.resolve_vae_dtype("auto", jnp.float16, m.vae) == jnp.float32  # force_upcast, as diffusers


def test_background_load_gives_the_same_engine(tiny_dir, tiny32):
    """load(background=True) returns with the weights' shapes, nothing read; the engine streams them onto its
    devices on a thread and Engine.compile() waits for them after the programs. Same weights on the devices,
    same images as a plain load, and no host copy left."""
    m = model.load_folder(tiny_dir, model.LoadOptions(np.float32, background=True))
    for leaf in convert.flatten(m.params).values():  # shapes in the serving dtype until the read ends
        assert leaf.dtype == np.float32 and hasattr(leaf, "shape")
    engine = Engine(m, [(64, 64)], batch_rows=1)
    engine.compile(Programs.guided | Programs.uint8)  # the programs the rows below run
    assert m.unread is None and m.weights_s > 0 and engine.params is not None
    assert m.weights_dropped and m.weights_hash == tiny32.digest_weights()  # hashed as the groups passed
    plain = Engine(tiny32, [(64, 64)], batch_rows=1)
    got, want = convert.flatten(engine.params), convert.flatten(plain.params)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    rows = [Row("a bowl of fruit", seed=3, steps=3)]
    np.testing.assert_array_equal(engine.generate(rows, 64, 64).images, plain.generate(rows, 64, 64).images)


def test_background_load_reports_problems(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    vae = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1000])  # readable header, data cut short: found only when read
    m = model.load_folder(tmp_path / "m", model.LoadOptions(np.float32, background=True))
    with pytest.raises(model.ModelError, match="truncated or corrupt"):
        Engine(m, [(64, 64)], batch_rows=1).compile(Programs.NONE)  # no program: the placement alone
    vae.unlink()  # a missing file is reported before anything is read or compiled
    with pytest.raises(model.ModelError, match=r"no weights in .*vae"):
        model.load_folder(tmp_path / "m", model.LoadOptions(np.float32, background=True))


def test_a_unet_override_that_is_not_there_is_refused(tiny_dir):
    from worker.engine.model import LoadOptions, ModelError, load_folder

    with pytest.raises(ModelError, match="no such file or folder"):
        load_folder(tiny_dir, LoadOptions(np.float32, unet=tiny_dir / "nope.safetensors"))


def test_a_refiner_is_not_served_as_the_base(tiny_dir, tmp_path):
    from worker.engine import tiny
    from worker.engine.engine import Engine, EngineInputError
    from worker.engine.model import LoadOptions, load_folder

    tiny.write(tmp_path / "refiner", preset="tiny-refiner")
    refiner = load_folder(tmp_path / "refiner", LoadOptions(np.float32))
    assert refiner.refiner and refiner.tokenizer is None and "text_encoder" not in refiner.params
    with pytest.raises(EngineInputError, match="is a refiner"):
        Engine(refiner, [(64, 64)], batch_rows=1)


@pytest.mark.parametrize("case", ["text2img", "img2img"])
def test_a_vae_override_matches_diffusers_with_that_vae(tiny_dir, models_reference, tmp_path, case):
    """SDXL_VAE: another VAE folder (moved weights, another scaling factor) in place of the model's, against
    diffusers' pipelines given `vae=AutoencoderKL.from_pretrained(that folder)`, float32, same latents. The
    model's own VAE must miss, and so must the other VAE's weights with the model's own config."""
    import dataclasses

    from tests.helpers import variants
    from tests.helpers.variants import folder_digest
    from worker.engine.model import LoadOptions, load_folder

    vae_dir = variants.write_vae(tiny_dir, tmp_path / "other-vae")
    assert bytes(models_reference["vae_sha256"]).decode() == folder_digest(vae_dir), "rerun make_models_reference"
    meta = models_reference["meta"]
    served = load_folder(tiny_dir, LoadOptions(np.float32, vae=vae_dir), name="tiny")
    assert served.name == "tiny+vae:other-vae" and served.vae.scaling_factor == variants.VAE_SCALING_FACTOR
    own_config = dataclasses.replace(
        served,
        configs=dataclasses.replace(served.configs, vae=model.load_folder(tiny_dir, model.LoadOptions(np.float32)).vae),
    )
    row = Row(meta["prompt"], meta["negative_prompt"], seed=meta["seed"], guidance_scale=7.5, steps=meta["steps"])
    if case == "img2img":
        row = dataclasses.replace(row, image=models_reference["image"], strength=0.6)
    want = models_reference[f"vae_override/{case}/image"][0]
    misses = []
    for m in (served, model.load_folder(tiny_dir, model.LoadOptions(np.float32)), own_config):
        out = Engine(m, [(64, 96)], batch_rows=1).generate(
            [row], 64, 96, latents=models_reference["latents"], output="float32"
        )
        misses.append(float(np.abs(out.images[0] - want).max()))
    assert misses[0] < 1e-4, misses
    assert min(misses[1:]) > 1e-3, misses


def test_a_vae_override_that_is_not_a_vae_folder_is_refused(tiny_dir, tmp_path):
    from worker.engine.model import LoadOptions, ModelError, load_folder

    with pytest.raises(ModelError, match=r"no config\.json"):
        load_folder(tiny_dir, LoadOptions(np.float32, vae=tmp_path))


def test_a_model_over_the_memory_left_is_refused_before_its_weights_are_read(tiny_dir, tiny32, monkeypatch):
    assert tiny32.nbytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(tiny32.params))
    read = []
    monkeypatch.setattr(tensor_file, "read", lambda *a, **k: read.append(a) or {})
    with pytest.raises(model.ModelTooLarge, match=f"its weights take {tiny32.nbytes} bytes, over the 1000 left"):
        model.load_folder(tiny_dir, model.LoadOptions(np.float32, max_bytes=1000))
    assert read == []
    with pytest.raises(model.ModelError):  # a model that fits is read (here: files that hold nothing)
        model.load_folder(tiny_dir, model.LoadOptions(np.float32, max_bytes=tiny32.nbytes))
    assert read
    monkeypatch.undo()
    fits = model.load("tiny", model.LoadOptions(np.float32, tiny_dir=tiny_dir, max_bytes=tiny32.nbytes))
    assert fits.nbytes == tiny32.nbytes
