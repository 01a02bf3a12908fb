"""Converted weights kept between starts: each component's parameters in Flax's layout and the serving dtype,
one safetensors file per component, so a restart maps them instead of converting the checkpoint again.

Converting SDXL's fp16 checkpoint (3.2 B elements transposed and cast to bfloat16) is most of a warm start
when the programs come from the executable cache. The converted file is read as views on a memory map
(tensor_file.read): nothing is copied on the host, and placing the arrays on the devices is the one copy.

One file per (component, source folder), so a model costs one converted copy on disk, about the size of
its fp16 files for a bfloat16 server (`SDXL_WEIGHT_CACHE=false` turns it off). The file's metadata holds
the identity it was made from: the source files' paths, sizes and modification times, the dtype, the
parameter shapes and the source of the readers and the converter (code_identity). A changed checkpoint, dtype
or code misses and is converted and written again over the old file. The same folder seen from another host
(same path, sizes and modification times: a shared volume, an image layer, `rsync -a` to the same place) still
hits; touching or moving a file misses, which is the safe side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine import code_identity, convert, tensor_file

log = logging.getLogger(__name__)
FORMAT = "sdxl-service/converted-weights/1"
MIN_FREE_BYTES = 2 * 10**9  # a write that would leave less free is skipped: the cache only saves time
STALE_TMP_S = 600  # a temporary file this old is no other process's write in progress (5 GB takes seconds)


def identity(files: list[Path], dtype: Any, shapes: Any) -> str:
    """What the converted weights depend on, as a digest: the checkpoint files are only statted, not read."""
    # the code that decides the bytes: the readers and the converter, with all they import from this repository
    code = code_identity.digest("worker.engine.folder", "worker.engine.single_file")
    digest = hashlib.sha256(FORMAT.encode() + code.encode())
    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    flat = {"/".join(k): [list(v.shape)] for k, v in convert.flatten(shapes).items()}
    digest.update(json.dumps([stats, np.dtype(dtype).name, flat], sort_keys=True).encode())
    return digest.hexdigest()


def path_for(folder: Path, part: str, files: list[Path]) -> Path:
    """The one file for this component of this model (a folder's component, or a single-file checkpoint)."""
    source = hashlib.sha256(str(files[0].resolve()).encode()).hexdigest()[:16]
    return folder / f"{part}-{source}.safetensors"


def load(path: Path, expected: str, shapes: Any, dtype: Any) -> dict[str, Any] | None:
    """The converted tree as read-only views on the file, or None when the file is missing, was made from
    something else, or cannot be read (the caller converts again and rewrites it)."""
    if not path.exists():
        return None
    try:
        tensors, metadata = tensor_file.read_with_metadata(path)
    except (OSError, tensor_file.TensorFileError) as exc:
        log.warning("converted weights %s are unreadable (%s); converting again", path, exc)
        return None
    if metadata.get("identity") != expected:
        log.info("converted weights %s were made from another checkpoint, dtype or converter; converting", path)
        return None
    flat: convert.FlatTree = {}
    for key, shape in convert.flatten(shapes).items():
        array = tensors.get("/".join(key))
        if array is None or array.shape != tuple(shape.shape) or array.dtype != np.dtype(dtype):
            log.warning("converted weights %s do not match the model at %s; converting again", path, "/".join(key))
            return None
        flat[key] = array
    return convert.unflatten(flat)


class Writer:
    """One component's converted file, written a group of tensors at a time as they are converted, so the whole
    converted component is never held on the host to be saved (SDXL's UNet: 5 GB). The header comes first, from
    the shapes and dtype alone (tensor_file.layout); each group's bytes go to their offsets; finish() syncs and
    renames on a thread, so a reader sees all of the file or none. Failures (a full disk) are logged, never
    raised: the cache only saves time, and a writer that failed ignores the rest."""

    def __init__(self, path: Path, expected: str, shapes: Any, dtype: Any):
        self.path = path
        self.tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
        self.fd: int | None = None
        entries = {"/".join(k): (np.dtype(dtype), tuple(v.shape)) for k, v in convert.flatten(shapes).items()}
        head, self.offsets = tensor_file.layout(entries, {"format": FORMAT, "identity": expected})
        size = len(head) + sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in entries.values())
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            for stale in path.parent.glob(f"{path.name}.tmp*"):  # left by a process that died while writing
                if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                    stale.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            if free - size < MIN_FREE_BYTES:  # the disk may also hold Redis' append-only file or the images
                log.warning(
                    "not keeping converted weights in %s: %.1f GB would leave %.1f GB free of the disk",
                    path,
                    size / 1e9,
                    (free - size) / 1e9,
                )
                return
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._write(head, 0)
        except OSError as exc:
            self._fail(exc)

    def write(self, group: convert.FlatTree) -> None:
        """A group's converted arrays (paths within the component -> arrays in the file's dtype)."""
        try:
            for key, array in group.items():
                if self.fd is not None:
                    self._write(np.ascontiguousarray(array).reshape(-1).view(np.uint8), self.offsets["/".join(key)])
        except OSError as exc:
            self._fail(exc)

    def finish(self) -> None:
        """Sync and rename on a thread (flush() waits for it): syncing gigabytes need not delay the start."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        thread = threading.Thread(target=self._commit, args=(fd,), name="weight-cache", daemon=True)
        thread.start()
        _writes.append(thread)

    def abort(self) -> None:
        """Nothing of the file stays (the read that fed it failed or was given up)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)

    def _write(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:  # pwrite may write less than asked: resume where it stopped
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def _commit(self, fd: int) -> None:
        try:
            os.fsync(fd)  # on disk before the rename makes it visible
            os.close(fd)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):  # the folder itself is unusable: nothing was written
            self.tmp.unlink(missing_ok=True)
        log.warning("could not keep converted weights in %s (%s); the next start converts again", self.path, exc)


_writes: list[threading.Thread] = []


def flush(timeout_s: float | None = None) -> bool:
    """Wait for this process's background writes; True when none is left running."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for thread in list(_writes):
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            _writes.remove(thread)
    return not _writes


# ---------------------------------------------------------------- the served weights' hash, kept beside them


def hash_key(identities: dict[str, str], quantize: str) -> str:
    """What the weights' hash depends on: every component's identity (above: checkpoint files, dtype, shapes,
    code) and how the model is quantized. Same key, same served bytes, so the same hash."""
    return hashlib.sha256(json.dumps([sorted(identities.items()), quantize]).encode()).hexdigest()


def hash_path(folder: Path, cached: list[Path]) -> Path:
    """The one hash file for a model: named by its components' converted files (a folder's, or a single file's)."""
    name = hashlib.sha256("\n".join(sorted(str(p) for p in cached)).encode()).hexdigest()[:16]
    return folder / f"sha256-{name}.json"


def read_hash(path: Path, key: str) -> str | None:
    """The hash kept for `key`, or None: no file, another key (a changed checkpoint, dtype or code), unreadable."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("sha256"), str):
        return None
    return kept["sha256"]


def write_hash(path: Path, key: str, sha256: str) -> None:
    """Keep the hash for the next start (replacing another key's); failures only cost the next start a hash."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.write_text(json.dumps({"key": key, "sha256": sha256}))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not keep the weights' hash in %s (%s); the next start hashes them again", path, exc)
