"""The LoRA adapter registry: the `.safetensors` files in SDXL_LORA_DIR (a folder, or a prefix in the
deployment's storage), by name. Shared by the API (which lists
them at GET /v1/loras and refuses a job naming one that is not there) and the worker (which reads them for the
engine, worker/engine/lora.py).

A request names an adapter, never a path: a name is the file's stem, of letters, digits, '.', '_' and '-', and
only a regular file directly in the folder (a link that leads out of it is not served) is an adapter. Reading
an adapter here is its safetensors header (and alpha scalars), read by the worker's own reader (common/lora_format.py):
what it touches, its layout and rank, and whether the worker can apply it. Its sha256 is
worked out once per file version (size and modification time) and kept.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import lora_format
from common.jobs import LimitError, LoraRequest
from common.lora_format import AdapterFileError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    bytes: int
    sha256: str
    layout: str  # "kohya" or "diffusers"
    touches: list[str]  # unet, text_encoder, text_encoder_2
    rank: int  # the largest rank of its layers
    layers: int  # layers it adapts

    def public(self) -> dict[str, Any]:
        return asdict(self)


def describe(name: str, path: Path, sha256: str) -> AdapterInfo:
    """What the file adapts, read as the worker reads it (common/lora_format.py): AdapterFileError when the worker
    could not apply it, so that a job naming it is refused at submission, not failed on a worker."""
    layout = lora_format.read(path)
    return AdapterInfo(name, path.stat().st_size, sha256, layout.layout, layout.parts, layout.rank, len(layout.layers))


class RegistryUnavailable(Exception):
    """The storage holding the adapters (SDXL_LORA_DIR=storage:...) did not answer: try again later."""


STORAGE = "storage:"


class Registry:
    """The adapters in `where`: a local folder, or `storage:<prefix>` for the objects under that prefix in the
    deployment's storage (copied into `cache_dir` the first time each is needed, and kept: an adapter's name
    names one file for good; a new version takes a new name). None or '': none served."""

    def __init__(self, where: str | Path | None, storage: Any = None, cache_dir: str | Path | None = None):
        spec = str(where or "")
        self.storage, self.prefix = None, ""
        if spec.startswith(STORAGE):
            self.prefix = spec.removeprefix(STORAGE).strip("/")
            if storage is None or not self.prefix or cache_dir is None:
                raise ValueError(f"SDXL_LORA_DIR={spec}: a storage prefix needs the storage and a cache folder")
            self.storage = storage
            digest = hashlib.sha256(self.prefix.encode()).hexdigest()[:16]
            self.folder: Path | None = Path(cache_dir).expanduser() / digest
        else:
            self.folder = Path(spec).expanduser() if spec else None
        self._known: dict[tuple[str, int, int], AdapterInfo | AdapterFileError] = {}
        self._lock = threading.Lock()

    def _fetch(self, name: str) -> None:
        """A storage adapter copied into the cache folder (once); KeyError when there is no such object."""
        assert self.folder is not None and self.storage is not None
        path = self.folder / f"{name}.safetensors"
        if path.exists():
            return
        try:
            data = self.storage.get(f"{self.prefix}/{name}.safetensors")
        except KeyError:
            raise
        except Exception as exc:
            raise RegistryUnavailable(f"adapter storage ({STORAGE}{self.prefix}) did not answer: {exc}") from exc
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def path_of(self, name: str) -> Path:
        """The file for an adapter name; KeyError when there is no such adapter (or the name is not one);
        RegistryUnavailable when its storage does not answer."""
        if self.folder is None or not NAME.match(name):
            raise KeyError(name)
        if self.storage is not None:
            self._fetch(name)
        path = self.folder / f"{name}.safetensors"
        try:
            real = path.resolve(strict=True)
        except OSError:
            raise KeyError(name) from None
        if real.parent != self.folder.resolve() or not real.is_file():
            raise KeyError(name)  # a link out of the folder, or not a file: not an adapter of this deployment
        return real

    def get(self, name: str) -> AdapterInfo:
        """An adapter's description; KeyError: none of that name; AdapterFileError: the file is not an adapter."""
        path = self.path_of(name)
        stat = path.stat()
        key = (name, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            try:
                known = describe(name, path, hashlib.sha256(path.read_bytes()).hexdigest())
            except Exception as exc:  # whatever a malformed header breaks (a rank of 1e400, JSON nested past
                # the parser's recursion limit): that one file is unusable, never the listing or a job
                known = exc if isinstance(exc, AdapterFileError) else AdapterFileError(f"unreadable: {exc}")
            with self._lock:
                self._known[key] = known
        if isinstance(known, AdapterFileError):
            raise known
        return known

    def names(self) -> list[str]:
        """Every file name (without .safetensors) that may be an adapter, sorted."""
        if self.storage is not None:
            try:
                keys = list(self.storage.keys(self.prefix))
            except Exception as exc:
                raise RegistryUnavailable(f"adapter storage ({STORAGE}{self.prefix}) did not answer: {exc}") from exc
            inside = [k.removeprefix(self.prefix + "/") for k in keys]
            return sorted(k.removesuffix(".safetensors") for k in inside if k.endswith(".safetensors") and "/" not in k)
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(path.stem for path in self.folder.glob("*.safetensors"))

    def list(self) -> tuple[list[AdapterInfo], dict[str, str]]:
        """(the adapters, {name: why not} for files that are not usable), by name."""
        good: list[AdapterInfo] = []
        bad: dict[str, str] = {}
        for name in self.names():
            try:
                good.append(self.get(name))
            except KeyError:
                bad[name] = (
                    "not served: the name has characters other than letters, digits, '.', '_', '-', or "
                    "the file is a link out of the folder"
                )
            except AdapterFileError as exc:
                bad[name] = str(exc)
        return good, bad


def check(loras: list[LoraRequest], registry: Registry, max_per_job: int, max_rank: int) -> None:
    """A job's adapters against what the deployment serves: a LimitError naming the field and the adapter."""
    if not loras:
        return
    if registry.folder is None:
        raise LimitError("loras", "this deployment serves no LoRA adapters (no SDXL_LORA_DIR); leave `loras` out")
    if len(loras) > max_per_job:
        raise LimitError("loras", f"at most {max_per_job} adapters per job, got {len(loras)}")
    seen = set()
    for i, lora in enumerate(loras):
        field = f"loras.{i}.name"
        if lora.name in seen:
            raise LimitError(field, f"adapter {lora.name!r} is named twice; give it once, with the scale you want")
        seen.add(lora.name)
        try:
            info = registry.get(lora.name)
        except RegistryUnavailable:
            raise
        except KeyError:
            raise LimitError(field, f"no adapter named {lora.name!r} (GET /v1/loras lists them)") from None
        except AdapterFileError as exc:
            raise LimitError(field, f"adapter {lora.name!r} cannot be used: {exc}") from None
        if info.rank > max_rank:
            raise LimitError(
                field, f"adapter {lora.name!r} has rank {info.rank}; this deployment serves up to {max_rank}"
            )
