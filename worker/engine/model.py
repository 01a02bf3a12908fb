"""Loading an SDXL model: the top of the loader. A spec names a diffusers-format folder (folder.py), a
single-file checkpoint (single_file.py), a hub id, or `tiny`, a small random model with SDXL's topology that is
built offline from configs (tiny.py); each gives a Source (model_source.py), assembled here into a Model.

Everything here runs on the host; `Model.params` are numpy/jax arrays not yet placed on devices. The networks
are our own (unet.py, vae.py, clip.py); a model is their configs, parameters and tokenizers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker.engine import code_identity, convert, folder, host_memory, single_file, tiny, tokenizer, weight_cache
from worker.engine.model_source import (
    GROUP_BYTES,
    WEIGHT_STEMS,
    Component,
    Configs,
    LoadOptions,
    ModelError,
    ModelTooLarge,
    NotEnoughMemory,
    Quantize,
    Source,
    variant_name,
)
from worker.engine.schedule import NoiseConfig
from worker.engine.unet import UNetConfig
from worker.engine.vae import VAEConfig

# the loader's public face: callers need not know which layer defines what they catch or pass
__all__ = [
    "Configs",
    "LoadOptions",
    "Model",
    "ModelError",
    "ModelTooLarge",
    "NotEnoughMemory",
    "Quantize",
    "Source",
    "load",
]

log = logging.getLogger(__name__)

_CONFIG_PATTERNS = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*/config.json"]
TINY_PRESETS = ("tiny", "tiny-refiner", "tiny-inpaint")  # the random models `load` builds by name
DEFAULTS = LoadOptions()


def hub_patterns(variant: str = "") -> list[str]:
    """The files an SDXL repo needs, one precision only: SDXL base ships each weight file twice (float32 and
    the fp16 variant), and a pattern matching both would download 20 GB to use 14 GB (or 7 GB)."""
    patterns = list(_CONFIG_PATTERNS)
    for part, stem in WEIGHT_STEMS.items():
        patterns.append(f"{part}/{variant_name(f'{stem}.safetensors.index.json', variant)}")
        if variant:  # shards: model.fp16-00001-of-00002.safetensors
            patterns.append(f"{part}/{stem}.{variant}.safetensors")
            patterns.append(f"{part}/{stem}.{variant}-*.safetensors")
        else:
            patterns.append(f"{part}/{stem}.safetensors")
            patterns.append(f"{part}/{stem}-*.safetensors")
    return patterns


class Digest:
    """The weights' sha256, taken a group at a time in name order (Model.digest_weights)."""

    def __init__(self, quantize: Quantize):
        self.sha = hashlib.sha256()
        if quantize is not Quantize.none:
            self.sha.update(f"quantize={quantize}\n".encode())

    def update(self, flat: convert.FlatTree, part: str) -> None:
        """One component's leaves, or a group of them (groups come in name order: model_source.plan_groups)."""
        for name, value in sorted(flat.items()):
            array = np.ascontiguousarray(np.asarray(value))
            self.sha.update(json.dumps(["/".join((part, *name)), array.dtype.name, list(array.shape)]).encode())
            self.sha.update(memoryview(array.reshape(-1).view(np.uint8)))

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


@dataclass(frozen=True)
class Unread:
    """A model's weights, not read yet: where from, and each component's shapes and dtype."""

    source: Source
    shapes: dict[str, Any]
    dtypes: dict[str, Any]
    group_bytes: int = GROUP_BYTES  # about how much each group of stream() holds


