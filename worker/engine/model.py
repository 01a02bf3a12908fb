"""Loading an SDXL model: diffusers-format folders (Flax msgpack or PyTorch-layout safetensors), hub ids,
and `tiny`, a small random model with SDXL's topology that is built offline from configs.

Everything here runs on the host; `Model.params` are numpy/jax arrays not yet placed on devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from worker.engine import convert
from worker.engine.schedule import NoiseConfig

log = logging.getLogger(__name__)

# diffusers' and transformers' Flax classes log a deprecation warning per module instance; they are the
# last releases that carry them (pinned in pyproject.toml), so the warning says nothing new.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: E402
from diffusers.models import attention_flax  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTokenizer,
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
)

diffusers_logging.set_verbosity_error()


def _geglu_exact(self: Any, hidden_states: jax.Array, deterministic: bool = True) -> jax.Array:
    hidden_states = self.proj(hidden_states)
    linear, gate = jnp.split(hidden_states, 2, axis=2)
    return self.dropout_layer(linear * jax.nn.gelu(gate, approximate=False), deterministic=deterministic)


# diffusers' Flax GEGLU calls flax.linen.gelu, whose default is the tanh approximation; PyTorch (where
# SDXL was trained) uses the exact erf form. The approximation moves every UNet output by about 5e-4 and
# breaks parity with PyTorch diffusers; with the exact form the two agree to about 1e-5.
attention_flax.FlaxGEGLU.__call__ = _geglu_exact

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "*/config.json",
    "unet/diffusion_pytorch_model*.safetensors*",
    "vae/diffusion_pytorch_model*.safetensors*",
    "text_encoder/model*.safetensors*",
    "text_encoder_2/model*.safetensors*",
]


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says which and where it was looked for."""


@dataclass
class Model:
    name: str
    unet: FlaxUNet2DConditionModel
    vae: FlaxAutoencoderKL
    text_encoder: FlaxCLIPTextModel
    text_encoder_2: FlaxCLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise: NoiseConfig
    params: dict[str, Any]  # {"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}
    dtype: Any

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels


# ---------------------------------------------------------------- reading a folder


def _read_weights(folder: Path, flax_name: str, st_stem: str) -> tuple[str, dict[str, np.ndarray] | bytes]:
    """('flax', msgpack bytes) or ('pt', state dict). safetensors win: they are what checkpoints ship today."""
    from safetensors.numpy import load_file

    index = folder / f"{st_stem}.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return "pt", state
    single = folder / f"{st_stem}.safetensors"
    if single.exists():
        return "pt", load_file(single)
    msgpack = folder / flax_name
    if msgpack.exists():
        return "flax", msgpack.read_bytes()
    raise ModelError(f"no weights in {folder}: expected {single.name}, a sharded index, or {flax_name}")


def _cast(tree: Any, dtype: Any) -> Any:
    # copy=False: weights already in the serving dtype (float32 on a CPU) are not copied a second time
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype, copy=False), tree)


def _load_params(folder: Path, flax_name: str, st_stem: str, shapes: Any, dtype: Any) -> Any:
    kind, payload = _read_weights(folder, flax_name, st_stem)
    target = convert.flatten(shapes)
    if kind == "flax":
        params = serialization.msgpack_restore(payload)
        got = convert.flatten(params)
        missing = [k for k in target if k not in got]
        if missing or len(got) != len(target):
            raise ModelError(f"{folder}: Flax weights do not match the config ({len(missing)} missing)")
    else:
        params = convert.pt_to_flax(payload, target, str(folder), dtype)
    # Weights in bfloat16 (or float32): halves memory and HBM traffic; the scheduler maths stays float32.
    return _cast(params, dtype)


def _check_folder(root: Path) -> None:
    if not (root / "model_index.json").exists():
        raise ModelError(f"{root} is not a diffusers SDXL folder (no model_index.json)")
    for part in (*COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"):
        if not (root / part).is_dir():
            raise ModelError(f"{root} has no {part}/ folder; an SDXL model needs {part}")


def _shapes(kind: str, config: Any, trace: Callable[[], Any], cache: Path | None) -> Any:
    """A module's parameter shapes. jax.eval_shape traces the module's init to get them, which takes seconds
    for a UNet (2 s for the `mid` preset on a CPU, most of a warm start's model load); with `cache` they are
    kept as JSON keyed by the config and library versions, so a warm start reads them instead."""
    if cache is None:
        return trace()
    import diffusers

    key = json.dumps([kind, dict(config), diffusers.__version__, jax.__version__], sort_keys=True, default=str)
    path = cache / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.exists():
        flat = json.loads(path.read_text())
        return convert.unflatten(
            {tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)) for k, (s, d) in flat.items()}
        )
    tree = trace()
    flat = {"/".join(k): [list(v.shape), str(v.dtype)] for k, v in convert.flatten(tree).items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(flat))
    os.replace(tmp, path)
    return tree


