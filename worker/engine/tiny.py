"""`tiny`: an SDXL-shaped model with random weights, built offline and deterministically from configs.

Same topology as SDXL base 1.0 (two CLIP text encoders, the second with a projection for the pooled
embedding; text-time conditioning; DownBlock2D + two CrossAttnDownBlock2D with 1/1/2 transformer layers;
the cross-attention mid block; a 4-level VAE, so images are 8x the latent size), with small widths.
Its images are noise: it exists so the whole service runs and is tested without downloading 7 GB.

The folder is written in diffusers format with PyTorch-layout safetensors (what real checkpoints ship),
so every start of the tiny model also goes through the safetensors -> Flax conversion.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine import convert, tokenizer
from worker.engine.model_source import SDXL_SCHEDULER, Configs

VERSION = 2  # bump when the configs or the seed change: a stale folder is rebuilt
SEED = 0
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the components with weights

UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # pooled text (32) + 6 size ids x 8
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
}
VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 128,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.39.0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# Bigger random models for benchmarks, same code path. "sdxl" is SDXL base 1.0's architecture exactly
# (2.57 B UNet parameters), except the text encoders' vocabulary, which is this file's small one: the
# embedding lookup costs the same whatever the vocabulary size.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The second text encoder is wider than the first, as in SDXL (768 and 1280): diffusers' single-file loader
    # tells the two apart by width, and the tests read a tiny single-file checkpoint with it.
    "tiny": {
        "unet": {"cross_attention_dim": 80},
        "vae": {},
        "text": {},
        "text_2": {"hidden_size": 48, "intermediate_size": 96},
    },
    # SDXL's refiner at tiny size: no first text encoder, the UNet attends to the second's 48 and takes 5 time ids
    "tiny-refiner": {
        "unet": {"cross_attention_dim": 48, "projection_class_embeddings_input_dim": 32 + 5 * 8},
        "vae": {},
        "text": None,
        "text_2": {"hidden_size": 48, "intermediate_size": 96},
    },
    # the same with an inpainting UNet: 9 input channels (the latents, the mask, the masked image's latents)
    "tiny-inpaint": {
        "unet": {"cross_attention_dim": 80, "in_channels": 9},
        "vae": {},
        "text": {},
        "text_2": {"hidden_size": 48, "intermediate_size": 96},
    },
    "mid": {
        "unet": {
            "block_out_channels": [128, 256, 512],
            "attention_head_dim": [2, 4, 8],
            "transformer_layers_per_block": [1, 2, 2],
            "cross_attention_dim": 512,
            "addition_time_embed_dim": 64,
            "projection_class_embeddings_input_dim": 256 + 6 * 64,
        },
        "vae": {"block_out_channels": [64, 128, 256, 256]},
        "text": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "projection_dim": 256},
        "text_2": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "projection_dim": 256},
    },
    "sdxl": {
        "unet": {
            "block_out_channels": [320, 640, 1280],
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
        },
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 1024},
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
        },
        "text_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
        },
    },
}


def configs(preset: str = "tiny") -> dict[str, dict[str, Any]]:
    """The four component configs of a preset (diffusers / transformers config.json contents)."""
    p = PRESETS[preset]
    vocab_size = len(_vocab())
    made = {
        "unet": UNET | p["unet"],
        "vae": VAE | p["vae"],
        "text_encoder": _text_config(vocab_size, "quick_gelu") | (p["text"] or {}),
        "text_encoder_2": _text_config(vocab_size, "gelu")
        | {"architectures": ["CLIPTextModelWithProjection"]}
        | p["text_2"],
    }
    if p["text"] is None:  # a refiner
        del made["text_encoder"]
    return made


def model_index(preset: str = "tiny") -> dict[str, Any]:
    if PRESETS[preset]["text"] is not None:
        return MODEL_INDEX
    # the refiner's: no first text encoder or tokenizer, an aesthetic score, an empty negative prompt encoded
    return MODEL_INDEX | {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "requires_aesthetics_score": True,
        "force_zeros_for_empty_prompt": False,
    }


def default_dir(preset: str = "tiny") -> Path:
    base = os.environ.get("SDXL_TINY_DIR") if preset == "tiny" else None
    return Path(base) if base else Path.home() / ".cache" / "sdxl-service" / f"{preset}-v{VERSION}"


def _vocab() -> dict[str, int]:
    # CLIP's byte-level alphabet, each byte alone and as a word end, and no merges: every character is a
    # token, so a prompt of more than 75 characters shows truncation without a 49k-entry vocabulary.
    chars = list(tokenizer.bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}  # <|endoftext|> is the highest id, as in CLIP


def _text_config(vocab_size: int, act: str) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": act,  # CLIP-L uses quick_gelu, OpenCLIP bigG gelu
        "projection_dim": 32,
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 1,
    }


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    tokenizer.write_files(folder, _vocab(), [], pad_token)


def build_params(
    preset: str = "tiny",
    dtype: Any = np.float32,
    parts: tuple[str, ...] | None = None,
    precision: Any = np.float64,
    threads: int = 1,
) -> dict[str, Any]:
    """Random Flax parameters for a preset (all its components, or `parts`), the same on every machine.
    precision, threads: random_leaf's draw, and how many leaves are drawn at once (numpy fills off the GIL);
    float32 on every core is what a benchmark of the full SDXL wants, float64 the values the tests expect."""
    made = Configs.from_dicts(configs(preset), preset)
    shapes = {part: made.module(part, np.float32).shapes() for part in parts or made.parts}
    # Weights drawn with numpy from the shapes alone: Flax's own init compiles the whole forward pass
    # (about 40 s on a CPU). Each leaf's generator is seeded by its path (component included), so neither
    # the order nor which components are built together changes a value.
    items = list(convert.flatten(shapes).items())
    with ThreadPoolExecutor(threads) as pool:
        values = pool.map(lambda item: random_leaf(item[0], tuple(item[1].shape), precision).astype(dtype), items)
        return convert.unflatten(dict(zip((path for path, _ in items), values, strict=True)))


def random_leaf(path: tuple[str, ...], dims: tuple[int, ...], precision: Any = np.float64) -> np.ndarray:
    """One parameter's random value (float32), from a generator seeded by its path. `precision` is the draw's:
    float64 gives the values every test was made with; float32 takes half the time (benchmarks)."""
    x = np.random.default_rng([SEED, zlib.crc32("/".join(path).encode())]).standard_normal(dims, dtype=precision)
    if path[-1] == "kernel":  # variance-preserving, so activations neither vanish nor saturate
        x = x / float(np.sqrt(np.prod(dims[:-1])))
    elif path[-1] == "scale":
        x = 1.0 + 0.1 * x
    else:
        x = (0.5 if path[-1] == "embedding" else 0.05) * x
    return x.astype(np.float32)


def write_configs(folder: Path, preset: str = "tiny") -> None:
    """Everything of a diffusers folder but the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(preset), indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=2))
    if PRESETS[preset]["text"] is not None:
        _write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    _write_tokenizer(folder / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
    for part, config in configs(preset).items():
        (folder / part).mkdir(exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config, indent=2))


def write(
    folder: Path,
    preset: str = "tiny",
    dtype: Any = np.float32,
    variant: str = "",
    precision: Any = np.float64,
    threads: int = 1,
) -> None:
    """Write a random model as a diffusers folder of PyTorch-layout safetensors. `dtype` is the stored
    precision and `variant` names the files as the hub's variants do ("fp16": model.fp16.safetensors);
    precision, threads: see build_params. One component at a time, so the full `sdxl` preset needs one
    component's memory."""
    from safetensors.numpy import save_file

    write_configs(folder, preset)
    for part in configs(preset):
        params = build_params(preset, dtype, parts=(part,), precision=precision, threads=threads)[part]
        stem = "diffusion_pytorch_model" if part in ("unet", "vae") else "model"
        state = convert.flax_to_pt(params)
        del params
        save_file(state, folder / part / f"{stem}{'.' + variant if variant else ''}.safetensors")


def ensure(folder: Path, preset: str = "tiny", dtype: Any = np.float32, variant: str = "") -> None:
    """Build the folder on first use (see write for the options). Written to a temporary name and renamed, so
    a crash leaves no half model."""
    if (folder / "model_index.json").exists():
        return
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    write(tmp, preset=preset, dtype=dtype, variant=variant)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