@dataclass
class Model:
    name: str
    configs: Configs
    tokenizer: Any  # our CLIPTokenizer (worker/engine/tokenizer.py); None for a refiner (no first text encoder)
    tokenizer_2: Any
    noise: NoiseConfig
    # {"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}: host arrays, or their shapes
    # (jax.ShapeDtypeStruct in `dtype`) while the weights are not read (LoadOptions(background=True)), and after an
    # engine has streamed them onto its devices or drop_host_weights()
    params: dict[str, Any]
    dtype: Any
    # model_index.json's force_zeros_for_empty_prompt: an absent negative prompt is zero embeddings (SDXL base);
    # false (the refiner, many fine-tunes): it is the empty string, encoded
    force_zeros_for_empty_prompt: bool = True
    vae_dtype: Any = None  # the VAE's weights and compute; None: `dtype`
    unread: Unread | None = None  # weights not read yet: stream() (a group at a time) or wait() (all at once)
    weights_s: float = 0.0  # how long reading the weights took (converting, hashing, writing the cache included)
    # per component, where its weights came from: "checkpoint" (read and converted), "converted cache"
    # (weight_cache: mapped, nothing converted); filled in when they are read
    weight_sources: dict[str, str] = field(default_factory=dict)
    weights_dropped: bool = False  # drop_host_weights() was called or stream() ran: only the shapes are left
    weights_hash: str = ""  # sha256 of the weights as served (digest_weights()); recorded with every image
    # where weights_hash came from: "kept" (beside the converted weights, from an earlier start) or "computed"
    hash_from: str = ""
    # what runs below `dtype` (LoadOptions.quantize): the engine quantizes the weights as it places them
    quantize: Quantize = Quantize.none
    _hash_file: tuple[Path, str] | None = None  # (weight_cache.hash_path, hash_key) once the components are known

    @property
    def nbytes(self) -> int:
        """The served weights' bytes (on each device that holds them)."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self.params))

    def digest_weights(self) -> str:
        """sha256 over every parameter as served (names, dtypes, shapes and bytes, in name order): the same
        weights give the same hash whether read from a folder, a single file or the converted cache, and any
        changed tensor changes it. Served quantized (fp8), the same checkpoint makes other pictures: the
        quantization is hashed too. Kept beside the converted weights (weight_cache.write_hash), keyed by what
        they were made from, so a warm start reads it instead of hashing ~7 GB (SDXL: ~6 s); stream() takes it
        as the groups pass. Run at start, before drop_host_weights."""
        if not self.weights_hash:
            params = self.wait()
            kept = weight_cache.read_hash(*self._hash_file) if self._hash_file else None
            if kept is not None:
                self.weights_hash, self.hash_from = kept, "kept"
            else:
                digest = Digest(self.quantize)
                for part in sorted(params):
                    digest.update(convert.flatten(params[part]), part)
                self._hashed(digest.hexdigest())
        return self.weights_hash

    def _hashed(self, sha256: str) -> None:
        self.weights_hash, self.hash_from = sha256, "computed"
        if self._hash_file is not None:
            weight_cache.write_hash(*self._hash_file, sha256)

    def _components(self) -> dict[str, Component]:
        """The components to read (in name order: the hash's), and the hash file they key."""
        unread = self.unread
        assert unread is not None
        self.unread = None
        weights = unread.source.weights
        components = {part: weights(part, unread.shapes[part], unread.dtypes[part]) for part in sorted(unread.shapes)}
        self.weight_sources.update({part: components[part].origin for part in self.configs.parts})
        if all(c.identity is not None and c.cached_path is not None for c in components.values()):
            paths = [c.cached_path for c in components.values() if c.cached_path is not None]
            key = weight_cache.hash_key({p: str(c.identity) for p, c in components.items()}, str(self.quantize))
            self._hash_file = (weight_cache.hash_path(paths[0].parent, paths), key)
        return components

    def stream(self) -> Iterator[tuple[str, convert.FlatTree]]:
        """The weights a group of tensors at a time, (component, {path in it: host array}), in name order, each
        read when asked for: a caller that places each group on its devices and lets it go holds one group on
        the host at a time, never the whole model (engine.Engine does). The hash is taken as the groups pass,
        or read from beside the converted weights; afterwards only the shapes are left (weights_dropped).
        Each group holds about LoadOptions.group_bytes."""
        if self.unread is None:
            raise ModelError(f"model {self.name!r}: its weights were already read; stream() reads them once")
        group_bytes = self.unread.group_bytes
        t0 = time.perf_counter()
        components = self._components()
        kept = weight_cache.read_hash(*self._hash_file) if self._hash_file else None
        digest = None if kept is not None else Digest(self.quantize)
        reading_s = time.perf_counter() - t0
        for part, component in components.items():
            t0 = time.perf_counter()
            for group in component.groups(group_bytes, release=True):
                if digest is not None:
                    digest.update(group, part)
                reading_s += time.perf_counter() - t0
                yield part, group
                del group  # the caller has placed it: not held here while the next one is read
                t0 = time.perf_counter()
            reading_s += time.perf_counter() - t0
        self.weights_dropped = True
        self.weights_s = reading_s
        if digest is not None:
            self._hashed(digest.hexdigest())
        else:
            self.weights_hash, self.hash_from = str(kept), "kept"

    def wait(self) -> dict[str, Any]:
        """The weights, read whole on the host (once; views on the converted cache where it has them)."""
        if self.unread is not None:
            t0 = time.perf_counter()
            self.params = {part: component.tree() for part, component in self._components().items()}
            self.weights_s = time.perf_counter() - t0
        return self.params

    def drop_host_weights(self) -> None:
        """Keep only the weights' shapes, which is all that tracing a program needs, once an engine holds them
        on its devices. On an accelerator the host copy is otherwise kept for nothing: for SDXL in bf16 that is
        6.7 GB of converted arrays (a warm start's are mapped pages of the weight cache, which this unmaps).
        No further Engine can be built from this model. A streamed model (stream()) holds none already."""
        if self.unread is not None:  # never read: nothing to drop, and nothing to read later
            self.unread = None
        self.params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.params)
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


