"""A data set's output files, as bytes: WebDataset tar shards and manifest parts (JSONL and Parquet).

Plain functions of rows and image bytes, no Redis or storage: the feeder fetches and uploads.
WebDataset groups a tar's members into samples by the name up to the first dot, so each line's image and
metadata are stored as `<id>.png`, `<id>.json` (the manifest row, the user's `metadata` in it verbatim) and
`<id>.txt` (the caption: the WebDataset / img2dataset convention); ids are letters, digits, '_' and '-' only.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from common.datasets import MANIFEST_COLUMNS
from common.jobs import ControlNetRequest, IPAdapterRequest, RefinerRequest, RenderConditions
from worker.images import EXTENSIONS


def tar_shard(rows: Sequence[Mapping[str, Any]], images: Sequence[bytes], extension: str) -> bytes:
    """One tar: for each row, its image (`images`, in the rows' order) and its manifest row as JSON."""
    buffer = io.BytesIO()
    # PAX, not USTAR: USTAR's names stop at 100 bytes, and `<id>.json` of a 96-128 character id (ids may be 128)
    # did not fit. A member whose name fits gets a plain USTAR header all the same; a longer one is preceded by
    # a PAX header holding its name, which tar, Python's tarfile and webdataset read (POSIX.1-2001).
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row, image in zip(rows, images, strict=True):
            _add(tar, f"{row['id']}.{extension}", image)
            _add(tar, f"{row['id']}.json", json.dumps(row, ensure_ascii=False).encode())
            _add(tar, f"{row['id']}.txt", (row.get("caption") or row["prompt"]).encode())
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same rows give the same bytes: a shard rewritten after a restart is identical
    tar.addfile(info, io.BytesIO(data))


def jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(dict(r), ensure_ascii=False).encode() + b"\n" for r in rows)


def _schema():
    import pyarrow as pa

    types = {
        "line": pa.int64(),
        "seed": pa.int64(),
        "width": pa.int32(),
        "height": pa.int32(),
        "steps": pa.int32(),
        "guidance_scale": pa.float64(),
        "aspect_ratio": pa.float64(),
        "strength": pa.float64(),
        "truncated": pa.bool_(),
        "attempts": pa.int32(),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in MANIFEST_COLUMNS])


JSON_COLUMNS = (
    "metadata",
    "adapters",
    "conditions",
    "refiner",
    "controlnets",
    "ip_adapter",
)  # free-form: JSON text in Parquet (objects and lists in JSONL)


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {c: row.get(c) for c in MANIFEST_COLUMNS}
    for c in JSON_COLUMNS:
        if out[c] is not None:
            out[c] = json.dumps(out[c], ensure_ascii=False, sort_keys=True)
    return out


