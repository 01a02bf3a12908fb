"""Single-file checkpoints at full size, without their weights: the names and shapes of sd_xl_base_1.0 and
sd_xl_refiner_1.0 (fixtures/sdxl_checkpoint_keys.json, made by make_checkpoint_keys.py with diffusers' own
single-file conversion) as zero-memory arrays. Every key must have a home in our modules and every parameter
of ours be filled; the configs inferred must be SDXL's. (Parity on real numbers: test_engine.py, whose
single-file cases load a tiny checkpoint that diffusers' from_single_file read for the reference.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.engine import attention, convert, single_file
from worker.engine.clip import CLIPConfig, TextEncoder
from worker.engine.unet import UNet, UNetConfig
from worker.engine.vae import VAE, VAEConfig

KEYS = json.loads((Path(__file__).parent / "fixtures" / "sdxl_checkpoint_keys.json").read_text())
# What diffusers' configs for the two say (stabilityai/stable-diffusion-xl-{base,refiner}-1.0)
EXPECTED_UNET = {
    "base": {
        "block_out_channels": [320, 640, 1280],
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [10, 2, 10],
        "cross_attention_dim": 2048,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    },
    "refiner": {
        "block_out_channels": [384, 768, 1536, 1536],
        "attention_head_dim": [6, 12, 24, 24],
        "transformer_layers_per_block": [4, 4, 4, 4],
        "cross_attention_dim": 1280,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    },
}
ZERO = np.zeros((), np.float16)


def _abstract(kind: str) -> dict[str, np.ndarray]:
    """The checkpoint as read-only zero-stride views: every shape, no memory."""
    return {key: np.broadcast_to(ZERO, tuple(shape)) for key, shape in KEYS[kind].items()}


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_every_key_has_a_home_and_every_parameter_is_filled(kind):
    state = _abstract(kind)
    found = single_file.identify(list(state))
    assert found == ("sdxl" if kind == "base" else "sdxl-refiner")
    configs = single_file.infer_configs(state, found)
    unet = configs["unet"]
    # the refiner's first level has no transformer: it takes the mid block's depth, as diffusers' scalar 4 does
    for key, want in EXPECTED_UNET[kind].items():
        got = unet[key]
        if key == "transformer_layers_per_block" and kind == "base":
            assert got[1:] == want[1:]  # level 0 has no transformer; its entry is unused
        else:
            assert got == want, key
    assert configs["vae"]["block_out_channels"] == [128, 256, 512, 512] and configs["vae"]["layers_per_block"] == 2
    te2 = CLIPConfig.from_transformers(configs["text_encoder_2"])
    assert (te2.hidden_size, te2.num_hidden_layers, te2.num_attention_heads, te2.projection_dim) == (1280, 32, 20, 1280)
    networks = {
        "unet": UNet(UNetConfig.from_diffusers(unet, te2.projection_dim), attend=attention.einsum),
        "vae": VAE(VAEConfig.from_diffusers(configs["vae"]), attend=attention.einsum),
        "text_encoder_2": TextEncoder(te2),
    }
    assert networks["unet"].config.time_ids == (6 if kind == "base" else 5)
    if kind == "base":
        te1 = CLIPConfig.from_transformers(configs["text_encoder"])
        assert (te1.hidden_size, te1.num_hidden_layers, te1.hidden_act) == (768, 12, "quick_gelu")
        networks["text_encoder"] = TextEncoder(te1)
    parts = single_file.split(state, configs, found)
    # position_ids and logit_scale are no weights; each of the 32 OpenCLIP layers' in_proj weight and bias
    # becomes three (q, k, v): 2 more each
    assert sum(len(p) for p in parts.values()) == len(state) - (2 if kind == "base" else 1) + 2 * 2 * 32
    filled = 0
    for part, network in networks.items():
        target = convert.flatten(network.shapes())
        views = convert.match(parts[part], target, part)  # raises naming any key without a home
        assert views.keys() == target.keys()
        filled += sum(int(np.prod(v.shape)) for v in views.values())
    skipped = 77 + 1 if kind == "base" else 1  # position_ids (base) and logit_scale: all else fills ours
    assert filled == sum(int(np.prod(s)) for s in KEYS[kind].values()) - skipped


def test_a_missing_tensor_is_named():
    state = _abstract("base")
    del state["model.diffusion_model.output_blocks.2.2.conv.weight"]  # the first up block's upsampler
    configs = single_file.infer_configs(state, "sdxl")
    parts = single_file.split(state, configs, "sdxl")
    unet = UNet(UNetConfig.from_diffusers(configs["unet"], 1280), attend=attention.einsum)
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['up_blocks_0.upsamplers_0.conv.kernel'\]\)"):
        convert.match(parts["unet"], convert.flatten(unet.shapes()), "unet")


def test_a_stray_tensor_is_named():
    state = _abstract("base") | {"model.diffusion_model.extra_block.weight": np.broadcast_to(ZERO, (3,))}
    configs = single_file.infer_configs(state, "sdxl")
    with pytest.raises(single_file.ModelError, match="1 tensors of the checkpoint have no place in SDXL"):
        single_file.split(state, configs, "sdxl")
