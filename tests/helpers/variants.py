"""Weights files derived from the tiny model, made the same wherever this runs (the make_*_reference.py scripts,
the tests): each tensor moved by a fixed amount seeded by its name.

- write_unet: a UNet-only file, as SDXL-Lightning ships its distilled UNet (`sdxl_lightning_4step_unet.safetensors`:
  diffusers' UNet layout, no config);
- write_vae: a VAE folder (config.json and weights), as madebyollin/sdxl-vae-fp16-fix or a fine-tune's VAE ships,
  with another scaling factor so that using the model's own config instead shows;
- write_lora: a LoRA adapter in kohya's or diffusers/PEFT's layout (write_random_lora: for any model; the
  benchmarks use it too);
- write_controlnet: a random ControlNet for the tiny model (a diffusers ControlNetModel folder), its zero
  convolutions random too, so that it changes the image;
- write_taesd: a random TAESD (a diffusers AutoencoderTiny folder: config.json and the decoder's weights), for the
  preview decoder's parity fixture (make_taesd_reference.py);
- folder_digest: what a fixture records of such a folder (make_models_reference.py, test_model.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from worker.engine import lora

VAE_SCALING_FACTOR = 0.18215  # SD 1.5's: not the tiny model's 0.13025


def _moved(state: dict[str, np.ndarray], amount: float) -> dict[str, np.ndarray]:
    moved = {}
    for name, value in sorted(state.items()):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        scale = float(np.abs(value).mean()) or 1.0
        moved[name] = (value + amount * scale * rng.standard_normal(value.shape)).astype(value.dtype)
    return moved


def write_unet(tiny_dir: Path, path: Path) -> Path:
    save_file(_moved(load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"), 0.3), path)
    return path


def write_vae(tiny_dir: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((tiny_dir / "vae" / "config.json").read_text()) | {"scaling_factor": VAE_SCALING_FACTOR}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = _moved(load_file(tiny_dir / "vae" / "diffusion_pytorch_model.safetensors"), 0.1)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def write_lora(
    tiny_dir: Path,
    path: Path,
    layout: str,
    rank: int,
    seed: int,
    parts: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"),
    alpha: float | None = None,
    peft: dict[str, dict[str, Any]] | None = None,
    strength: float = 0.6,
) -> Path:
    """A random LoRA adapter for the tiny model in kohya's or diffusers/PEFT's layout (write_random_lora)."""
    from types import SimpleNamespace

    from worker.engine.model_source import Configs

    configs = {p: json.loads((tiny_dir / p / "config.json").read_text()) for p in (*lora.PARTS, "vae")}
    made = Configs.from_dicts(configs, str(tiny_dir))
    model = SimpleNamespace(configs=made, params=_shapes(json.dumps(configs, sort_keys=True)), unet=made.unet)
    return write_random_lora(model, path, layout, rank, seed, parts, alpha, peft, strength)


def write_random_lora(
    model: Any,
    path: Path,
    layout: str,
    rank: int,
    seed: int,
    parts: Sequence[str] = lora.PARTS,
    alpha: float | None = None,
    peft: dict[str, dict[str, Any]] | None = None,
    strength: float = 0.6,
) -> Path:
    """A random adapter for `model` (anything with .configs, .params and .unet), as trainers write them, for
    tests and benchmarks (bench/lora.py). layout "kohya": `lora_unet_*` in the original SDXL UNet's module names
    (input_blocks_4_1_...), `lora_te1_*`/`lora_te2_*`, `.lora_down/.lora_up`, an `.alpha` per module when
    `alpha` is given; "diffusers": PEFT's `unet.<module>.lora_A/lora_B.weight`; "diffusers-old": diffusers'
    older names, the UNet's attentions as attention processors (`attn1.processor.to_q_lora.down.weight`), its
    other layers `.lora.down.weight`, the text encoders `.lora_linear_layer.down.weight`.
    peft: {part: PEFT LoraConfig as a dict} written into the header as diffusers' save_lora_weights writes it
    (`__metadata__["lora_adapter_metadata"]`, keys prefixed by part). strength: the up factors' scale (an adapter
    with a large alpha/rank needs a small one, or the tiny model's 4 steps amplify float32 rounding past parity)."""
    found = lora.targets(model)
    known = lora.names(model, list(found))
    rng = np.random.default_rng(seed)
    sgm = ("input_blocks", "middle_block", "output_blocks")
    state: dict[str, np.ndarray] = {}
    for key, target in sorted(found.items()):
        if target.part not in parts:
            continue
        options = [n for n, k in known.items() if k == key]
        if layout == "kohya":  # the UNet in the original SDXL module names, as kohya's SDXL trainer writes them
            kohya = [n for n in options if n.startswith("lora_")]
            (name,) = [n for n in kohya if target.part != "unet" or any(b in n for b in sgm)]
            down_key, up_key = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
        elif layout == "diffusers-old":
            (name,) = [n for n in options if not n.startswith("lora_")]
            down_key, up_key = _old_diffusers_keys(name)
        else:
            (name,) = [n for n in options if not n.startswith("lora_")]
            down_key, up_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        state[down_key] = (rng.standard_normal((rank, target.fan_in)) / np.sqrt(target.fan_in)).astype(np.float32)
        state[up_key] = (strength * rng.standard_normal((target.fan_out, rank)) / np.sqrt(rank)).astype(np.float32)
        if alpha is not None:
            state[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    metadata = None
    if peft is not None:  # diffusers' LoraBaseMixin.write_lora_layers, and _pack_dict_with_prefix per part
        flat = {f"{part}.{k}": list(v) if isinstance(v, set) else v for part, c in peft.items() for k, v in c.items()}
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True)}
    save_file(state, path, metadata=metadata)
    return path


