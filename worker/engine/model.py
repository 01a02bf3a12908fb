"""Loading an SDXL model: diffusers-format folders (PyTorch-layout safetensors), single-file checkpoints
(worker/engine/single_file.py), hub ids, and `tiny`, a small random model with SDXL's topology that is built
offline from configs.

Everything here runs on the host; `Model.params` are numpy/jax arrays not yet placed on devices. The networks
are our own (unet.py, vae.py, clip.py); a model is their configs, parameters and tokenizers.
"""

from __future__ import annotations

import dataclasses
import functools
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

from worker.engine import attention, convert, tensor_file, tokenizer, weight_cache
from worker.engine.clip import CLIPConfig, TextEncoder
from worker.engine.schedule import NoiseConfig
from worker.engine.unet import UNet, UNetConfig
from worker.engine.vae import VAE, VAEConfig

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_CONFIG_PATTERNS = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*/config.json"]
_WEIGHT_STEMS = {  # component: safetensors stem
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
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
    for part, stem in _WEIGHT_STEMS.items():
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


class ModelTooLarge(ModelError):
    """A model whose weights do not fit the memory left for it (load's max_bytes)."""


@dataclass(frozen=True)
class Configs:
    """The networks' configs: everything that decides parameter shapes and the traced program. SDXL's refiner
    has no first text encoder (text_encoder None)."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPConfig | None
    text_encoder_2: CLIPConfig

    @property
    def parts(self) -> tuple[str, ...]:
        """The components this model has weights for."""
        return tuple(p for p in COMPONENTS if getattr(self, p) is not None)

    @classmethod
    def from_dicts(cls, configs: dict[str, dict[str, Any]], where: str) -> Configs:
        """diffusers/transformers config.json contents per component; a config that is not SDXL's is a
        ModelError naming the component and what was found."""
        try:
            te1 = CLIPConfig.from_transformers(configs["text_encoder"]) if configs.get("text_encoder") else None
            te2 = CLIPConfig.from_transformers(configs["text_encoder_2"])
            if not te2.with_projection:
                raise ValueError("text_encoder_2 is not a CLIPTextModelWithProjection (SDXL's pooled embedding)")
            unet = UNetConfig.from_diffusers(configs["unet"], te2.projection_dim)
            vae = VAEConfig.from_diffusers(configs["vae"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: not an SDXL base model: {exc}") from exc
        text_width = te2.hidden_size + (te1.hidden_size if te1 else 0)
        if unet.cross_attention_dim != text_width:
            raise ModelError(
                f"{where}: the UNet attends to {unet.cross_attention_dim}-wide text, the text encoders give "
                f"{text_width}"
            )
        if unet.in_channels not in (vae.latent_channels, 2 * vae.latent_channels + 1):
            raise ModelError(
                f"{where}: the UNet takes {unet.in_channels} input channels and the VAE makes {vae.latent_channels}"
                f" latent channels: neither a base UNet ({vae.latent_channels}) nor an inpainting one"
                f" ({2 * vae.latent_channels + 1}: latents, mask, masked image latents)"
            )
        # SDXL base: both text encoders and 6 size ids; the refiner: the second alone and 5 ids (an aesthetic score
        # in place of the target size)
        if (unet.time_ids == 5) != (te1 is None):
            raise ModelError(
                f"{where}: a UNet with {unet.time_ids} time ids and {'one text encoder' if te1 is None else 'two'} is "
                "neither SDXL base (two, 6 ids) nor its refiner (the second alone, 5 ids)"
            )
        return cls(unet, vae, te1, te2)

    def module(self, part: str, dtype: Any, attend: Any = attention.einsum) -> Any:
        cfg = getattr(self, part)
        if part == "unet":
            return UNet(cfg, attend, dtype)
        if part == "vae":
            return VAE(cfg, attend, dtype)
        return TextEncoder(cfg, dtype)

    def identity(self) -> dict[str, Any]:
        return {part: dataclasses.asdict(getattr(self, part)) for part in self.parts}


@dataclass
class Model:
    name: str
    configs: Configs
    tokenizer: Any  # our CLIPTokenizer (worker/engine/tokenizer.py); None for a refiner (no first text encoder)
    tokenizer_2: Any
    noise: NoiseConfig
    # {"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}: host arrays, or their shapes
    # (jax.ShapeDtypeStruct in `dtype`) while `pending` reads them in the background (load(background=True))
    params: dict[str, Any]
    dtype: Any
    # model_index.json's force_zeros_for_empty_prompt: an absent negative prompt is zero embeddings (SDXL base);
    # false (the refiner, many fine-tunes): it is the empty string, encoded
    force_zeros_for_empty_prompt: bool = True
    vae_dtype: Any = None  # the VAE's weights and compute; None: `dtype`
    pending: Future[tuple[dict[str, Any], float]] | None = None  # (weights, seconds to read them)
    weights_s: float = 0.0  # how long reading the weights took
    # per component, where its weights came from: "checkpoint" (read and converted), "converted cache"
    # (weight_cache: mapped, nothing converted) or "random"; filled in as they are read
    weight_sources: dict[str, str] = field(default_factory=dict)
    weights_dropped: bool = False  # drop_host_weights() was called: only the shapes are left
    weights_hash: str = ""  # sha256 of the weights as served (digest_weights()); recorded with every image

    @property
    def nbytes(self) -> int:
        """The served weights' bytes (on each device that holds them)."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self.params))

    def digest_weights(self) -> str:
        """sha256 over every parameter as served (names, dtypes, shapes and bytes, in name order): the same
        weights give the same hash whether read from a folder, a single file or the converted cache, and any
        changed tensor changes it. Run once at start, before drop_host_weights (SDXL: ~7 GB hashed, seconds)."""
        if not self.weights_hash:
            digest = hashlib.sha256()
            for name, value in sorted(convert.flatten(self.wait()).items()):
                array = np.ascontiguousarray(np.asarray(value))
                digest.update(json.dumps(["/".join(name), array.dtype.name, list(array.shape)]).encode())
                digest.update(memoryview(array.reshape(-1).view(np.uint8)))
            self.weights_hash = digest.hexdigest()
        return self.weights_hash

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
    def unet(self) -> UNetConfig:
        return self.configs.unet

    @property
    def vae(self) -> VAEConfig:
        return self.configs.vae

    @property
    def refiner(self) -> bool:
        """SDXL's refiner: the second text encoder alone, an aesthetic score among the UNet's time ids."""
        return self.configs.text_encoder is None

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: it also takes the mask and the masked image's latents as input channels."""
        return self.configs.unet.in_channels != self.configs.vae.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.configs.vae.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.configs.vae.latent_channels

    def dtype_of(self, part: str) -> Any:
        return (self.vae_dtype or self.dtype) if part == "vae" else self.dtype


# ---------------------------------------------------------------- reading a folder


def _locate_weights(folder: Path, st_stem: str, variant: str = "") -> list[Path]:
    """The component's safetensors files (one, or a sharded index's). `variant` ("fp16") means
    model.fp16.safetensors instead of model.safetensors, as in diffusers. Nothing is read but a sharded index,
    so a missing file is reported before any slow work starts."""
    index = folder / _variant_name(f"{st_stem}.safetensors.index.json", variant)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).exists()]
        if missing:
            raise ModelError(f"{index} names shards that are not there: {', '.join(missing)}")
        return [folder / shard for shard in shards]
    single = folder / _variant_name(f"{st_stem}.safetensors", variant)
    if single.exists():
        return [single]
    expected = f"{single.name} or a sharded {index.name}" + (f" (SDXL_MODEL_VARIANT={variant})" if variant else "")
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".msgpack", ".bin"))
    if found:  # usually a variant mismatch: say which files are there, and which setting reads them
        expected += f"; the folder has {', '.join(found)}"
        named = re.compile(rf"{st_stem}\.(\w+?)(-\d+-of-\d+)?\.safetensors")  # model.fp16[-00001-of-00002]
        variants = sorted({m[1] for f in found if (m := named.fullmatch(f))})
        if variants and variant not in variants:
            expected += f": set SDXL_MODEL_VARIANT={variants[0]}"
        elif not any(f.endswith(".safetensors") for f in found):
            expected += " (Flax msgpack and PyTorch .bin weights are not read: use the repo's safetensors)"
    raise ModelError(f"no weights in {folder}: expected {expected}")


