"""Reading safetensors files through a memory map: the same arrays as the safetensors package, BF16, errors."""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors.numpy import save_file

from worker.engine import tensor_file


def test_same_arrays_as_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    state = {
        "down.0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float16),
        "down.0.bias": rng.standard_normal(8).astype(np.float32),
        "position_ids": np.arange(77, dtype=np.int64)[None],
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }
    save_file(state, tmp_path / "m.safetensors", metadata={"format": "pt"})
    got = tensor_file.read(tmp_path / "m.safetensors")
    want = load_file(tmp_path / "m.safetensors")
    assert got.keys() == want.keys() == state.keys()
    for k in state:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])
        assert not got[k].flags.writeable  # views on the read-only map, not copies


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_bfloat16_files_load(tmp_path):
    """numpy's own loader in the safetensors package cannot read BF16; checkpoints saved from bf16 use it."""
    values = np.array([[1.5, -2.0], [0.0078125, 3.0e38]], dtype=ml_dtypes.bfloat16)
    _write_raw(
        tmp_path / "b.safetensors", {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, values.tobytes()
    )
    got = tensor_file.read(tmp_path / "b.safetensors")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), values.astype(np.float32))


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not a safetensors file"),
        (b"\x05\x00", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "header of"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
    ],
)
def test_broken_files_are_named(tmp_path, content, message):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(tensor_file.TensorFileError, match=message) as err:
        tensor_file.read(tmp_path / "x.safetensors")
    assert "x.safetensors" in str(err.value)


def test_a_truncated_file_is_refused(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "t.safetensors")
    whole = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(whole[:-100])
    with pytest.raises(tensor_file.TensorFileError, match="truncated or corrupt"):
        tensor_file.read(tmp_path / "t.safetensors")
    _write_raw(tmp_path / "d.safetensors", {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(tensor_file.TensorFileError, match="unreadable entry"):
        tensor_file.read(tmp_path / "d.safetensors")


def test_a_broken_weight_file_is_a_model_error(tmp_path, tiny_dir):
    import shutil

    from worker.engine import model

    shutil.copytree(tiny_dir, tmp_path / "m")
    unet = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-1000])  # an interrupted copy
    with pytest.raises(model.ModelError, match=r"diffusion_pytorch_model\.safetensors.*truncated or corrupt"):
        model.load_folder(tmp_path / "m")


def test_metadata_is_read_with_the_tensors(tmp_path):
    """The weight cache keeps its identity in `__metadata__`; files without one read as empty."""
    values = np.array([[1.5, -2.0], [0.0078125, 3.0e38]], dtype=ml_dtypes.bfloat16)
    save_file({"w": values}, tmp_path / "m.safetensors", metadata={"identity": "abc"})
    tensors, metadata = tensor_file.read_with_metadata(tmp_path / "m.safetensors")
    assert metadata == {"identity": "abc"}
    np.testing.assert_array_equal(tensors["w"].astype(np.float32), values.astype(np.float32))
    save_file({"w": values}, tmp_path / "n.safetensors")
    assert tensor_file.read_with_metadata(tmp_path / "n.safetensors")[1] == {}


def test_a_file_laid_out_from_shapes_and_written_a_tensor_at_a_time_is_a_safetensors_file(tmp_path):
    """layout(): the head and offsets from names, dtypes and shapes alone (weight_cache.Writer writes groups
    into them as they are converted); the safetensors package reads the result."""
    want = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(5, np.float16)}
    head, offsets = tensor_file.layout({k: (v.dtype, v.shape) for k, v in want.items()}, {"k": "v"})
    path = tmp_path / "laid-out.safetensors"
    with open(path, "wb") as f:
        f.write(head)
        for name in ("b", "a"):  # any order
            f.seek(offsets[name])
            f.write(want[name].tobytes())
    got = safetensors.numpy.load_file(path)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert tensor_file.read_with_metadata(path)[1] == {"k": "v"}


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_views_leave_this_process_resident_memory_and_still_read(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors.numpy.save_file({"x": np.full((16, 2**20), 3.0, np.float32)}, path)  # 64 MB
    (x,) = tensor_file.read(path).values()
    before = _rss_file_bytes()
    assert float(x.T.sum()) == 3.0 * x.size  # every page touched: mapped into this process
    touched = _rss_file_bytes()
    tensor_file.release([x.T])
    assert touched - before > 48 * 2**20 and touched - _rss_file_bytes() > 48 * 2**20
    assert float(x[-1, -1]) == 3.0  # the data is still there, mapped back from the page cache
