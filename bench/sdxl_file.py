"""A full-size SDXL single-file checkpoint with random weights: sd_xl_base_1.0.safetensors' key names, shapes and
dtype (fp16, 6.94 GB), CLIP's 49,408-token vocabulary included, so the worker reads it as it reads the real one.

    python bench/sdxl_file.py [PATH]      # default: ~/.cache/sdxl-service/sdxl-file-v1/sd_xl_base_random.safetensors

Written a tensor at a time from the header (tensor_file.layout), so writing it needs no more than a few hundred
MB of memory (the second text encoder's fused q/k/v, made to learn the names); the values are a 64 MB pool of
N(0, 0.02) draws, repeated: what a start does with the bytes does not depend on them.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.engine import convert, single_file, tensor_file, tiny  # noqa: E402
from worker.engine.model_source import Configs  # noqa: E402

VOCAB = 49408  # CLIP's: a single file is read with SDXL's own tokenizers, which need it
POOL = 32 * 2**20  # values in the repeated pool (fp16: 64 MB)


def default_path() -> Path:
    return Path.home() / ".cache" / "sdxl-service" / "sdxl-file-v1" / "sd_xl_base_random.safetensors"


def entries() -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The single file's tensors: name -> (fp16, shape), from SDXL's configs alone."""
    configs = tiny.configs("sdxl")
    for part in ("text_encoder", "text_encoder_2"):
        configs[part] = configs[part] | {"vocab_size": VOCAB, "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1}
    made = Configs.from_dicts(configs, "sdxl-file")
    parts = {}
    for part in made.parts:
        state = {}
        for path, shape in convert.flatten(made.module(part, np.float32).shapes()).items():
            *module, leaf = path
            dims = tuple(shape.shape)
            if leaf == "kernel":
                dims = (dims[3], dims[2], dims[0], dims[1]) if len(dims) == 4 else dims[::-1]
            name = f"{convert.pt_module(tuple(module))}.{'bias' if leaf == 'bias' else 'weight'}"
            state[name] = np.broadcast_to(np.zeros((), np.float16), dims)  # a shape, no memory
        parts[part] = state
    joined = single_file.join(parts, configs)
    return {name: (np.dtype(np.float16), tuple(array.shape)) for name, array in joined.items()}


def write(path: Path) -> int:
    """Write the checkpoint (to a temporary name, then renamed); its size in bytes."""
    tensors = entries()
    head, offsets = tensor_file.layout(tensors, {"format": "pt"})
    pool = (np.random.default_rng(0).standard_normal(POOL, dtype=np.float32) * 0.02).astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(head)
        for name in sorted(tensors, key=offsets.__getitem__):
            assert f.tell() == offsets[name], name
            count = int(np.prod(tensors[name][1]))
            start = zlib.crc32(name.encode()) % POOL
            while count:
                chunk = pool[start : start + count]
                f.write(chunk.tobytes())
                count -= len(chunk)
                start = 0
    tmp.rename(path)
    return path.stat().st_size


def ensure(path: Path | None = None) -> Path:
    path = path or default_path()
    if not path.exists():
        print(f"writing a full-size random SDXL checkpoint to {path} (once) ...", flush=True)
        write(path)
    return path


if __name__ == "__main__":
    where = ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"{where}: {where.stat().st_size / 1e9:.2f} GB")
