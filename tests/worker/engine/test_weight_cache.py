"""Converted weights kept between starts (worker/engine/weight_cache.py), on the tiny model's real files."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from worker.engine import convert, model, weight_cache

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