def read_state(files: list[Path]) -> dict[str, np.ndarray]:
    """The state dict of every safetensors file as views on memory maps of the files (tensor_file): the
    layout copy that follows is the only copy."""
    state: dict[str, np.ndarray] = {}
    for path in files:
        try:
            state.update(tensor_file.read(path))
        except tensor_file.TensorFileError as exc:
            raise ModelError(str(exc)) from exc
    return state


def read_component(root: Path, part: str, variant: str = "") -> dict[str, np.ndarray]:
    """One component of a diffusers folder as its PyTorch-layout state dict (views on memory maps)."""
    return read_state(_locate_weights(root / part, _WEIGHT_STEMS[part], variant))


def convert_component(
    part: str,
    read: Callable[[], dict[str, np.ndarray]],
    files: list[Path],
    shapes: Any,
    dtype: Any,
    converted: Path | None,
    what: str,
) -> tuple[Any, str]:
    """(one component's parameters in `dtype`, where they came from). read(): its PyTorch-layout state dict
    (diffusers names). converted: weight_cache's folder; a hit there maps the converted file and reads nothing
    of the checkpoint, a miss converts and writes it in the background."""
    if converted is not None:
        expected = weight_cache.identity(files, dtype, shapes)
        cached_path = weight_cache.path_for(converted, part, files)
        cached = weight_cache.load(cached_path, expected, shapes, dtype)
        if cached is not None:
            return cached, "converted cache"
    state = read()
    if part == "vae":
        state = convert.legacy_vae_names(state)
    if part == "text_encoder" and state and not any(k.startswith("text_model.") for k in state):
        # transformers 5 saves CLIPTextModel without its `text_model.` level (CLIPTextModelWithProjection keeps it)
        state = {f"text_model.{k}": v for k, v in state.items()}
    try:
        params = convert.pt_to_flax(state, convert.flatten(shapes), what, dtype)
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    if converted is not None:
        weight_cache.save_in_background(cached_path, expected, params)
    return params, "checkpoint"


