"""The LoRA adapter registry (common/loras.py) on a folder and on a storage prefix: names to files, never paths;
descriptions from the safetensors header; a storage outage said as such, not as a missing adapter."""

from __future__ import annotations

import hashlib

import pytest

from common.loras import AdapterFileError, Registry, RegistryUnavailable
from common.storage import LocalStorage
from tests.helpers import variants


@pytest.fixture
def adapter_bytes(tiny_dir, tmp_path) -> bytes:
    return variants.write_lora(tiny_dir, tmp_path / "a.safetensors", "kohya", 4, 1, alpha=2.0).read_bytes()


def test_a_storage_prefix_serves_its_objects_copied_once(tmp_path, adapter_bytes):
    storage = LocalStorage(tmp_path / "store", "http://x", b"k" * 32)
    storage.put("loras/pixel-art.safetensors", adapter_bytes, "application/octet-stream")
    storage.put("loras/notes.txt", b"not an adapter", "text/plain")
    storage.put("loras/old/inner.safetensors", adapter_bytes, "application/octet-stream")  # not directly under it
    registry = Registry("storage:loras/", storage, tmp_path / "cache")
    good, bad = registry.list()
    assert [a.name for a in good] == ["pixel-art"] and bad == {}
    info = good[0]
    assert (info.bytes, info.sha256) == (len(adapter_bytes), hashlib.sha256(adapter_bytes).hexdigest())
    assert (info.layout, info.rank, info.touches) == ("kohya", 4, ["text_encoder", "text_encoder_2", "unet"])
    path = registry.path_of("pixel-art")
    assert path.read_bytes() == adapter_bytes and path.is_relative_to(tmp_path / "cache")
    storage.delete("loras/pixel-art.safetensors")
    assert registry.path_of("pixel-art") == path  # kept: a name is one file for good
    with pytest.raises(KeyError):
        registry.path_of("nope")
    with pytest.raises(KeyError):
        registry.path_of("../store/loras/x")


class DownStorage:
    def get(self, key: str) -> bytes:
        raise ConnectionError("storage unreachable")

    def keys(self, prefix: str):
        raise ConnectionError("storage unreachable")


def test_storage_away_is_unavailable_not_missing(tmp_path):
    registry = Registry("storage:loras", DownStorage(), tmp_path / "cache")
    with pytest.raises(RegistryUnavailable, match="did not answer"):
        registry.path_of("pixel-art")
    with pytest.raises(RegistryUnavailable):
        registry.list()


def test_a_folder_serves_files_directly_in_it_and_says_why_others_are_not(tmp_path, adapter_bytes):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(adapter_bytes)
    (folder / "empty.safetensors").write_bytes(b"")
    (tmp_path / "outside.safetensors").write_bytes(adapter_bytes)
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    good, bad = Registry(folder).list()
    assert [a.name for a in good] == ["good"]
    assert "shorter than its header" in bad["empty"] and "link out of the folder" in bad["link"]
    with pytest.raises(AdapterFileError):
        Registry(folder).get("empty")
    assert Registry(None).list() == ([], {}) and Registry("").folder is None