def _assemble(root: Path, name: str, dtype: Any, weights: Any, shape_cache: Path | None = None) -> Model:
    """Build the modules from root's configs; weights(modules, shapes) returns the parameter tree."""
    key = jax.random.PRNGKey(0)
    unet = FlaxUNet2DConditionModel.from_config(FlaxUNet2DConditionModel.load_config(root / "unet"), dtype=dtype)
    vae = FlaxAutoencoderKL.from_config(FlaxAutoencoderKL.load_config(root / "vae"), dtype=dtype)
    te1 = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"), dtype=dtype, _do_init=False)
    te2 = FlaxCLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(root / "text_encoder_2"), dtype=dtype, _do_init=False
    )
    shapes = {  # shapes only (jax.eval_shape): no random init is ever materialised
        "unet": _shapes("unet", unet.config, lambda: jax.eval_shape(unet.init_weights, key), shape_cache),
        "vae": _shapes("vae", vae.config, lambda: jax.eval_shape(vae.init_weights, key), shape_cache),
        "text_encoder": te1.params_shape_tree,
        "text_encoder_2": te2.params_shape_tree,
    }
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return Model(
        name=name,
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        noise=NoiseConfig.from_diffusers(scheduler_config),
        params=weights(shapes),
        dtype=dtype,
    )


def load_folder(
    path: str | Path, dtype: Any = jnp.bfloat16, name: str | None = None, shape_cache: Path | None = None
) -> Model:
    root = Path(path)
    _check_folder(root)
    files = {  # component: (Flax file, safetensors stem)
        "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
        "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
        "text_encoder": ("flax_model.msgpack", "model"),
        "text_encoder_2": ("flax_model.msgpack", "model"),
    }

    def weights(shapes: dict[str, Any]) -> dict[str, Any]:
        return {part: _load_params(root / part, *files[part], shapes[part], dtype) for part in COMPONENTS}

    return _assemble(root, name or str(root), dtype, weights, shape_cache)


def from_preset(preset: str, dtype: Any = jnp.bfloat16) -> Model:
    """A random model of a preset size (tiny, mid, sdxl) built in memory: for benchmarks, no files."""
    import tempfile

    from worker.engine import tiny

    root = Path(tempfile.mkdtemp(prefix=f"sdxl-{preset}-"))
    tiny.write_configs(root, preset)
    return _assemble(root, f"random-{preset}", dtype, lambda _: tiny.build_params(preset, dtype))


def resolve_dtype(name: str) -> Any:
    """'auto' -> bfloat16 on TPUs and GPUs, float32 on CPUs (XLA emulates bfloat16 there, ~2x slower)."""
    if name == "auto":
        name = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def fetch_hub(repo_id: str, cache_dir: str | None = None) -> Path:
    """Download (or find in the cache) the files an SDXL repo needs. Raises ModelError when it cannot."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir))
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        cache = cache_dir or constants.HF_HUB_CACHE
        raise ModelError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub and it is not complete in the cache "
            f"{cache} ({type(exc).__name__}: {exc}). Download it where the network allows "
            f"(`huggingface-cli download {repo_id}`) and copy the cache, or point SDXL_MODEL at a local folder."
        ) from exc


def load(
    spec: str, dtype: Any = jnp.bfloat16, tiny_dir: str | Path | None = None, shape_cache: Path | None = None
) -> Model:
    """`tiny`, a local folder, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0. `shape_cache`:
    a folder where parameter shapes are kept between starts (the worker uses its compile cache)."""
    if spec == "tiny":
        from worker.engine import tiny

        folder = Path(tiny_dir or tiny.default_dir())
        tiny.ensure(folder)
        return load_folder(folder, dtype, name="tiny", shape_cache=shape_cache)
    if Path(spec).exists():
        return load_folder(spec, dtype, shape_cache=shape_cache)
    if spec.count("/") != 1:
        raise ModelError(f"model {spec!r} is neither 'tiny', an existing folder, nor a hub id like owner/name")
    return load_folder(fetch_hub(spec), dtype, name=spec, shape_cache=shape_cache)