def _check_folder(root: Path) -> None:
    if not (root / "model_index.json").exists():
        raise ModelError(f"{root} is not a diffusers SDXL folder (no model_index.json)")
    index = json.loads((root / "model_index.json").read_text())
    for part in (*COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"):
        if part in ("text_encoder", "tokenizer") and index.get(part, [None])[0] is None and part in index:
            continue  # the refiner's model_index says [null, null]
        if not (root / part).is_dir():
            raise ModelError(f"{root} has no {part}/ folder; an SDXL model needs {part}")


@dataclass(frozen=True)
class Source:
    """Where a model's parts come from: its configs, tokenizer folders, scheduler config, model_index
    flags, and weights(part, shapes) -> (parameters, where they came from)."""

    name: str
    configs: Configs
    tokenizer_dir: Path
    scheduler: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    weights: Callable[[str, Any, Any], tuple[Any, str]]  # (part, shapes, dtype)


@functools.cache
def _module_digest() -> str:
    digest = hashlib.sha256()
    for name in ("layers.py", "unet.py", "vae.py", "clip.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def _shapes(configs: Configs, part: str, cache: Path | None) -> Any:
    """A network's parameter shapes. jax.eval_shape traces the module's init to get them, which takes seconds
    for a UNet (2 s for the `mid` preset on a CPU, most of a warm start's model load); with `cache` they are
    kept as JSON keyed by the config, the modules' source and JAX's version, so a warm start reads them."""
    trace = configs.module(part, jnp.float32).shapes
    if cache is None:
        return trace()
    key = json.dumps(
        [part, dataclasses.asdict(getattr(configs, part)), _module_digest(), jax.__version__], sort_keys=True
    )
    path = cache / f"{part}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
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


def resolve_vae_dtype(name: str, dtype: Any, vae: VAEConfig) -> Any:
    """SDXL_VAE_DTYPE. auto: as diffusers does it, float32 when the VAE's config says force_upcast and the
    model runs in float16 (SDXL's VAE overflows float16); bfloat16 has float32's range, so it stays. float32:
    a float32 decode whatever the model's dtype (slower; the closest pixels to a float32 reference)."""
    if name == "auto":
        return jnp.float32 if vae.force_upcast and np.dtype(dtype) == np.float16 else dtype
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _assemble(
    source: Source,
    dtype: Any,
    vae_dtype: str,
    shape_cache: Path | None,
    background: bool,
    max_bytes: int | None = None,
) -> Model:
    """The model from a Source. background: return once the configs and shapes are known, with the weights
    still being read on a thread (Model.wait), so compiling can overlap reading. max_bytes: a ModelTooLarge,
    before any weight is read, when the served weights would take more."""
    configs = source.configs
    vae_dt = resolve_vae_dtype(vae_dtype, dtype, configs.vae)
    dtypes = {part: vae_dt if part == "vae" else dtype for part in configs.parts}
    shapes = {part: _shapes(configs, part, shape_cache) for part in configs.parts}
    nbytes = sum(
        int(np.prod(leaf.shape)) * np.dtype(dtypes[part]).itemsize
        for part in configs.parts
        for leaf in jax.tree_util.tree_leaves(shapes[part])
    )
    if max_bytes is not None and nbytes > max_bytes:
        raise ModelTooLarge(f"model {source.name!r}: its weights take {nbytes} bytes, over the {max_bytes} left")
    sources: dict[str, str] = {}

    def read_all() -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        params = {}
        for part in configs.parts:
            params[part], sources[part] = source.weights(part, shapes[part], dtypes[part])
        return params, time.perf_counter() - t0

    pending = None
    done = None
    if background:
        pool = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        pending = pool.submit(read_all)
        pool.shutdown(wait=False)  # its one thread ends with the read
    else:
        done = read_all()
    model = Model(
        name=source.name,
        configs=configs,
        tokenizer=tokenizer.load(source.tokenizer_dir / "tokenizer") if configs.text_encoder else None,
        tokenizer_2=tokenizer.load(source.tokenizer_dir / "tokenizer_2"),
        noise=NoiseConfig.from_diffusers(source.scheduler),
        # every weight is cast to its component's dtype, so these shapes are what the arrays will be
        params={
            part: jax.tree_util.tree_map(lambda s, d=dtypes[part]: jax.ShapeDtypeStruct(s.shape, d), shapes[part])
            for part in configs.parts
        },
        dtype=dtype,
        vae_dtype=vae_dt,
        force_zeros_for_empty_prompt=source.force_zeros_for_empty_prompt,
        pending=pending,
        weight_sources=sources,
    )
    if done is not None:
        model.params, model.weights_s = done
    return model


def folder_source(root: Path, name: str, variant: str = "", weight_cache_dir: Path | None = None) -> Source:
    """A diffusers SDXL folder: configs, tokenizers and scheduler from it, weights from its safetensors."""
    _check_folder(root)
    present = [part for part in COMPONENTS if (root / part / "config.json").exists()]
    configs = Configs.from_dicts(
        {part: json.loads((root / part / "config.json").read_text()) for part in present}, str(root)
    )
    files = {part: _locate_weights(root / part, _WEIGHT_STEMS[part], variant) for part in configs.parts}
    index = json.loads((root / "model_index.json").read_text())

    def weights(part: str, shapes: Any, dtype: Any) -> tuple[Any, str]:
        what = str(root / part)
        return convert_component(
            part, lambda: read_state(files[part]), files[part], shapes, dtype, weight_cache_dir, what
        )

    return Source(
        name=name,
        configs=configs,
        tokenizer_dir=root,
        scheduler=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        weights=weights,
    )


def load_folder(
    path: str | Path,
    dtype: Any = jnp.bfloat16,
    name: str | None = None,
    shape_cache: Path | None = None,
    variant: str = "",
    background: bool = False,
    weight_cache_dir: Path | None = None,
    vae_dtype: str = "auto",
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    max_bytes: int | None = None,
) -> Model:
    """A diffusers SDXL folder. background: return once the configs are read, with the weights still being
    read on a thread (Model.wait), so compiling can overlap reading; missing files are reported at once.
    weight_cache_dir: where converted weights are kept between starts (weight_cache); None converts each time.
    unet, vae: another UNet's weights, another VAE, in place of the folder's (with_unet, with_vae)."""
    root = Path(path)
    source = folder_source(root, name or str(root), variant, weight_cache_dir)
    if unet:
        source = with_unet(source, Path(unet), weight_cache_dir)
    if vae:
        source = with_vae(source, Path(vae), weight_cache_dir)
    return _assemble(source, dtype, vae_dtype, shape_cache, background, max_bytes)


def with_vae(source: Source, path: Path, weight_cache_dir: Path | None = None) -> Source:
    """The model with another VAE: a diffusers AutoencoderKL folder (config.json and its weights), such as
    madebyollin/sdxl-vae-fp16-fix or the VAE a fine-tune ships. Its config replaces the model's (scaling factor,
    latent statistics, force_upcast); it must make the UNet's latent channels. The name says so."""
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelError(f"VAE {path}: not a diffusers AutoencoderKL folder (no config.json)")
    try:
        vae = VAEConfig.from_diffusers(json.loads(config_path.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"VAE {path}: {exc}") from exc
    if vae.latent_channels != source.configs.vae.latent_channels:
        raise ModelError(
            f"VAE {path}: makes {vae.latent_channels} latent channels, the model's UNet takes "
            f"{source.configs.vae.latent_channels}"
        )
    files = _locate_weights(path, _WEIGHT_STEMS["vae"])
    base = source.weights

    def weights(part: str, shapes: Any, dtype: Any) -> tuple[Any, str]:
        if part != "vae":
            return base(part, shapes, dtype)
        return convert_component("vae", lambda: read_state(files), files, shapes, dtype, weight_cache_dir, str(path))

    configs = dataclasses.replace(source.configs, vae=vae)
    return dataclasses.replace(source, name=f"{source.name}+vae:{path.name}", configs=configs, weights=weights)


def with_unet(source: Source, path: Path, weight_cache_dir: Path | None = None) -> Source:
    """The model with its UNet's weights read from another file: a UNet-only .safetensors in diffusers' layout
    (how SDXL-Lightning ships `sdxl_lightning_4step_unet.safetensors`) or a diffusers UNet folder, of the same
    architecture (a folder's config.json must agree). The name says so, and the weights' hash follows."""
    if path.is_dir():
        config = path / "config.json"
        if config.exists():
            theirs = UNetConfig.from_diffusers(json.loads(config.read_text()), source.configs.unet.pooled_width)
            if theirs != source.configs.unet:
                raise ModelError(f"UNet {path}: its config.json is not the model's UNet architecture")
        files = _locate_weights(path, _WEIGHT_STEMS["unet"])
    elif path.is_file():
        files = [path]
    else:
        raise ModelError(f"UNet {path}: no such file or folder")
    base = source.weights

    def weights(part: str, shapes: Any, dtype: Any) -> tuple[Any, str]:
        if part != "unet":
            return base(part, shapes, dtype)
        return convert_component("unet", lambda: read_state(files), files, shapes, dtype, weight_cache_dir, str(path))

    return dataclasses.replace(source, name=f"{source.name}+unet:{path.name}", weights=weights)


def load_single_file(
    path: str | Path,
    dtype: Any = jnp.bfloat16,
    name: str | None = None,
    shape_cache: Path | None = None,
    background: bool = False,
    weight_cache_dir: Path | None = None,
    vae_dtype: str = "auto",
    config_dir: Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    max_bytes: int | None = None,
) -> Model:
    """A single-file SDXL checkpoint (sd_xl_base_1.0.safetensors layout). Configs are inferred from the
    tensors; tokenizers and scheduler are SDXL's defaults, or a diffusers folder's (config_dir, as diffusers'
    from_single_file(config=...)), whose configs then win over the inferred ones."""
    from worker.engine import single_file

    source = single_file.source(Path(path), name or str(path), weight_cache_dir, config_dir)
    if unet:
        source = with_unet(source, Path(unet), weight_cache_dir)
    if vae:
        source = with_vae(source, Path(vae), weight_cache_dir)
    return _assemble(source, dtype, vae_dtype, shape_cache, background, max_bytes)


def from_preset(preset: str, dtype: Any = jnp.bfloat16, vae_dtype: str = "auto") -> Model:
    """A random model of a preset size (tiny, mid, sdxl) built in memory: for benchmarks, no files."""
    import tempfile

    from worker.engine import tiny

    root = Path(tempfile.mkdtemp(prefix=f"sdxl-{preset}-"))
    tiny.write_configs(root, preset)
    configs = Configs.from_dicts(tiny.configs(preset), preset)

    def weights(part: str, _shapes: Any, dtype: Any) -> tuple[Any, str]:
        return tiny.build_params(preset, dtype, parts=(part,))[part], "random"

    source = Source(f"random-{preset}", configs, root, tiny.SCHEDULER, True, weights)
    return _assemble(source, dtype, vae_dtype, None, False)


def resolve_dtype(name: str) -> Any:
    """'auto' -> bfloat16 on TPUs and GPUs, float32 on CPUs (XLA emulates bfloat16 there, ~2x slower)."""
    if name == "auto":
        name = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def fetch_hub(repo_id: str, cache_dir: str | None = None, variant: str = "", patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) the files an SDXL repo needs (or `patterns`). Raises ModelError when it
    cannot."""
    from huggingface_hub import constants, snapshot_download

    try:
        allow = patterns or hub_patterns(variant)
        return Path(snapshot_download(repo_id, allow_patterns=allow, cache_dir=cache_dir))
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        cache = cache_dir or constants.HF_HUB_CACHE
        raise ModelError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub and it is not complete in the cache "
            f"{cache} ({type(exc).__name__}: {exc}). Download it where the network allows "
            f"(`hf download {repo_id}`) and copy the cache, or point SDXL_MODEL at a local folder or file."
        ) from exc


def _vae_folder(spec: str | Path) -> Path:
    """A VAE override's folder: a local one, or a hub id (a VAE-only repository such as
    madebyollin/sdxl-vae-fp16-fix) fetched into the Hugging Face cache."""
    path = Path(spec)
    if path.exists() or str(spec).startswith(("/", ".")) or str(spec).count("/") != 1:
        return path
    return fetch_hub(str(spec), patterns=["config.json", "diffusion_pytorch_model.safetensors"])


def load(
    spec: str,
    dtype: Any = jnp.bfloat16,
    tiny_dir: str | Path | None = None,
    shape_cache: Path | None = None,
    variant: str = "",
    background: bool = False,
    weight_cache_dir: Path | None = None,
    vae_dtype: str = "auto",
    config_dir: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    max_bytes: int | None = None,
) -> Model:
    """`tiny`, a local folder, a single-file checkpoint (`*.safetensors`), or a hub id such as
    stabilityai/stable-diffusion-xl-base-1.0. `shape_cache`: a folder where parameter shapes are kept between
    starts (the worker uses its compile cache). `variant`: the folder's weight files' variant ("fp16": half of
    SDXL base's download; served in `dtype` either way). `background`, `weight_cache_dir`: see load_folder.
    `vae_dtype`: auto, float32 or bfloat16 (resolve_vae_dtype). `config_dir`: a single file's diffusers folder
    for configs, tokenizers and scheduler (load_single_file)."""
    options = {"shape_cache": shape_cache, "background": background, "weight_cache_dir": weight_cache_dir}
    options["vae_dtype"] = vae_dtype
    options["max_bytes"] = max_bytes  # ModelTooLarge before reading when the weights would take more
    options["unet"] = unet or None  # a UNet-only weights file or folder in place of the model's (with_unet)
    options["vae"] = _vae_folder(vae) if vae else None  # another VAE (with_vae): a folder or a hub id
    if spec in ("tiny", "tiny-refiner", "tiny-inpaint"):
        from worker.engine import tiny

        folder = Path(tiny_dir or tiny.default_dir()) if spec == "tiny" else tiny.default_dir(spec)
        tiny.ensure(folder, preset=spec)
        return load_folder(folder, dtype, name=spec, **options)
    path = Path(spec)
    if path.is_file():
        return load_single_file(path, dtype, config_dir=Path(config_dir) if config_dir else None, **options)
    if path.exists():
        return load_folder(path, dtype, variant=variant, **options)
    if spec.endswith((".safetensors", ".ckpt")) or spec.startswith(("/", ".")):
        raise ModelError(f"model {spec!r}: no such file or folder")
    if spec.count("/") != 1:
        raise ModelError(f"model {spec!r} is neither 'tiny', an existing folder or file, nor a hub id like owner/name")
    return load_folder(fetch_hub(spec, variant=variant), dtype, name=spec, variant=variant, **options)
