"""Single-file SDXL checkpoints: the `sd_xl_base_1.0.safetensors` layout that Stability's reference code
(`sgm`) writes and most community fine-tunes ship in.

    model.diffusion_model.*             the UNet, in the original LDM naming (input_blocks, middle_block, ...)
    conditioner.embedders.0.transformer.*   CLIP ViT-L, in transformers' naming (base only)
    conditioner.embedders.1.model.*     OpenCLIP ViT-bigG, in OpenCLIP's naming (embedders.0 in the refiner)
    first_stage_model.*                 the VAE, in the original LDM naming (encoder.down.N.block.M, ...)

Each tensor is renamed to diffusers' name (`module_pairs`: one table of module prefixes per network, made from
the architecture, used both ways), then converted like a folder's. The configs are inferred from the tensors'
names and shapes; what the tensors cannot tell (SDXL's 64-wide attention heads, the VAE's scaling factor,
the scheduler, the tokenizers) is SDXL's own default, or a diffusers folder's when one is given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine import folder, tensor_file, tokenizer
from worker.engine.model_source import (
    COMPONENTS,
    SDXL_SCHEDULER,
    Component,
    Configs,
    LoadOptions,
    ModelError,
    Source,
    convert_component,
)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
BIGG = ("conditioner.embedders.1.model.", "conditioner.embedders.0.model.")  # base, refiner
IGNORED = ("logit_scale", "attn_mask", "position_ids")  # buffers and OpenCLIP's contrastive scale: no weights
HEAD_WIDTH = 64  # SDXL's attention heads are 64 wide (num_head_channels); the tensors do not say it

RESNET_UNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
RESNET_VAE = {"nin_shortcut": "conv_shortcut"}
ATTENTION_VAE = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


class NotSDXL(ModelError):
    """A checkpoint of another family; the message names what was found."""


def identify(keys: list[str]) -> str:
    """What a checkpoint is, from its key names: "sdxl", "sdxl-refiner", or a ModelError naming the family."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(UNET) and has(CLIP_L) and has(BIGG[0]) and has(VAE):
        return "sdxl"
    if has(UNET) and has(BIGG[1]) and not has(CLIP_L) and has(VAE):
        return "sdxl-refiner"
    sample = ", ".join(sorted(keys)[:3])
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        found = "Stable Diffusion 3 (an MMDiT: joint_blocks)"
    elif has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        found = "Flux (double_blocks/single_blocks)"
    elif has("cond_stage_model.transformer."):
        found = "Stable Diffusion 1.x (one CLIP ViT-L text encoder: cond_stage_model.transformer)"
    elif has("cond_stage_model.model."):
        found = "Stable Diffusion 2.x (one OpenCLIP ViT-H text encoder: cond_stage_model.model)"
    elif has("lora_unet_") or any(".lora_" in k or "lora_A" in k for k in keys):
        found = "a LoRA adapter, not a model"
    elif has("down_blocks.") or has("conv_in."):
        found = "one diffusers component on its own (down_blocks.*), not a whole checkpoint: use the model's folder"
    elif has(UNET):
        found = f"a UNet checkpoint without SDXL's two text encoders and VAE (conditioner.embedders.*, {VAE}*)"
    else:
        found = f"no SDXL part (keys such as {sample})"
    raise NotSDXL(f"not an SDXL checkpoint: it looks like {found}")


# ---------------------------------------------------------------- the name tables