def _shapes(configs: Configs, part: str, cache: Path | None) -> Any:
    """A network's parameter shapes. jax.eval_shape traces the module's init to get them, which takes seconds
    for a UNet (2 s for the `mid` preset on a CPU, most of a warm start's model load); with `cache` they are
    kept as JSON keyed by the config, the networks' source and JAX's version, so a warm start reads them."""
    trace = configs.module(part, jnp.float32).shapes
    if cache is None:
        return trace()
    networks = code_identity.digest("worker.engine.unet", "worker.engine.vae", "worker.engine.clip")
    key = json.dumps([part, dataclasses.asdict(getattr(configs, part)), networks, jax.__version__], sort_keys=True)
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


def assemble(source: Source, options: LoadOptions) -> Model:
    """The model from a Source, in options.dtype (the VAE in options.vae_dtype). options.background: return
    once the configs and shapes are known, nothing read: an engine streams the weights onto its devices a group
    at a time (Model.stream) while its programs compile. options.max_bytes: a ModelTooLarge, before any weight
    is read, when the served weights would take more; options.available_bytes: a NotEnoughMemory when reading
    them would need more host memory than that (host_memory.needed_bytes)."""
    configs, dtype, max_bytes = source.configs, options.dtype, options.max_bytes
    vae_dt = resolve_vae_dtype(options.vae_dtype, dtype, configs.vae)
    dtypes = {part: vae_dt if part == "vae" else dtype for part in configs.parts}
    shapes = {part: _shapes(configs, part, options.shape_cache) for part in configs.parts}
    nbytes = sum(
        int(np.prod(leaf.shape)) * np.dtype(dtypes[part]).itemsize
        for part in configs.parts
        for leaf in jax.tree_util.tree_leaves(shapes[part])
    )
    if max_bytes is not None and nbytes > max_bytes:
        raise ModelTooLarge(f"model {source.name!r}: its weights take {nbytes} bytes, over the {max_bytes} left")
    if options.available_bytes is not None:
        group = options.group_bytes or GROUP_BYTES
        need = host_memory.needed_bytes(nbytes, options.resident_on_host, group, streamed=options.background)
        available = options.available_bytes()
        if need > available:
            smaller = np.dtype(dtype).itemsize > 2
            raise NotEnoughMemory(
                f"model {source.name!r} in {np.dtype(dtype).name}: reading its weights needs {need} bytes "
                f"({need / 1e9:.2f} GB) of host memory ({nbytes / 1e9:.2f} GB of weights"
                + (", kept in host memory as a CPU serves them" if options.resident_on_host else "")
                + f"), and {available} bytes ({available / 1e9:.2f} GB) are available. Free memory or give the "
                "worker more"
                + (", or serve it in bfloat16 (SDXL_DTYPE=bfloat16: half the bytes)" if smaller else "")
                + "; README: 'Memory and disk'"
            )
        log.info(
            "model %s in %s: reading its weights needs %.2f GB of host memory, %.2f GB available",
            source.name,
            np.dtype(dtype).name,
            need / 1e9,
            available / 1e9,
        )
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
        unread=Unread(source, shapes, dtypes, options.group_bytes or GROUP_BYTES),
        quantize=Quantize(options.quantize),
    )
    if not options.background:
        model.wait()
    return model


