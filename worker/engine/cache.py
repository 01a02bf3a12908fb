"""The persistent XLA compilation cache, one folder per (chip kind, device count, JAX version).

JAX's own cache keys already include these, so the split is for people: a folder can be shipped to (or
baked into) a new host of the same kind, and a stale one deleted by name. JAX's cache skips the XLA
compile (the minutes) but not tracing and lowering; the engine also keeps whole serialized executables in
`<folder>/executables/` (engine._aot_path), which skip those too.

Anyone who can write this folder can run code in the worker (both caches hold executables, and the
serialized ones are pickles): keep it private (mode 0700).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jaxlib


def key() -> str:
    devices = jax.local_devices()
    kind = re.sub(r"[^A-Za-z0-9]+", "-", devices[0].device_kind).strip("-").lower()
    return f"{devices[0].platform}-{kind}-x{len(devices)}-jax{jax.__version__}-jaxlib{jaxlib.__version__}"


def enable(root: str | Path) -> Path:
    """Point JAX at root/<key>; must run before the first compile. Returns the folder used."""
    folder = Path(root).expanduser() / key()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache everything: the defaults skip programs that compile in under a second or are small.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder
