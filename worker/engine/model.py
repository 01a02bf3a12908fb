"""Loading an SDXL model: diffusers-format folders (Flax msgpack or PyTorch-layout safetensors), hub ids,
and `tiny`, a small random model with SDXL's topology that is built offline from configs.

Everything here runs on the host; `Model.params` are numpy/jax arrays not yet placed on devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from worker.engine import convert, tensor_file, weight_cache
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
_CONFIG_PATTERNS = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*/config.json"]
_WEIGHT_FILES = {  # component: (Flax msgpack file, safetensors stem)
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "text_encoder": ("flax_model.msgpack", "model"),
    "text_encoder_2": ("flax_model.msgpack", "model"),
}


def _variant_name(name: str, variant: str) -> str:
    """diffusers' and transformers' file naming: model.safetensors -> model.fp16.safetensors,
    model.safetensors.index.json -> model.safetensors.index.fp16.json."""
    if not variant:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


def hub_patterns(variant: str = "") -> list[str]:
    """The files an SDXL repo needs, one precision only: SDXL base ships each weight file twice (float32 and
    the fp16 variant), and a pattern matching both would download 20 GB to use 14 GB (or 7 GB)."""
    patterns = list(_CONFIG_PATTERNS)
    for part, (_, stem) in _WEIGHT_FILES.items():
        patterns.append(f"{part}/{_variant_name(f'{stem}.safetensors.index.json', variant)}")
        if variant:  # shards: model.fp16-00001-of-00002.safetensors
            patterns.append(f"{part}/{stem}.{variant}.safetensors")
            patterns.append(f"{part}/{stem}.{variant}-*.safetensors")
        else:
            patterns.append(f"{part}/{stem}.safetensors")
            patterns.append(f"{part}/{stem}-*.safetensors")
    return patterns


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
    # {"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}: host arrays, or their shapes
    # (jax.ShapeDtypeStruct in `dtype`) while `pending` reads them in the background (load(background=True))
    params: dict[str, Any]
    dtype: Any
    pending: Future[tuple[dict[str, Any], float]] | None = None  # (weights, seconds to read them)
    weights_s: float = 0.0  # how long reading the weights took
    # per component, where its weights came from: "checkpoint" (read and converted), "converted cache"
    # (weight_cache: mapped, nothing converted) or "random"; filled in as they are read
    weight_sources: dict[str, str] = field(default_factory=dict)
    weights_dropped: bool = False  # drop_host_weights() was called: only the shapes are left

    def wait(self) -> dict[str, Any]:
        """The weights, once read; a failed background read raises its error here."""
        if self.pending is not None:
            self.params, self.weights_s = self.pending.result()
            self.pending = None
        return self.params

    def drop_host_weights(self) -> None:
        """Keep only the weights' shapes, which is all that tracing a program needs, once an engine holds them
        on its devices. On an accelerator the host copy is otherwise kept for nothing: for SDXL in bf16 that is
        6.7 GB of converted arrays after a cold start (a warm start's are mapped pages of the weight cache,
        which this unmaps). No further Engine can be built from this model."""
        params = self.wait()
        self.params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        self.weights_dropped = True

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels


# ---------------------------------------------------------------- reading a folder


def _locate_weights(folder: Path, flax_name: str, st_stem: str, variant: str = "") -> tuple[str, list[Path]]:
    """('pt', safetensors files) or ('flax', [msgpack file]). safetensors win: they are what checkpoints ship
    today. `variant` ("fp16") means model.fp16.safetensors instead of model.safetensors, as in diffusers.
    Nothing is read but a sharded index, so a missing file is reported before any slow work starts."""
    index = folder / _variant_name(f"{st_stem}.safetensors.index.json", variant)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).exists()]
        if missing:
            raise ModelError(f"{index} names shards that are not there: {', '.join(missing)}")
        return "pt", [folder / shard for shard in shards]
    single = folder / _variant_name(f"{st_stem}.safetensors", variant)
    if single.exists():
        return "pt", [single]
    msgpack = folder / flax_name
    if msgpack.exists() and not variant:
        return "flax", [msgpack]
    if variant:
        expected = f"{single.name} or a sharded {index.name} (SDXL_MODEL_VARIANT={variant})"
    else:
        expected = f"{single.name}, a sharded {index.name}, or {flax_name}"
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".msgpack"))
    if found:  # usually a variant mismatch: say which files are there, and which setting reads them
        expected += f"; the folder has {', '.join(found)}"
        named = re.compile(rf"{st_stem}\.(\w+?)(-\d+-of-\d+)?\.safetensors")  # model.fp16[-00001-of-00002]
        variants = sorted({m[1] for f in found if (m := named.fullmatch(f))})
        if variants and variant not in variants:
            expected += f": set SDXL_MODEL_VARIANT={variants[0]}"
    raise ModelError(f"no weights in {folder}: expected {expected}")


def _read_weights(kind: str, files: list[Path]) -> dict[str, np.ndarray] | bytes:
    """msgpack bytes, or the state dict of every safetensors file as views on memory maps of the files
    (tensor_file): the layout copy that follows is the only copy."""
    if kind == "flax":
        return files[0].read_bytes()
    state: dict[str, np.ndarray] = {}
    for path in files:
        try:
            state.update(tensor_file.read(path))
        except tensor_file.TensorFileError as exc:
            raise ModelError(str(exc)) from exc
    return state


def _cast(tree: Any, dtype: Any) -> Any:
    # copy=False: weights already in the serving dtype (float32 on a CPU) are not copied a second time
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype, copy=False), tree)


def _load_params(
    folder: Path, located: tuple[str, list[Path]], shapes: Any, dtype: Any, converted: Path | None = None
) -> tuple[Any, str]:
    """(parameters in `dtype`, where they came from). converted: weight_cache's folder; a hit there maps the
    converted file and reads nothing of the checkpoint, a miss converts and writes it in the background."""
    kind, files = located
    if converted is not None:
        expected = weight_cache.identity(files, dtype, shapes)
        cached_path = weight_cache.path_for(converted, folder.name, files)
        cached = weight_cache.load(cached_path, expected, shapes, dtype)
        if cached is not None:
            return cached, "converted cache"
    payload = _read_weights(kind, files)
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
    params = _cast(params, dtype)
    if converted is not None:
        weight_cache.save_in_background(cached_path, expected, params)
    return params, "checkpoint"


def _check_folder(root: Path) -> None:
    if not (root / "model_index.json").exists():
        raise ModelError(f"{root} is not a diffusers SDXL folder (no model_index.json)")
    for part in (*COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"):
        if not (root / part).is_dir():
            raise ModelError(f"{root} has no {part}/ folder; an SDXL model needs {part}")


def public_config(config: Any) -> dict[str, Any]:
    """A config without its private fields: diffusers' `_use_default_values` is built from a set, so its order
    changes from one process to the next, and a key made from it would never match a second start."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _shapes(kind: str, config: Any, trace: Callable[[], Any], cache: Path | None) -> Any:
    """A module's parameter shapes. jax.eval_shape traces the module's init to get them, which takes seconds
    for a UNet (2 s for the `mid` preset on a CPU, most of a warm start's model load); with `cache` they are
    kept as JSON keyed by the config and library versions, so a warm start reads them instead."""
    if cache is None:
        return trace()
    import diffusers

    key = json.dumps([kind, public_config(config), diffusers.__version__, jax.__version__], sort_keys=True, default=str)
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


