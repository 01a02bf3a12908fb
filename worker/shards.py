"""A data set's output files, as bytes: WebDataset tar shards and manifest parts (JSONL and Parquet).

Plain functions of rows and image bytes, no Redis or storage: the feeder fetches and uploads.
WebDataset groups a tar's members into samples by the name up to the first dot, so each line's image and
metadata are stored as `<id>.png` and `<id>.json` (ids are letters, digits, '_' and '-' only).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common.datasets import MANIFEST_COLUMNS


def tar_shard(rows: Sequence[Mapping[str, Any]], images: Sequence[bytes], extension: str) -> bytes:
    """One tar: for each row, its image (`images`, in the rows' order) and its manifest row as JSON."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, image in zip(rows, images, strict=True):
            _add(tar, f"{row['id']}.{extension}", image)
            _add(tar, f"{row['id']}.json", json.dumps(row, ensure_ascii=False).encode())
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

    types = {"line": pa.int64(), "seed": pa.int64(), "width": pa.int32(), "height": pa.int32(),
             "steps": pa.int32(), "guidance_scale": pa.float64()}  # fmt: skip
    return pa.schema([(name, types.get(name, pa.string())) for name in MANIFEST_COLUMNS])


def parquet(rows: list[Mapping[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r[c] for c in MANIFEST_COLUMNS} for r in rows], schema=_schema())
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
