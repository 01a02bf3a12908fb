"""IP-Adapters against PyTorch diffusers (fixtures/ip_adapters.npz, made by make_ip_adapter_reference.py on the same
tiny weights, float32): the image processor's pixels, the image encoder's embeddings, one UNet call with the
adapter's attention, and the SDXL pipeline with `ip_adapter_image` at two scales."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from worker.engine import attention, clip_vision, ip_adapter, ip_adapter_source
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
