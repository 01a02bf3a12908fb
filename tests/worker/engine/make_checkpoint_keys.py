"""Make fixtures/sdxl_checkpoint_keys.json: the tensor names and shapes of real single-file SDXL base 1.0 and
refiner 1.0 checkpoints (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0.safetensors), derived with diffusers'
own single-file conversion, not with ours (needs the test extras: torch, diffusers):

    .venv/bin/python tests/worker/engine/make_checkpoint_keys.py tests/worker/engine/fixtures/sdxl_checkpoint_keys.json

1. Names. For each model, a checkpoint with SDXL's exact structure (levels, ResNets per level, transformer
   depths 1/2/10 or 4, 12 and 32 text layers) at small widths is written with single_file.join, every tensor
   filled with its own number (an OpenCLIP in_proj's thirds numbered apart). diffusers' converters
   (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
   convert_open_clip_checkpoint) turn it into diffusers' names; every diffusers parameter must be filled,
   and from the very tensor single_file.split puts there. So the names are those diffusers reads, and a
   swapped pair of same-shaped blocks would be caught.
2. Shapes. diffusers' networks with the real configs, on torch's meta device (no memory): each parameter's
   shape, carried back to its checkpoint name (1x1 convs in the VAE's attention, OpenCLIP's joined in_proj and
   transposed text_projection laid out as the checkpoint holds them).

tests/worker/engine/test_single_file.py reads the file with no torch: every key has a home in our modules
and every parameter of ours is filled, for both checkpoints, and the configs inferred are SDXL's.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from worker.engine import single_file

UNET_COMMON = {
    "layers_per_block": 2,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 128,
    "addition_embed_type_num_heads": 64,
}
REAL = {
    "base": {
        "unet": UNET_COMMON
        | {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "text_encoder": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        "text_encoder_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
    },
    "refiner": {
        "unet": UNET_COMMON
        | {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [384, 768, 1536, 1536],
            "attention_head_dim": [6, 12, 24, 24],
            "transformer_layers_per_block": [4, 4, 4, 4],
            "cross_attention_dim": 1280,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2560,
        },
        "text_encoder_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
    },
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "model_type": "clip_text_model"}


def wrapped(clip_l: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5's CLIPTextModel dropped the `text_model.` level its state dict had; Stability's files (and
    transformers 4's) have it, as diffusers' own detection key says (CHECKPOINT_KEY_NAMES["clip_sdxl"])."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip_l.items()}


def small(kind: str) -> dict[str, dict]:
    """The same structure at small widths (names depend on structure only)."""
    real = REAL[kind]
    levels = len(real["unet"]["block_out_channels"])
    te2 = real["text_encoder_2"] | {
        "hidden_size": 48,
        "intermediate_size": 16,
        "num_attention_heads": 3,
        "projection_dim": 48,
    }
    cfg = {"text_encoder_2": TEXT | te2 | {"vocab_size": 64}}
    cross = 48
    if kind == "base":
        cfg["text_encoder"] = (
            TEXT
            | real["text_encoder"]
            | {"hidden_size": 32, "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 64}
        )
        cross = 80
    ids = 6 if kind == "base" else 5
    cfg["unet"] = real["unet"] | {
        "block_out_channels": [32 * 2 ** min(i, 2) for i in range(levels)],
        "attention_head_dim": 1,
        "cross_attention_dim": cross,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 48 + 8 * ids,
    }
    cfg["vae"] = VAE | {"block_out_channels": [32, 32, 64, 64]}
    return cfg


def numbered(cfg: dict[str, dict], kind: str) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(a single-file state whose every tensor holds its own number, the diffusers-named parts it came from)."""
    torch.manual_seed(0)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    modules = {
        "unet": UNet2DConditionModel(**strip(cfg["unet"])),
        "vae": AutoencoderKL(**strip(cfg["vae"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
    }
    if kind == "base":
        modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    parts = {}
    n = 0
    for part, module in modules.items():
        parts[part] = {}
        for name, tensor in module.state_dict().items():
            if name.endswith("position_ids"):
                continue
            n += 1
            parts[part][name] = np.full(tuple(tensor.shape), float(n), np.float32)
    if kind == "refiner":
        parts["text_encoder"] = {}
        cfg = cfg | {"text_encoder": None}
    parts["text_encoder"] = wrapped(parts["text_encoder"])
    state = single_file.join(parts, cfg)
    if kind == "refiner":  # the refiner's OpenCLIP is embedders.0 and there is no CLIP-L
        state = {k.replace(single_file.BIGG[0], single_file.BIGG[1]): v for k, v in state.items()}
    for key in [k for k in state if k.endswith("attn.in_proj_weight")]:
        third = state[key].shape[0] // 3
        state[key] = state[key].copy()
        state[key][third : 2 * third] += 0.25
        state[key][2 * third :] += 0.5
    return state, parts


def check_names(kind: str) -> None:
    cfg = small(kind)
    state, _ = numbered(cfg, kind)
    ours = single_file.split(state, cfg, "sdxl" if kind == "base" else "sdxl-refiner")
    torch_state = {k: torch.from_numpy(v) for k, v in state.items()}
    theirs = {
        "unet": sfu.convert_ldm_unet_checkpoint(torch_state, cfg["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(torch_state, cfg["vae"]),
    }
    hidden = SimpleNamespace(config=SimpleNamespace(hidden_size=cfg["text_encoder_2"]["hidden_size"]))
    prefix = single_file.BIGG[0] if kind == "base" else single_file.BIGG[1]
    theirs["text_encoder_2"] = sfu.convert_open_clip_checkpoint(hidden, torch_state, prefix=prefix)
    if kind == "base":
        theirs["text_encoder"] = sfu.convert_ldm_clip_checkpoint(torch_state, remove_prefix=single_file.CLIP_L)
    for part, converted in theirs.items():
        converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
        mine = ours[part]
        assert converted.keys() == mine.keys(), (kind, part, sorted(set(converted) ^ set(mine))[:5])
        for key, tensor in converted.items():
            got, want = float(tensor.reshape(-1)[0]), float(np.asarray(mine[key]).reshape(-1)[0])
            assert got == want, (kind, part, key, got, want)
        print(kind, part, len(converted), "names: ours = diffusers', tensor for tensor")


def real_shapes(kind: str) -> dict[str, list[int]]:
    real = REAL[kind]
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT | real["text_encoder_2"]))
        unet = UNet2DConditionModel(**strip(real["unet"]))
        modules = {"unet": unet, "vae": AutoencoderKL(**VAE), "text_encoder_2": te2}
        if kind == "base":
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**TEXT | real["text_encoder"]))
    parts = {}
    for part, module in modules.items():
        parts[part] = {
            name: np.broadcast_to(np.zeros((), np.float16), tuple(t.shape))
            for name, t in module.state_dict().items()
            if not name.endswith("position_ids")
        }
    if "text_encoder" in parts:
        parts["text_encoder"] = wrapped(parts["text_encoder"])
    cfg = {"unet": real["unet"], "vae": VAE, "text_encoder_2": TEXT | real["text_encoder_2"]}
    if kind == "base":
        cfg["text_encoder"] = TEXT | real["text_encoder"]
    else:
        parts["text_encoder"] = {}
    state = single_file.join(parts, cfg)
    if kind == "refiner":
        state = {k.replace(single_file.BIGG[0], single_file.BIGG[1]): v for k, v in state.items()}
    # what Stability's files hold beside the weights: CLIP-L's position_ids buffer and OpenCLIP's contrastive
    # logit_scale (no weight of an SDXL network; the loaders must pass over them)
    if kind == "base":
        state[f"{single_file.CLIP_L}text_model.embeddings.position_ids"] = np.zeros((1, 77))
    detect = ("clip_sdxl", "open_clip_sdxl", "xl_base") if kind == "base" else ("open_clip_sdxl_refiner", "xl_refiner")
    for name in detect:  # the keys diffusers itself recognises these checkpoints by
        assert sfu.CHECKPOINT_KEY_NAMES[name] in state, (kind, name)
    state[f"{single_file.BIGG[0] if kind == 'base' else single_file.BIGG[1]}logit_scale"] = np.zeros(())
    return {k: list(v.shape) for k, v in sorted(state.items())}


def main(out: str) -> None:
    result = {}
    for kind in ("base", "refiner"):
        check_names(kind)
        result[kind] = real_shapes(kind)
        total = sum(int(np.prod(s)) for s in result[kind].values())
        print(kind, len(result[kind]), "tensors,", f"{total / 1e9:.3f} B values")
    with open(out, "w") as f:
        json.dump(result, f, indent=0, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