def _unet_pairs(cfg: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(LDM module prefix, diffusers module prefix, inner renames) for the UNet."""
    yield "time_embed.0", "time_embedding.linear_1", {}
    yield "time_embed.2", "time_embedding.linear_2", {}
    yield "label_emb.0.0", "add_embedding.linear_1", {}
    yield "label_emb.0.2", "add_embedding.linear_2", {}
    yield "input_blocks.0.0", "conv_in", {}
    yield "out.0", "conv_norm_out", {}
    yield "out.2", "conv_out", {}
    layers, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            yield f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", RESNET_UNET
            if kind.startswith("CrossAttn"):
                yield f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", {}
        if i < levels - 1:
            yield f"input_blocks.{1 + i * (layers + 1) + layers}.0.op", f"down_blocks.{i}.downsamplers.0.conv", {}
    yield "middle_block.0", "mid_block.resnets.0", RESNET_UNET
    yield "middle_block.1", "mid_block.attentions.0", {}
    yield "middle_block.2", "mid_block.resnets.1", RESNET_UNET
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            yield f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", RESNET_UNET
            if attn:
                yield f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", {}
            if j == layers and i < levels - 1:
                yield f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", {}


def _vae_pairs(cfg: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    levels, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    for side in ("encoder", "decoder"):
        yield f"{side}.conv_in", f"{side}.conv_in", {}
        yield f"{side}.conv_out", f"{side}.conv_out", {}
        yield f"{side}.norm_out", f"{side}.conv_norm_out", {}
        yield f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", RESNET_VAE
        yield f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", ATTENTION_VAE
        yield f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", RESNET_VAE
    for i in range(levels):
        for j in range(layers):
            yield f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", RESNET_VAE
        if i < levels - 1:
            yield f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", {}
        # the decoder's LDM levels count up from the smallest image; diffusers' up_blocks from the latents
        for j in range(layers + 1):
            yield f"decoder.up.{levels - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", RESNET_VAE
        if i < levels - 1:
            yield f"decoder.up.{levels - 1 - i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", {}
    yield "quant_conv", "quant_conv", {}
    yield "post_quant_conv", "post_quant_conv", {}


def _bigg_pairs(layers: int) -> Iterator[tuple[str, str, dict[str, str]]]:
    yield "token_embedding", "text_model.embeddings.token_embedding", {}
    yield "ln_final", "text_model.final_layer_norm", {}
    for k in range(layers):
        yield f"transformer.resblocks.{k}", f"text_model.encoder.layers.{k}", OPENCLIP_LAYER


def _rename(key: str, pairs: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """key's diffusers name by its longest matching module prefix, or None."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in pairs:
            target, inner = pairs[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return None


# ---------------------------------------------------------------- configs from the tensors


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_configs(state: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """diffusers/transformers config dicts for the four networks, from the tensors' names and shapes."""
    te2 = _bigg(state, kind)[1]
    configs = {
        "unet": _unet_config(state, kind, te2["projection_dim"]),
        "vae": _vae_config(state),
        "text_encoder_2": te2,
    }
    if kind == "sdxl":
        configs["text_encoder"] = _clip_l(state)
    return configs


def _unet_config(state: Mapping[str, Any], kind: str, pooled: int) -> dict[str, Any]:
    u = {k[len(UNET) :]: k for k in state if k.startswith(UNET)}
    ushape = lambda k: tuple(state[u[k]].shape)  # noqa: E731
    blocks = _count(list(u), r"input_blocks\.(\d+)\.")
    downsamples = sorted(int(m[1]) for k in u if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    levels = len(downsamples) + 1
    layers = (blocks - 1 + 1) // levels - 1  # input_blocks: conv_in, then (layers + 1) per level but the last
    channels, down_types, depths = [], [], []
    for i in range(levels):
        first = 1 + i * (layers + 1)
        channels.append(ushape(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        depth = _count(list(u), rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth)
    mid_depth = _count(list(u), r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    depths = [d or mid_depth for d in depths]
    if depths[-1] != mid_depth:
        raise ModelError(f"the UNet's mid block has {mid_depth} transformer layers, its last level {depths[-1]}")
    attn_key = next(k for k in u if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in u if k.endswith(".proj_in.weight"))
    label_in = ushape("label_emb.0.0.weight")[1]
    time_dim = ushape("time_embed.0.weight")
    ids = 6 if kind == "sdxl" else 5
    unet = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": ushape("input_blocks.0.0.weight")[1],
        "out_channels": ushape("out.2.weight")[0],
        "down_block_types": down_types,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down_types)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "attention_head_dim": [max(1, c // HEAD_WIDTH) for c in channels],
        "transformer_layers_per_block": depths,
        "cross_attention_dim": ushape(attn_key)[1],
        "use_linear_projection": len(ushape(proj_in)) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (label_in - pooled) // ids,
        "projection_class_embeddings_input_dim": label_in,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "sample_size": 128,
    }
    if time_dim[0] != 4 * channels[0]:
        raise ModelError(f"the UNet's time embedding is {time_dim[0]} wide, not 4 x {channels[0]}")
    return unet


def _vae_config(state: Mapping[str, Any]) -> dict[str, Any]:
    v = {k[len(VAE) :]: k for k in state if k.startswith(VAE)}
    shape = lambda k: tuple(state[k].shape)  # noqa: E731
    vlevels = _count(list(v), r"encoder\.down\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shape(v["encoder.conv_in.weight"])[1],
        "out_channels": shape(v["decoder.conv_out.weight"])[0],
        "down_block_types": ["DownEncoderBlock2D"] * vlevels,
        "up_block_types": ["UpDecoderBlock2D"] * vlevels,
        "block_out_channels": [shape(v[f"encoder.down.{i}.block.0.conv1.weight"])[0] for i in range(vlevels)],
        "layers_per_block": _count(list(v), r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": shape(v["post_quant_conv.weight"])[0],
        "norm_num_groups": 32,
        "scaling_factor": 0.13025,  # SDXL's VAE; the tensors do not carry it
        "force_upcast": True,
        "sample_size": 1024,
    }


def _text_config(state: Mapping[str, Any], prefix: str, names: dict[str, str], **fixed: Any) -> dict[str, Any]:
    """A CLIP text config from one encoder's tensors. names: where this layout keeps the token and position
    embeddings, a layer prefix, and the first layer's MLP input (transformers' and OpenCLIP's names differ)."""
    vocab, hidden = state[prefix + names["tokens"]].shape
    layers = _count([k for k in state if k.startswith(prefix)], rf"{re.escape(prefix + names['layers'])}(\d+)\.")
    return {
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": state[prefix + names["mlp_in"]].shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // HEAD_WIDTH),  # SDXL's heads are 64 wide
        "max_position_embeddings": state[prefix + names["positions"]].shape[0],
        "layer_norm_eps": 1e-5,
        "eos_token_id": 2,
        **fixed,
    }


def _clip_l(state: Mapping[str, Any]) -> dict[str, Any]:
    names = {
        "tokens": "text_model.embeddings.token_embedding.weight",
        "layers": "text_model.encoder.layers.",
        "mlp_in": "text_model.encoder.layers.0.mlp.fc1.weight",
        "positions": "text_model.embeddings.position_embedding.weight",
    }
    return _text_config(
        state, CLIP_L, names, architectures=["CLIPTextModel"], hidden_act="quick_gelu", projection_dim=768
    )


def _bigg(state: Mapping[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    prefix = BIGG[0] if kind == "sdxl" else BIGG[1]
    names = {
        "tokens": "token_embedding.weight",
        "layers": "transformer.resblocks.",
        "mlp_in": "transformer.resblocks.0.mlp.c_fc.weight",
        "positions": "positional_embedding",
    }
    projection = state[f"{prefix}text_projection"].shape[1]
    config = _text_config(
        state,
        prefix,
        names,
        architectures=["CLIPTextModelWithProjection"],
        hidden_act="gelu",
        projection_dim=projection,
    )
    return prefix, config


# ---------------------------------------------------------------- splitting a checkpoint into components


def split(state: Mapping[str, np.ndarray], configs: dict[str, dict[str, Any]], kind: str) -> dict[str, dict]:
    """{component: its state dict in diffusers' names} (views: nothing is copied). Keys with no home are a
    ModelError listing a few."""
    unet_pairs = {ldm: (d, inner) for ldm, d, inner in _unet_pairs(configs["unet"])}
    vae_pairs = {ldm: (d, inner) for ldm, d, inner in _vae_pairs(configs["vae"])}
    prefix = BIGG[0] if kind == "sdxl" else BIGG[1]
    bigg_pairs = {ldm: (d, inner) for ldm, d, inner in _bigg_pairs(configs["text_encoder_2"]["num_hidden_layers"])}
    out: dict[str, dict[str, np.ndarray]] = {part: {} for part in COMPONENTS}
    homeless: list[str] = []
    for key, tensor in state.items():
        if key.rsplit(".", 1)[-1] in IGNORED or key in (f"{prefix}logit_scale",):
            continue
        if key.startswith(UNET):
            name = _rename(key[len(UNET) :], unet_pairs)
            part = "unet"
        elif key.startswith(VAE):
            name = _rename(key[len(VAE) :], vae_pairs)
            part = "vae"  # its attention's q/k/v/proj_out are 1x1 convs here, Linear in ours (convert.py)
        elif kind == "sdxl" and key.startswith(CLIP_L):
            name, part = key[len(CLIP_L) :], "text_encoder"
        elif key.startswith(prefix):
            part = "text_encoder_2"
            rest = key[len(prefix) :]
            if rest == "positional_embedding":
                name = "text_model.embeddings.position_embedding.weight"
            elif rest == "text_projection":
                name, tensor = "text_projection.weight", tensor.T  # OpenCLIP multiplies x @ P; Linear holds P^T
            elif rest.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
                layer = rest.split(".")[2]
                leaf = "weight" if rest.endswith("weight") else "bias"
                for which, chunk in zip(("q", "k", "v"), np.split(tensor, 3, axis=0), strict=True):
                    out[part][f"text_model.encoder.layers.{layer}.self_attn.{which}_proj.{leaf}"] = chunk
                continue
            else:
                name = _rename(rest, bigg_pairs)
        else:
            name, part = None, ""
        if name is None:
            homeless.append(key)
            continue
        out[part][name] = tensor
    if homeless:
        raise ModelError(
            f"{len(homeless)} tensors of the checkpoint have no place in SDXL (e.g. {', '.join(homeless[:3])})"
        )
    return out


def join(parts: Mapping[str, Mapping[str, np.ndarray]], configs: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """The inverse of split, for SDXL base: diffusers-named state dicts -> one single-file state dict. The
    tests write small single-file checkpoints with it (and diffusers' own from_single_file reads them back)."""
    state: dict[str, np.ndarray] = {}
    for table, part, prefix in (
        (_unet_pairs(configs["unet"]), "unet", UNET),
        (_vae_pairs(configs["vae"]), "vae", VAE),
        (_bigg_pairs(configs["text_encoder_2"]["num_hidden_layers"]), "text_encoder_2", BIGG[0]),
    ):
        back = {d: (ldm, {v: k for k, v in inner.items()}) for ldm, d, inner in table}
        for name, tensor in parts[part].items():
            if part == "text_encoder_2" and name == "text_model.embeddings.position_embedding.weight":
                state[f"{prefix}positional_embedding"] = tensor
                continue
            if part == "text_encoder_2" and name == "text_projection.weight":
                state[f"{prefix}text_projection"] = np.ascontiguousarray(tensor.T)
                continue
            if (
                part == "text_encoder_2"
                and ".self_attn." in name
                and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj")
            ):
                continue  # joined below
            renamed = _rename(name, back)
            assert renamed is not None, name
            if part == "vae" and ".attn_1." in renamed and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            state[prefix + renamed] = tensor
    te2 = parts["text_encoder_2"]
    for k in range(configs["text_encoder_2"]["num_hidden_layers"]):
        for leaf in ("weight", "bias"):
            qkv = [te2[f"text_model.encoder.layers.{k}.self_attn.{w}_proj.{leaf}"] for w in "qkv"]
            state[f"{BIGG[0]}transformer.resblocks.{k}.attn.in_proj_{leaf}"] = np.concatenate(qkv)
    for name, tensor in parts["text_encoder"].items():
        state[CLIP_L + name] = tensor
    return state


def from_folder(root: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]]]:
    """A diffusers folder's (state dicts, configs) per component: what join() takes."""
    parts = {part: folder.read_component(root, part) for part in COMPONENTS}
    configs = {part: json.loads((root / part / "config.json").read_text()) for part in COMPONENTS}
    return parts, configs


def write(path: Path, parts: Mapping[str, Mapping[str, np.ndarray]], configs: dict[str, dict[str, Any]]) -> None:
    """join() saved as a safetensors file: how the tests and the reference maker write single files."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in join(parts, configs).items()}, path)


# ---------------------------------------------------------------- the loader's Source


def source(path: Path, name: str, options: LoadOptions) -> Source:
    """A single-file checkpoint: configs inferred from its tensors, or a diffusers folder's (options.config_dir)."""
    config_dir = Path(options.config_dir) if options.config_dir else None
    try:
        state = tensor_file.read(path)
    except tensor_file.TensorFileError as exc:
        raise ModelError(str(exc)) from exc
    kind = identify(list(state))
    if kind == "sdxl-refiner":
        raise ModelError(
            f"{path} is SDXL's refiner (one OpenCLIP text encoder, 5 time ids); it is not served as a model on its own"
        )
    inferred = infer_configs(state, kind)
    if config_dir is not None:  # a folder's configs, as diffusers' from_single_file(config=...)
        configs_dict = {p: json.loads((config_dir / p / "config.json").read_text()) for p in COMPONENTS}
        index = json.loads((config_dir / "model_index.json").read_text())
        scheduler = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
        tokenizer_dir = config_dir
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    else:
        configs_dict, scheduler, zeros = inferred, SDXL_SCHEDULER, True
        tokenizer_dir = tokenizer.default_folder()
        vocab = inferred["text_encoder"]["vocab_size"]
        if vocab != 49408:
            raise ModelError(
                f"{path}: the text encoders' vocabulary has {vocab} entries, not CLIP's 49,408; "
                "give the model's diffusers folder for its tokenizers (SDXL_MODEL_CONFIG_DIR)"
            )
    configs = Configs.from_dicts(configs_dict, str(path))
    parts = split(state, configs_dict, kind)

    def weights(part: str, shapes: Any, dtype: Any) -> Component:
        what = f"{path} ({part})"
        return convert_component(part, lambda: parts[part], [path], shapes, dtype, options.weight_cache_dir, what)

    return Source(name, configs, tokenizer_dir, scheduler, zeros, weights)
