"""SDXL's two tokenizers: transformers' CLIPTokenizer (a tokenizers-backed class; no model classes), read
from a model folder's tokenizer/ and tokenizer_2/, or built from CLIP's own merges for a single-file
checkpoint, which ships none.

Both SDXL tokenizers share CLIP's 49,408-entry vocabulary; they differ in padding: the first pads with
<|endoftext|>, the second (OpenCLIP's) with "!" (id 0).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import Any

BPE = Path(__file__).parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # the merges CLIP uses of the file (its vocabulary is 49,408 with these)
PAD_TOKENS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character map: printable Latin-1 bytes stand for
    themselves, the others are shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def write_files(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    """A tokenizer folder CLIPTokenizer.from_pretrained reads (and diffusers' pipelines too)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = special | {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, as OpenAI's tokenizer builds them from the merges file."""
    lines = gzip.decompress(BPE.read_bytes()).decode("utf-8").split("\n")[1 : MERGES + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(line.split()) for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, lines


def default_folder() -> Path:
    """SDXL's tokenizer folders, built once from the shipped merges (written to a temporary name and renamed,
    so concurrent starts never read half a file)."""
    root = Path(os.environ.get("SDXL_TOKENIZER_DIR", Path.home() / ".cache" / "sdxl-service" / "clip-tokenizer-v1"))
    if not (root / "tokenizer_2" / "tokenizer_config.json").exists():
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        vocab, merges = clip_vocabulary()
        for name, pad in PAD_TOKENS.items():
            write_files(tmp / name, vocab, merges, pad)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(root)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load(folder: Path) -> Any:
    # transformers says at import that it found no PyTorch and will serve tokenizers only: exactly what the
    # engine wants, so the notice is kept out of the worker's log
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)
