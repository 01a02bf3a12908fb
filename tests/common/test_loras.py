"""The LoRA adapter registry (common/loras.py) on a folder and on a storage prefix: names to files, never paths;
descriptions from the safetensors header; a storage outage said as such, not as a missing adapter."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from common import lora_format
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


def test_the_registry_reads_files_as_the_worker_does(tiny_dir, tmp_path):
    """Key styles and alphas as diffusers reads them (common/lora_format.py, shared with the engine), and a file
    the worker could not apply refused when a job names it (a 422), not failed on a worker."""
    from safetensors.numpy import save_file

    from common.jobs import LimitError, LoraRequest
    from common.loras import check

    folder = tmp_path / "loras"
    folder.mkdir()
    peft = {"unet": {"r": 4, "lora_alpha": 8}, "text_encoder": {"r": 4, "lora_alpha": 2, "use_rslora": True}}
    variants.write_lora(
        tiny_dir, folder / "old.safetensors", "diffusers-old", 4, 1, ("unet", "text_encoder"), None, peft
    )
    save_file(
        {
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": np.zeros((4, 32, 3, 3), np.float32),
            "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": np.zeros((32, 4, 1, 1), np.float32),
        },
        folder / "locon.safetensors",
    )
    registry = Registry(folder)
    old = registry.get("old")
    # text encoders' lora_linear_layer keys are the text encoder's (the registry once listed such files UNet-only)
    assert (old.layout, old.touches, old.rank) == ("diffusers", ["text_encoder", "unet"], 4)
    layout = lora_format.read(registry.path_of("old"))
    scales = {layer.part: layer.scale for layer in layout.layers.values()}
    assert scales == {"unet": 8 / 4, "text_encoder": 2 / 2}  # rsLoRA: alpha / sqrt(rank)
    check([LoraRequest(name="old", scale=1.0)], registry, 2, 32)
    with pytest.raises(LimitError, match=r"'locon' cannot be used: .*convolution adapters") as err:
        check([LoraRequest(name="locon", scale=1.0)], registry, 2, 32)
    assert err.value.field == "loras.0.name"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"unet.r": 8, "unet.lora_alpha": 8}, "has rank 4; its lora_adapter_metadata metadata says 8"),
        ({"unet.r": 4, "unet.use_dora": True}, "DoRA"),
        ({"unet.r": 4, "unet.alpha_pattern": {"(": 2}}, "no regular expression"),
    ],
)
def test_metadata_that_does_not_fit_the_factors_is_refused(tmp_path, metadata, message):
    import json

    from safetensors.numpy import save_file

    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "a.safetensors"
    tensors = {
        f"{name}.lora_A.weight": np.zeros((4, 8), np.float32),
        f"{name}.lora_B.weight": np.zeros((8, 4), np.float32),
    }
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(AdapterFileError, match=message):
        lora_format.read(path)


def test_pattern_keys_pick_rank_and_alpha_as_peft_does(tmp_path):
    import json

    from safetensors.numpy import save_file

    blocks = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    tensors = {}
    for module, rank in (("attn1.to_q", 4), ("attn2.to_k", 2), ("attn2.to_q", 4)):
        tensors[f"{blocks}.{module}.lora_A.weight"] = np.zeros((rank, 8), np.float32)
        tensors[f"{blocks}.{module}.lora_B.weight"] = np.zeros((8, rank), np.float32)
    config = {"r": 4, "lora_alpha": 4, "rank_pattern": {"attn2.to_k": 2}, "alpha_pattern": {"to_q": 8}}
    meta = json.dumps({f"unet.{k}": v for k, v in config.items()})
    save_file(tensors, tmp_path / "a.safetensors", metadata={"lora_adapter_metadata": meta})
    layers = lora_format.read(tmp_path / "a.safetensors").layers
    got = {stem.rsplit(".", 2)[-2] + "." + stem.rsplit(".", 1)[-1]: (x.rank, x.scale) for stem, x in layers.items()}
    assert got == {"attn1.to_q": (4, 2.0), "attn2.to_k": (2, 2.0), "attn2.to_q": (4, 2.0)}