def _old_diffusers_keys(name: str) -> tuple[str, str]:
    """diffusers' older key names for a module `name` (`unet.<module>` / `text_encoder.<module>`)."""
    if name.startswith("unet."):
        head, _, last = name.rpartition(".")
        if head.endswith((".attn1", ".attn2")) or (last == "0" and head.endswith(".to_out")):
            if last == "0":  # to_out.0
                head, last = head.rpartition(".")[0], "to_out"
            return f"{head}.processor.{last}_lora.down.weight", f"{head}.processor.{last}_lora.up.weight"
        return f"{name}.lora.down.weight", f"{name}.lora.up.weight"
    return f"{name}.lora_linear_layer.down.weight", f"{name}.lora_linear_layer.up.weight"


@functools.cache
def _shapes(configs_json: str) -> dict:
    """The parameter shapes lora.targets reads when a model has no weights (what it would trace itself), traced
    once per configs: a second each time, and the tests write dozens of adapters."""
    from worker.engine import lora
    from worker.engine.model_source import Configs

    made = Configs.from_dicts(json.loads(configs_json), "shapes")
    return {part: made.module(part, np.float32).shapes() for part in lora.PARTS if part in made.parts}


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


CONTROLNET_EMBEDDING = (8, 16, 16, 32)  # the tiny ControlNet's conditioning embedding: 8x down, as the VAE
CONTROLNET_EMBEDDING_GAIN = 1.8


def write_controlnet(
    tiny_dir: Path, folder: Path, seed: int, embedding: tuple[int, ...] = CONTROLNET_EMBEDDING
) -> Path:
    """A random ControlNet for the model in `tiny_dir`, as a diffusers ControlNetModel folder (what
    ControlNetModel.from_unet makes of its UNet, with the conditioning embedding's widths `embedding`: SDXL's
    ControlNets have (16, 32, 96, 256)), every weight drawn from `seed` and its name, the zero convolutions included
    (zeros would make every ControlNet a no-op)."""
    from worker.engine import attention, convert, tiny
    from worker.engine.controlnet import ControlNet, ControlNetConfig

    unet = json.loads((tiny_dir / "unet" / "config.json").read_text())
    raw = unet | {"conditioning_embedding_out_channels": list(embedding)}
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    config = ControlNetConfig.from_diffusers(raw, pooled)
    shapes = ControlNet(config, attention.einsum).shapes()
    params = {
        path: tiny.random_leaf((f"controlnet-{seed}", *path), tuple(leaf.shape))
        for path, leaf in convert.flatten(shapes).items()
    }
    # The control image's embedding made to carry the image (a trained ControlNet's does): drawn like the rest, each
    # of its seven convolutions and SiLUs halves the image's part, and two control images would give nearly the
    # same picture.
    for path in params:
        if path[0] == "controlnet_cond_embedding" and path[-1] == "kernel":
            params[path] = params[path] * np.float32(CONTROLNET_EMBEDDING_GAIN)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_diffusers(), indent=2))
    save_file(convert.flax_to_pt(convert.unflatten(params)), folder / "diffusion_pytorch_model.safetensors")
    return folder