def _with_overrides(source: Source, options: LoadOptions) -> Source:
    if options.unet:
        source = folder.with_unet(source, Path(options.unet), options.weight_cache_dir)
    if options.vae:
        source = folder.with_vae(source, _vae_folder(options.vae), options.weight_cache_dir)
    return source


def load_folder(path: str | Path, options: LoadOptions = DEFAULTS, name: str | None = None) -> Model:
    """A diffusers SDXL folder (see LoadOptions; unet, vae: another UNet's weights, another VAE, in place of
    the folder's)."""
    root = Path(path)
    return assemble(_with_overrides(folder.source(root, name or str(root), options), options), options)


def load_single_file(path: str | Path, options: LoadOptions = DEFAULTS, name: str | None = None) -> Model:
    """A single-file SDXL checkpoint (sd_xl_base_1.0.safetensors layout). Configs are inferred from the
    tensors; tokenizers and scheduler are SDXL's defaults, or a diffusers folder's (options.config_dir, as
    diffusers' from_single_file(config=...)), whose configs then win over the inferred ones."""
    source = single_file.source(Path(path), name or str(path), options)
    return assemble(_with_overrides(source, options), options)


def resolve_dtype(name: str) -> Any:
    """'auto' -> bfloat16 on TPUs and GPUs, float32 on CPUs (XLA emulates bfloat16 there, ~2x slower)."""
    if name == "auto":
        name = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def fetch_hub(repo_id: str, cache_dir: str | None = None, variant: str = "", patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) the files an SDXL repo needs (or `patterns`). Raises ModelError when it
    cannot."""
    from huggingface_hub import constants, snapshot_download  # only a hub id needs it (a second of imports)

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


def load(spec: str, options: LoadOptions = DEFAULTS) -> Model:
    """`tiny` (or tiny-refiner, tiny-inpaint), a local folder, a single-file checkpoint (`*.safetensors`), or a
    hub id such as stabilityai/stable-diffusion-xl-base-1.0; how: LoadOptions."""
    if spec in TINY_PRESETS:
        where = Path(options.tiny_dir or tiny.default_dir()) if spec == "tiny" else tiny.default_dir(spec)
        tiny.ensure(where, preset=spec)
        return load_folder(where, dataclasses.replace(options, variant=""), name=spec)  # written in float32
    path = Path(spec)
    if path.is_file():
        return load_single_file(path, options)
    if path.exists():
        return load_folder(path, options)
    if spec.endswith((".safetensors", ".ckpt")) or spec.startswith(("/", ".")):
        raise ModelError(f"model {spec!r}: no such file or folder")
    if spec.count("/") != 1:
        raise ModelError(f"model {spec!r} is neither 'tiny', an existing folder or file, nor a hub id like owner/name")
    return load_folder(fetch_hub(spec, variant=options.variant), options, name=spec)
