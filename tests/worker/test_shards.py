"""Shard and manifest bytes read back by the tools people use: the webdataset package, pyarrow."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq

from common.datasets import MANIFEST_COLUMNS
from worker import shards


def rows(n: int) -> list[dict]:
    return [
        {
            "id": f"img-{i}",
            "line": i + 1,
            "prompt": f"prompt {i} ✓",
            "negative_prompt": "",
            "seed": 1000 + i,
            "width": 64,
            "height": 64,
            "steps": 4,
            "guidance_scale": 5.0,
            "scheduler": "euler",
            "key": f"datasets/r/images/img-{i}.png",
            "sha256": "ab" * 32,
            "shard": "datasets/r/shards/shard-000000.tar",
            "source_id": f"img-{i}",
            "aspect_ratio": None,
            "model": "tiny",
            "model_hash": "cd" * 32,
            "adapters": [],
            "truncated": False,
            "attempts": 1,
            "caption": f"caption {i}",
            "metadata": {"label": i, "split": "train"},
        }
        for i in range(n)
    ]


def test_a_tar_shard_is_read_back_by_webdataset(tmp_path):
    import webdataset as wds

    data = rows(3)
    images = [f"png bytes {i}".encode() for i in range(3)]
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(shards.tar_shard(data, images, "png"))
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["img-0", "img-1", "img-2"]
    assert [s["png"] for s in samples] == [b"png bytes 0", b"png bytes 1", b"png bytes 2"]
    assert [json.loads(s["json"]) for s in samples] == data  # the user's metadata verbatim in the sidecar
    assert [s["txt"] for s in samples] == [b"caption 0", b"caption 1", b"caption 2"]


def test_the_same_rows_give_the_same_bytes():
    data = rows(2)
    images = [b"x", b"y"]
    once = shards.tar_shard(data, images, "webp")
    assert once == shards.tar_shard(data, images, "webp")  # a rewrite after a crash is identical
    with tarfile.open(fileobj=io.BytesIO(once)) as tar:
        assert tar.getnames() == ["img-0.webp", "img-0.json", "img-0.txt", "img-1.webp", "img-1.json", "img-1.txt"]


def test_parquet_parts_and_their_concatenation():
    first, second = rows(2), rows(5)[2:]
    whole = pq.read_table(io.BytesIO(shards.concat_parquet([shards.parquet(first), shards.parquet(second)])))
    assert whole.column_names == list(MANIFEST_COLUMNS)
    # the free-form columns are JSON text in Parquet (objects and lists in the JSONL manifest)
    as_text = [{**r, "metadata": json.dumps(r["metadata"], sort_keys=True), "adapters": "[]"} for r in first + second]
    assert whole.to_pylist() == as_text
    assert pq.read_table(io.BytesIO(shards.concat_parquet([]))).num_rows == 0


def test_jsonl_keeps_unicode():
    assert shards.jsonl(rows(1)).decode().count("✓") == 1


def test_an_id_of_any_legal_length_names_its_members(tmp_path):
    import webdataset as wds

    from common.datasets import ID_PATTERN

    longest = "x" * 128  # USTAR names stop at 100 bytes: `<id>.json` of a 96-128 character id did not fit
    assert ID_PATTERN.match(longest)
    data = [{**rows(1)[0], "id": longest}, {**rows(2)[1], "id": "y" * 97}]
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(shards.tar_shard(data, [b"a", b"b"], "webp"))
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [longest, "y" * 97]
    assert [s["webp"] for s in samples] == [b"a", b"b"]
