"""Shard and manifest bytes read back by the tools people use: the webdataset package, pyarrow."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq

from common.dataset_store import DatasetRun
from common.datasets import MANIFEST_COLUMNS, DatasetOptions, DatasetStatus
from common.jobs import RenderConditions
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
            # what common/datasets.py conditioning records of a text-to-image line
            "timestep_spacing": None,
            "strength": None,
            "init_image_sha256": None,
            "mask_image_sha256": None,
            "refiner": None,
            "controlnets": [],
            "ip_adapter": None,
            "key": f"datasets/r/images/img-{i}.png",
            "sha256": "ab" * 32,
            "shard": "datasets/r/shards/shard-000000.tar",
            "source_id": f"img-{i}",
            "aspect_ratio": None,
            "model": "tiny",
            "model_hash": "cd" * 32,
            "adapters": [],
            "conditions": None,  # rows recorded before images carried their conditions
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
    as_text = [
        {**r, "metadata": json.dumps(r["metadata"], sort_keys=True), "adapters": "[]", "controlnets": "[]"}
        for r in first + second
    ]
    assert whole.to_pylist() == as_text
    assert pq.read_table(io.BytesIO(shards.concat_parquet([]))).num_rows == 0


def test_jsonl_keeps_unicode():
    assert shards.jsonl(rows(1)).decode().count("✓") == 1


def conditions(batch_rows: int) -> dict:
    return RenderConditions(
        dtype="bfloat16",
        vae_dtype="float32",
        quantize="none",
        attention="cudnn",
        batch_rows=batch_rows,
        devices=1,
        platform="gpu",
        device_kind="NVIDIA H100 80GB HBM3",
        jax="0.7.2",
        jaxlib="0.7.2",
    ).model_dump()


def test_the_manifest_and_card_record_what_decided_each_images_bytes():
    """Reruns are byte-identical only under the same weights and conditions (another SDXL_BATCH_ROWS moved 40 of
    52 images by a level): each row carries them, and the card lists them with their counts and says so."""
    made = rows(5)
    for i, row in enumerate(made):
        row["conditions"] = conditions(8 if i < 3 else 4)  # a run resumed on a worker with other batch rows
    parquet_rows = pq.read_table(io.BytesIO(shards.parquet(made))).to_pylist()
    assert [json.loads(r["conditions"])["batch_rows"] for r in parquet_rows] == [8, 8, 8, 4, 4]
    assert json.loads(shards.jsonl(made).splitlines()[0])["conditions"]["jaxlib"] == "0.7.2"
    per_shard = [shards.stats(made[:2], [b"x"] * 2, 1.0), shards.stats(made[2:], [b"x"] * 3, 2.0)]
    run = DatasetRun("r", "t", DatasetStatus.completed, DatasetOptions(), 7, 5, 0, 5, 5, 0, 0, 2, 5, 0, created_at=0.0)
    text = shards.card(run, per_shard)
    want = [
        f"model_hash {'cd' * 32}; dtype bfloat16, vae_dtype float32, quantize none, attention cudnn, batch_rows {n}"
        for n in (8, 4)
    ]
    assert f"- 3 images: {want[0]}" in text and f"- 2 images: {want[1]}" in text
    assert "device_kind NVIDIA H100 80GB HBM3, jax 0.7.2, jaxlib 0.7.2" in text
    assert "byte-identical images when the model hash and every condition below are the\nsame" in text
    header = text.split("---\n")[1]
    assert (
        "- name: conditions\n          struct:\n" in header
        and "- name: batch_rows\n              dtype: int64" in header
    )


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