def _assemble(
    root: Path,
    name: str,
    dtype: Any,
    weights: Any,
    shape_cache: Path | None = None,
    background: bool = False,
    weight_sources: dict[str, str] | None = None,
) -> Model:
    """Build the modules from root's configs; weights(component, shapes) returns that component's parameters.
    background: return once the modules and shapes are known, with the weights still being read (Model.wait).
    weight_sources: the dict `weights` fills in (Model.weight_sources)."""
    key = jax.random.PRNGKey(0)

    def text_encoders() -> tuple[FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection]:
        te1 = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"), dtype=dtype, _do_init=False)
        te2 = FlaxCLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(root / "text_encoder_2"), dtype=dtype, _do_init=False
        )
        return te1, te2

    # The text encoders' constructors trace their init for the parameter shapes (3.4 s for SDXL's on a
    # 2-core CPU, on the GIL); the UNet's and VAE's weights are copied meanwhile (numpy, off the GIL).
    pool = ThreadPoolExecutor(2, thread_name_prefix="model-load")
    pending_text = pool.submit(text_encoders)
    unet = FlaxUNet2DConditionModel.from_config(FlaxUNet2DConditionModel.load_config(root / "unet"), dtype=dtype)
    vae = FlaxAutoencoderKL.from_config(FlaxAutoencoderKL.load_config(root / "vae"), dtype=dtype)
    shapes = {  # shapes only (jax.eval_shape): no random init is ever materialised
        "unet": _shapes("unet", unet.config, lambda: jax.eval_shape(unet.init_weights, key), shape_cache),
        "vae": _shapes("vae", vae.config, lambda: jax.eval_shape(vae.init_weights, key), shape_cache),
    }

    def read_all() -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        params = {part: weights(part, shapes[part]) for part in ("unet", "vae")}
        te1, te2 = pending_text.result()
        params["text_encoder"] = weights("text_encoder", te1.params_shape_tree)
        params["text_encoder_2"] = weights("text_encoder_2", te2.params_shape_tree)
        return {part: params[part] for part in COMPONENTS}, time.perf_counter() - t0

    pending = pool.submit(read_all) if background else None
    done = None if background else read_all()  # either way the UNet's copy overlaps the text encoders' tracing
    te1, te2 = pending_text.result()
    all_shapes = shapes | {"text_encoder": te1.params_shape_tree, "text_encoder_2": te2.params_shape_tree}
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    model = Model(
        name=name,
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        noise=NoiseConfig.from_diffusers(scheduler_config),
        # every weight is cast to `dtype` (_cast), so the shapes in `dtype` are what the arrays will be
        params=jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), all_shapes),
        dtype=dtype,
        pending=pending,
        weight_sources=weight_sources if weight_sources is not None else {},
    )
    if done is not None:
        model.params, model.weights_s = done
    pool.shutdown(wait=False)  # a background read goes on; its thread ends with it
    return model


