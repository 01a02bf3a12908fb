"""The compile cache, one folder per (chip kind, device count, JAX version), and who may write it.

JAX's own cache keys already include these, so the split is for people: a folder can be shipped to (or
baked into) a new host of the same kind, and a stale one deleted by name. JAX's cache skips the XLA
compile (the minutes) but not tracing and lowering; the engine also keeps whole serialized executables in
`<folder>/executables/` (SealedExecutables, named by executables.Executables), which skip those too.

What a writer of these folders can do (docs/reliability.md):
- serialized executables are pickles, and executables: each file is sealed with an HMAC-SHA256 under a key
  only this deployment holds (`SDXL_CACHE_SIGNING_KEY`, else a key made once per host and kept outside the
  cache, in ~/.config/sdxl-service/, mode 0600). A file that does not verify is never unpickled: the worker
  compiles instead and writes a sealed one. A writer without the key can cost a compile, nothing more.
- JAX's own cache holds executables too, which JAX loads unchecked: it may live with the rest only where
  nobody else can write. For a cache folder shared between machines (a bucket), `SDXL_XLA_CACHE_DIR` puts
  JAX's cache on the host's own disk, and the sealed executables still make a new pod's start warm.
- converted weights (safetensors) and parameter shapes (JSON) are data: a writer can change the pictures
  or make a start fail, not run code.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib

from worker.engine import compile_log

log = logging.getLogger(__name__)


def key() -> str:
    devices = jax.local_devices()
    kind = re.sub(r"[^A-Za-z0-9]+", "-", devices[0].device_kind).strip("-").lower()
    return f"{devices[0].platform}-{kind}-x{len(devices)}-jax{jax.__version__}-jaxlib{jaxlib.__version__}"


def enable(root: str | Path, xla_root: str | Path | None = None) -> Path:
    """Point JAX at <xla_root or root>/<key>; must run before the first compile. Returns root/<key>, the
    folder for the rest (sealed executables, converted weights, shapes)."""
    folder = Path(root).expanduser() / key()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    xla_folder = Path(xla_root).expanduser() / key() if xla_root else folder
    xla_folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    jax.config.update("jax_compilation_cache_dir", str(xla_folder))
    # Cache everything: the defaults skip programs that compile in under a second or are small.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


SEAL = b"sdxl-service/sealed/1\n"  # then the 32-byte HMAC-SHA256 of the payload, then the payload


def signing_key(configured: str | None = None) -> bytes:
    """The key that seals serialized executables: the configured one (a fleet sharing a cache sets the same
    `SDXL_CACHE_SIGNING_KEY` everywhere), else this host's own, made once outside the cache folder."""
    if configured:
        return configured.encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "sdxl-service" / "cache-signing-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins: two processes starting at once agree on one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def seal(payload: bytes, key: bytes) -> bytes:
    return SEAL + hmac.new(key, payload, hashlib.sha256).digest() + payload


def unseal(data: bytes, key: bytes) -> bytes | None:
    """The payload if `data` was sealed with `key`; None otherwise (unsealed, another key, or altered)."""
    start = len(SEAL) + 32
    if not data.startswith(SEAL) or len(data) < start:
        return None
    expected = hmac.new(key, data[start:], hashlib.sha256).digest()
    return data[start:] if hmac.compare_digest(expected, data[len(SEAL) : start]) else None


class SealedExecutables:
    """Serialized executables in `folder`, each file sealed with `key` and checked before it is unpickled."""

    def __init__(self, folder: Path, key: bytes):
        self.folder, self.key = folder, key
        self.loaded = 0  # executables read back whole this process (no tracing, lowering or compiling)
        compile_log.install()  # tells a real compile from a persistent-cache hit (load_or_compile)

    def load_or_compile(self, name: str, lower: Callable[[], Any]) -> Any:
        """The executable stored as `name` (its name must cover everything it depends on), or lower().compile(),
        stored sealed for the next start when it was a real compile."""
        from jax.experimental import serialize_executable

        path = self.folder / name
        if path.exists():
            try:
                payload = unseal(path.read_bytes(), self.key)
                if payload is None:
                    path.unlink(missing_ok=True)  # checked at every start otherwise; the compile below rewrites it
                    raise ValueError("not sealed with this deployment's key (SDXL_CACHE_SIGNING_KEY): not unpickled")
                blob, in_tree, out_tree = pickle.loads(payload)
                loaded = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
                self.loaded += 1
                return loaded
            except Exception:  # stale, unreadable or foreign: compile as if it were not there
                log.warning("could not load %s; compiling instead", path, exc_info=True)
        hits_before = compile_log.snapshot().cache_hits
        compiled = lower().compile()
        if compile_log.snapshot().cache_hits > hits_before:
            # JAX's persistent cache served it: such an executable does not serialize whole (on the CPU, the
            # loaded file then fails at dispatch: "Function ... not found"), so only a real compile is kept.
            log.info("%s came from JAX's cache; not serialized (the next real compile writes it)", name)
            return compiled
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(seal(pickle.dumps(serialize_executable.serialize(compiled)), self.key))
        os.replace(tmp, path)
        return compiled