def parquet(rows: list[Mapping[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_flat(r) for r in rows], schema=_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def concat_parquet(parts: Iterable[bytes]) -> bytes:
    """One Parquet file from the parts (the whole manifest, written when the run ends)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(io.BytesIO(p)) for p in parts]
    table = pa.concat_tables(tables) if tables else _schema().empty_table()
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def stats(rows: Sequence[Mapping[str, Any]], images: Sequence[bytes], written_at: float) -> dict[str, Any]:
    """One shard's figures, written beside it (stats/shard-N.json) and gathered into stats.json at the end."""
    lines = [r["line"] for r in rows]
    return {
        "count": len(rows),
        "image_bytes": sum(len(i) for i in images),
        "first_line": min(lines, default=None),
        "last_line": max(lines, default=None),
        "written_at": round(written_at, 3),
        "made_under": made_under(rows),
    }


def made_under(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The distinct (model hash, conditions) the rows were made under, each with its count, most rows first: what
    a rerun must match to give the same bytes (common/jobs.py RenderConditions)."""
    return _tally(({"model_hash": r.get("model_hash", ""), "conditions": r.get("conditions")}, 1) for r in rows)


def _tally(made: Iterable[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """(what images were made under, how many) summed by the first, most images first."""
    counts: dict[str, int] = {}
    for under, images in made:
        key = json.dumps(under, sort_keys=True)
        counts[key] = counts.get(key, 0) + images
    return [{**json.loads(k), "images": n} for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def run_stats(run: Any, per_shard: list[dict[str, Any]], failures: list[dict[str, Any]]) -> dict[str, Any]:
    """stats.json: the run's counts and each shard's figures. In input order a shard's `failures` are the
    failed lines of its window (completion order has no such window: null)."""
    shards_out = []
    for index, shard in enumerate(per_shard):
        failed = None
        if run.options.order == "input" and shard["first_line"] is not None:
            low, high = shard["first_line"], shard["last_line"]
            failed = sum(1 for f in failures if low <= f["line"] <= high)
        shards_out.append({"shard": index, **shard, "failures": failed})
    return {
        "run": run.id,
        "seed": run.seed,
        "order": run.options.order,
        "counts": {
            "total": run.total,
            "succeeded": run.succeeded,
            "failed": run.failed,
            "canceled": run.canceled,
            "skipped": run.skipped,
        },
        "image_bytes": sum(s["image_bytes"] for s in per_shard),
        "seconds": round(time.time() - (run.started_at or run.created_at), 3),
        "shards": shards_out,
    }


# The manifest columns' types in the Hugging Face `datasets` card (anything not listed: string)
_FEATURE_TYPES = {
    "line": "int64",
    "seed": "int64",
    "width": "int64",
    "height": "int64",
    "steps": "int64",
    "guidance_scale": "float64",
    "aspect_ratio": "float64",
    "strength": "float64",
    "truncated": "bool",
    "attempts": "int64",
    "metadata": "json",
}


def _dtypes(model: type[BaseModel], *leave_out: str) -> list[tuple[str, str]]:
    """A pydantic model's fields as `datasets` dtypes: int64, float64, string (enums and text)."""
    kinds = {int: "int64", float: "float64"}
    return [(n, kinds.get(f.annotation, "string")) for n, f in model.model_fields.items() if n not in leave_out]


# the manifest's object columns (common/datasets.py manifest_row, conditioning), declared field by field
_STRUCTS = {
    "conditions": _dtypes(RenderConditions),
    "refiner": _dtypes(RefinerRequest),
    "ip_adapter": [*_dtypes(IPAdapterRequest, "image"), ("image_sha256", "string")],
}
_LISTS = {
    "adapters": [("name", "string"), ("scale", "float64"), ("sha256", "string")],
    "controlnets": [*_dtypes(ControlNetRequest, "image"), ("image_sha256", "string")],
}


def _features(extension: str) -> str:
    """The WebDataset samples' features as the card's YAML: declared, not inferred, so a column whose first
    rows are null (a negative prompt, an aspect ratio) still loads when later rows have values."""

    def column(name: str, indent: str) -> str:
        if name in _STRUCTS:  # an object, or null
            inner = "".join(f"{indent}    - name: {n}\n{indent}      dtype: {t}\n" for n, t in _STRUCTS[name])
            return f"{indent}- name: {name}\n{indent}  struct:\n{inner}"
        if name in _LISTS:  # a list of objects
            inner = "".join(f"{indent}  - name: {n}\n{indent}    dtype: {t}\n" for n, t in _LISTS[name])
            return f"{indent}- name: {name}\n{indent}  list:\n{inner}"
        return f"{indent}- name: {name}\n{indent}  dtype: {_FEATURE_TYPES.get(name, 'string')}\n"

    json_struct = "".join(column(c, "        ") for c in MANIFEST_COLUMNS)
    return (
        f"    - name: {extension}\n      dtype: image\n"
        f"    - name: json\n      struct:\n{json_struct}"
        "    - name: txt\n      dtype: string\n"
        "    - name: __key__\n      dtype: string\n"
        "    - name: __url__\n      dtype: string\n"
    )


def _made_under_text(per_shard: list[dict[str, Any]]) -> str:
    """The card's list of what the run's images were made under (from every shard's stats)."""
    merged = _tally(
        ({"model_hash": m["model_hash"], "conditions": m["conditions"]}, m["images"])
        for shard in per_shard
        for m in shard.get("made_under", [])
    )
    if not merged:
        return "- (no image recorded its conditions)\n"
    lines = []
    for m in merged:
        c = m["conditions"] or {}
        said = ", ".join(f"{name} {c.get(name, '?')}" for name in RenderConditions.model_fields) if c else "unrecorded"
        lines.append(f"- {m['images']} images: model_hash {m['model_hash'] or '?'}; {said}\n")
    return "".join(lines)


def card(run: Any, per_shard: list[dict[str, Any]]) -> str:
    """README.md for the output folder: the Hugging Face `datasets` YAML header (the WebDataset shards as the
    train split, their features declared: image, the manifest row as `json` with the user's `metadata`, the
    caption as `txt`), then how it was generated. `load_dataset(folder)` reads the folder as it is."""
    defaults = run.options.defaults
    extension = EXTENSIONS[defaults.output_format.value]
    header = (
        "---\n"
        "configs:\n"
        "  - config_name: default\n"
        "    data_files:\n      - split: train\n        path: shards/*.tar\n"
        "dataset_info:\n"
        "  config_name: default\n"
        f"  features:\n{_features(extension)}"
        "  splits:\n    - name: train\n"
        f"      num_bytes: {sum(s.get('image_bytes', 0) for s in per_shard)}\n"
        f"      num_examples: {run.succeeded}\n"
        "tags:\n  - synthetic\n  - sdxl\n"
        "---\n"
    )
    body = f"""
# Data set {run.id}

Images generated by the SDXL job service from a JSONL of {run.total + run.skipped} lines: {run.succeeded} images,
{run.failed} failed, {run.canceled} canceled, {run.skipped} invalid lines left out; {len(per_shard)} WebDataset
shards in `shards/`, the manifest in `manifest.jsonl` and `manifest.parquet`, failures in `failures.jsonl`,
figures in `stats.json`.

Each sample is `<id>.{extension}` (the image, its generation parameters also inside the file), `<id>.json` (its
manifest row, with the line's own `metadata`) and `<id>.txt` (its caption).

## How it was generated

- run seed: {run.seed} (a line without a seed has `derive_seed(run seed, id)`: the first 4 bytes of sha256 of
  "seed/id")
- defaults for lines that leave them out: {json.dumps(defaults.public(), separators=(",", ":"))}
- order: {run.options.order}; images per shard: {run.options.shard_size}
- model and weights hash: in each row (`model`, `model_hash`), and the conditions that decide an image's bytes
  (`conditions`: dtype, VAE dtype, quantization, attention, batch rows, devices, platform, device kind, jax and
  jaxlib versions).

## Reproducing it byte for byte

The same input and run seed give byte-identical images when the model hash and every condition below are the
same as well. A rerun that differs in any of them (another `SDXL_BATCH_ROWS`, GPU model, jax release, attention
kernel ...) gives images that look the same but may differ by a level in some pixels, so their sha256 differ:
compare such reruns by pixels, not by hash. This run's images were made under:

{_made_under_text(per_shard)}
```python
from datasets import load_dataset
images = load_dataset("path/to/this/folder", split="train")   # {extension}, json, txt per sample
manifest = load_dataset("parquet", data_files="path/to/this/folder/manifest.parquet", split="train")
```
"""
    return header + body