def load_folder(
    path: str | Path,
    dtype: Any = jnp.bfloat16,
    name: str | None = None,
    shape_cache: Path | None = None,
    variant: str = "",
    background: bool = False,
    weight_cache_dir: Path | None = None,
) -> Model:
    """A diffusers SDXL folder. background: return once the modules are built, with the weights still being
    read on a thread (Model.wait), so compiling can overlap reading; missing files are reported at once.
    weight_cache_dir: where converted weights are kept between starts (weight_cache); None converts each time."""
    root = Path(path)
    _check_folder(root)
    located = {part: _locate_weights(root / part, *names, variant) for part, names in _WEIGHT_FILES.items()}
    sources: dict[str, str] = {}

    def weights(part: str, shapes: Any) -> Any:
        params, sources[part] = _load_params(root / part, located[part], shapes, dtype, weight_cache_dir)
        return params

    return _assemble(root, name or str(root), dtype, weights, shape_cache, background, sources)


def from_preset(preset: str, dtype: Any = jnp.bfloat16) -> Model:
    """A random model of a preset size (tiny, mid, sdxl) built in memory: for benchmarks, no files."""
    import tempfile

    from worker.engine import tiny

    root = Path(tempfile.mkdtemp(prefix=f"sdxl-{preset}-"))
    tiny.write_configs(root, preset)

    def weights(part: str, _shapes: Any) -> Any:
        return tiny.build_params(preset, dtype, parts=(part,))[part]

    return _assemble(root, f"random-{preset}", dtype, weights, weight_sources=dict.fromkeys(COMPONENTS, "random"))


def resolve_dtype(name: str) -> Any:
    """'auto' -> bfloat16 on TPUs and GPUs, float32 on CPUs (XLA emulates bfloat16 there, ~2x slower)."""
    if name == "auto":
        name = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def fetch_hub(repo_id: str, cache_dir: str | None = None, variant: str = "") -> Path:
    """Download (or find in the cache) the files an SDXL repo needs. Raises ModelError when it cannot."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=hub_patterns(variant), cache_dir=cache_dir))
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        cache = cache_dir or constants.HF_HUB_CACHE
        raise ModelError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub and it is not complete in the cache "
            f"{cache} ({type(exc).__name__}: {exc}). Download it where the network allows "
            f"(`huggingface-cli download {repo_id}`) and copy the cache, or point SDXL_MODEL at a local folder."
        ) from exc


def load(
    spec: str,
    dtype: Any = jnp.bfloat16,
    tiny_dir: str | Path | None = None,
    shape_cache: Path | None = None,
    variant: str = "",
    background: bool = False,
    weight_cache_dir: Path | None = None,
) -> Model:
    """`tiny`, a local folder, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0. `shape_cache`:
    a folder where parameter shapes are kept between starts (the worker uses its compile cache). `variant`:
    the weight files' variant ("fp16": half of SDXL base's download; served in `dtype` either way).
    `background`, `weight_cache_dir`: see load_folder."""
    options = {"shape_cache": shape_cache, "background": background, "weight_cache_dir": weight_cache_dir}
    if spec == "tiny":
        from worker.engine import tiny

        folder = Path(tiny_dir or tiny.default_dir())
        tiny.ensure(folder)
        return load_folder(folder, dtype, name="tiny", **options)
    if Path(spec).exists():
        return load_folder(spec, dtype, variant=variant, **options)
    if spec.count("/") != 1:
        raise ModelError(f"model {spec!r} is neither 'tiny', an existing folder, nor a hub id like owner/name")
    return load_folder(fetch_hub(spec, variant=variant), dtype, name=spec, variant=variant, **options)
