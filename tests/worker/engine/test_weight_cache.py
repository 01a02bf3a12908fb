"""Converted weights kept between starts (worker/engine/weight_cache.py), on the tiny model's real files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from worker.engine import convert, model, tensor_file, weight_cache

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture
def folder(tmp_path: Path, tiny_dir: Path) -> Path:
    """A copy of the tiny model that a test may touch and corrupt."""
    shutil.copytree(tiny_dir, tmp_path / "m")
    return tmp_path / "m"


def _load(folder: Path, cache: Path, dtype=np.float32) -> model.Model:
    m = model.load_folder(folder, model.LoadOptions(dtype, weight_cache_dir=cache))
    assert weight_cache.flush(timeout_s=60), "a background write did not finish"
    return m


def _same(a: model.Model, b: model.Model) -> bool:
    got, want = convert.flatten(a.params), convert.flatten(b.params)
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want
    )


def test_a_second_load_maps_the_converted_weights(folder, tmp_path, tiny32):
    cache = tmp_path / "weights"
    first = _load(folder, cache)
    assert first.weight_sources == dict.fromkeys(PARTS, "checkpoint")
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == sorted(PARTS)  # one file per component
    second = _load(folder, cache)
    assert second.weight_sources == dict.fromkeys(PARTS, "converted cache")
    assert _same(second, first) and _same(second, tiny32)  # bit for bit what converting gives
    leaf = next(iter(convert.flatten(second.params).values()))
    assert not leaf.flags.writeable and not leaf.flags.owndata  # a view on the mapped file, not a copy


def test_bfloat16_weights_round_trip(folder, tmp_path):
    cache = tmp_path / "weights"
    first = _load(folder, cache, model.jnp.bfloat16)
    second = _load(folder, cache, model.jnp.bfloat16)
    assert second.weight_sources == dict.fromkeys(PARTS, "converted cache")
    assert np.dtype(next(iter(convert.flatten(second.params).values())).dtype).name == "bfloat16"
    assert _same(second, first)


def test_a_changed_checkpoint_or_dtype_is_converted_again(folder, tmp_path):
    cache = tmp_path / "weights"
    _load(folder, cache)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    os.utime(vae, ns=(vae.stat().st_atime_ns, vae.stat().st_mtime_ns + 10**9))  # a new file in place
    again = _load(folder, cache)
    assert again.weight_sources == {**dict.fromkeys(PARTS, "converted cache"), "vae": "checkpoint"}
    in_bf16 = _load(folder, cache, model.jnp.bfloat16)
    assert in_bf16.weight_sources == dict.fromkeys(PARTS, "checkpoint")
    assert len(list(cache.iterdir())) == len(PARTS)  # rewritten over the old files, not beside them
    assert _load(folder, cache, model.jnp.bfloat16).weight_sources == dict.fromkeys(PARTS, "converted cache")


def test_a_corrupt_cache_file_is_converted_again_not_trusted(folder, tmp_path, tiny32, caplog):
    cache = tmp_path / "weights"
    _load(folder, cache)
    (unet,) = cache.glob("unet-*.safetensors")
    unet.write_bytes(unet.read_bytes()[:-4096])  # cut short, as by a full disk or a crash without sync
    with caplog.at_level(logging.WARNING, logger="worker.engine.weight_cache"):
        again = _load(folder, cache)
    assert again.weight_sources["unet"] == "checkpoint" and "unreadable" in caplog.text
    assert _same(again, tiny32)
    assert _load(folder, cache).weight_sources["unet"] == "converted cache"  # and written whole again


def test_an_unwritable_cache_only_costs_time(folder, tmp_path, tiny32, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="worker.engine.weight_cache"):
        m = _load(folder, blocked / "weights")
    assert m.weight_sources == dict.fromkeys(PARTS, "checkpoint") and _same(m, tiny32)
    assert "could not keep converted weights" in caplog.text


def test_a_dead_writers_temporary_file_is_removed(folder, tmp_path):
    cache = tmp_path / "weights"
    _load(folder, cache)
    (unet,) = cache.glob("unet-*.safetensors")
    stale = unet.with_name(unet.name + ".tmp999-1")
    stale.write_bytes(b"half a file")
    old = stale.stat().st_mtime - weight_cache.STALE_TMP_S - 1
    os.utime(stale, (old, old))
    unet.unlink()  # the next load writes this component again, and sweeps the leftover meanwhile
    _load(folder, cache)
    assert not stale.exists() and unet.exists()


def test_a_nearly_full_disk_is_left_alone(folder, tmp_path, monkeypatch, caplog):
    """The cache's disk may also hold Redis' append-only file: a write that would leave under
    MIN_FREE_BYTES free is skipped (the next start converts again), never attempted."""
    monkeypatch.setattr(weight_cache, "MIN_FREE_BYTES", 10**18)
    cache = tmp_path / "weights"
    with caplog.at_level(logging.WARNING, logger="worker.engine.weight_cache"):
        m = _load(folder, cache)
    assert m.weight_sources == dict.fromkeys(PARTS, "checkpoint")
    assert "GB free of the disk" in caplog.text and not list(cache.glob("*"))


def _streamed_hash(folder: Path, cache: Path) -> model.Model:
    """A worker's load: streamed a group at a time (each group let go), its hash taken on the way or kept."""
    m = model.load_folder(folder, model.LoadOptions(np.float32, background=True, weight_cache_dir=cache))
    for _ in m.stream():
        pass
    assert weight_cache.flush(timeout_s=60)
    return m


def test_the_weights_hash_is_kept_beside_them_and_read_on_a_warm_start(folder, tmp_path, tiny32):
    """The cold start hashes the weights as they pass and keeps the hash beside the converted files; a warm
    start reads it (a planted value comes back: nothing was hashed) while the key matches, and hashes again,
    rewriting the file, once the key does not (a changed checkpoint, dtype, code or quantization)."""
    cache = tmp_path / "weights"
    cold = _streamed_hash(folder, cache)
    assert cold.hash_from == "computed" and cold.weights_hash == tiny32.digest_weights()
    (kept,) = cache.glob("sha256-*.json")
    warm = _streamed_hash(folder, cache)
    assert warm.weight_sources == dict.fromkeys(PARTS, "converted cache")
    assert warm.hash_from == "kept" and warm.weights_hash == cold.weights_hash
    record = json.loads(kept.read_text())
    kept.write_text(json.dumps(record | {"sha256": "planted"}))
    assert _streamed_hash(folder, cache).weights_hash == "planted"  # read, not recomputed
    kept.write_text(json.dumps(record | {"key": "another checkpoint's", "sha256": "planted"}))
    again = _streamed_hash(folder, cache)
    assert again.hash_from == "computed" and again.weights_hash == cold.weights_hash
    assert json.loads(kept.read_text()) == record  # rewritten for the next start
    # a model read whole (the refiner's way) finds it too
    whole = model.load_folder(folder, model.LoadOptions(np.float32, weight_cache_dir=cache))
    assert whole.digest_weights() == cold.weights_hash and whole.hash_from == "kept"


def test_a_changed_checkpoint_keys_another_hash(folder, tmp_path):
    cache = tmp_path / "weights"
    cold = _streamed_hash(folder, cache)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = tensor_file.read(vae)
    changed = {k: np.array(v) for k, v in tensors.items()}
    first = sorted(changed)[0]
    changed[first] = changed[first] + 1
    del tensors
    save_file(changed, vae)
    again = _streamed_hash(folder, cache)
    assert again.hash_from == "computed" and again.weights_hash != cold.weights_hash