IP_ENCODER = {  # the tiny IP-Adapter's image encoder: a CLIPVisionModelWithProjection config.json
    "model_type": "clip_vision_model",
    "architectures": ["CLIPVisionModelWithProjection"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 24,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
IP_GAIN = 3.0  # the adapter's key/value projections drawn larger, so that its scale and image show in 3 steps


def write_ip_adapter(tiny_dir: Path, folder: Path, seed: int, encoder: dict[str, Any] | None = None) -> Path:
    """A random IP-Adapter for the model in `tiny_dir` as h94/IP-Adapter ships one: `folder/ip-adapter.safetensors`
    in diffusers' load_ip_adapter layout and `folder/image_encoder/` (a CLIPVisionModelWithProjection of config
    `encoder`, IP_ENCODER's tiny one by default), every weight drawn from `seed` and its name. Returns the weights
    file."""
    import jax

    from worker.engine import convert, tiny
    from worker.engine.clip_vision import VisionConfig, VisionEncoder
    from worker.engine.ip_adapter import ImageProjection, IPAdapterConfig, cross_attentions
    from worker.engine.unet import UNetConfig

    raw = json.loads((tiny_dir / "unet" / "config.json").read_text())
    unet = UNetConfig.from_diffusers(
        raw, raw["projection_class_embeddings_input_dim"] - 6 * raw["addition_time_embed_dim"]
    )
    encoder_config = IP_ENCODER if encoder is None else encoder
    vision = VisionConfig.from_transformers(encoder_config)
    draw = lambda *path, dims: tiny.random_leaf((f"ip-adapter-{seed}", *path), dims)  # noqa: E731

    drawn = {p: draw(*p, dims=tuple(leaf.shape)) for p, leaf in convert.flatten(VisionEncoder(vision).shapes()).items()}
    token = drawn.pop(("vision_model", "embeddings", "class_embedding"))
    state = convert.flax_to_pt(convert.unflatten(drawn)) | {"vision_model.embeddings.class_embedding": token}
    (folder / "image_encoder").mkdir(parents=True, exist_ok=True)
    (folder / "image_encoder" / "config.json").write_text(json.dumps(encoder_config, indent=2))
    save_file(state, folder / "image_encoder" / "model.safetensors")

    config = IPAdapterConfig(vision, unet.cross_attention_dim)
    shapes = ImageProjection(config).init(jax.random.key(0), np.zeros((1, vision.projection_dim)))
    proj = {p: draw("image_proj", *p, dims=tuple(v.shape)) for p, v in convert.flatten(shapes["params"]).items()}
    weights = {f"image_proj.{k}": v for k, v in convert.flax_to_pt(convert.unflatten(proj)).items()}
    widths = dict(_attention_widths(unet))
    for i, path in enumerate(cross_attentions(unet)):
        for name in ("to_k_ip", "to_v_ip"):
            kernel = draw(*path, name, "kernel", dims=(unet.cross_attention_dim, widths[path[0]]))
            weights[f"ip_adapter.{2 * i + 1}.{name}.weight"] = np.ascontiguousarray(kernel.T * np.float32(IP_GAIN))
    save_file(weights, folder / "ip-adapter.safetensors")
    return folder / "ip-adapter.safetensors"


def _attention_widths(unet: Any) -> list[tuple[str, int]]:
    """Each block's name with its width (a cross-attention's inner width in diffusers' SDXL UNet)."""
    c = unet.block_out_channels
    out = [(f"down_blocks_{i}", w) for i, w in enumerate(c)] + [(f"up_blocks_{i}", w) for i, w in enumerate(c[::-1])]
    return [*out, ("mid_block", c[-1])]


def write_taesd(folder: Path, seed: int, config: dict[str, Any]) -> Path:
    """A random TAESD as a diffusers AutoencoderTiny folder: `config` (an AutoencoderTiny config.json's values)
    and the decoder's weights (`decoder.*`, every one drawn from `seed` and its name; the encoder's are not
    written: nothing here reads them)."""
    from worker.engine import convert, tiny
    from worker.engine.taesd import TAESDConfig, TAESDDecoder

    shapes = TAESDDecoder(TAESDConfig.from_diffusers(config)).shapes()
    params = {
        path: tiny.random_leaf((f"taesd-{seed}", *path), tuple(leaf.shape))
        for path, leaf in convert.flatten(shapes).items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", **config}, indent=2))
    state = {f"decoder.{k}": v for k, v in convert.flax_to_pt(convert.unflatten(params)).items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder
