from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.engine import model
from worker.engine.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures"
SIZES = [(64, 64), (64, 96)]


def _fixture(tiny_dir: Path, name: str) -> dict[str, Any]:
    data = np.load(FIXTURES / name)
    digest = hashlib.sha256()
    for path in sorted(tiny_dir.glob("*/*.safetensors")):
        digest.update(path.read_bytes())
    made_from = bytes(data["weights_sha256"]).decode()
    assert made_from == digest.hexdigest(), f"{name} was made from other tiny weights: rerun its make_*.py"
    return {
        "meta": json.loads(bytes(data["meta"]).decode()),
        **{k: data[k] for k in data.files if k not in ("meta", "weights_sha256")},
    }


@pytest.fixture(scope="session")
def reference(tiny_dir: Path) -> dict[str, Any]:
    """PyTorch diffusers' outputs on the tiny model (made by make_reference.py from these very weights)."""
    return _fixture(tiny_dir, "reference.npz")


@pytest.fixture(scope="session")
def sampling(tiny_dir: Path) -> dict[str, Any]:
    """diffusers' few-step, image-to-image and inpainting outputs (make_sampling_reference.py, same weights)."""
    return _fixture(tiny_dir, "sampling.npz")


@pytest.fixture(scope="session")
def models_reference(tiny_dir: Path) -> dict[str, Any]:
    """diffusers with the tiny model's parts replaced (make_models_reference.py, same weights)."""
    return _fixture(tiny_dir, "models.npz")


@pytest.fixture(scope="session")
def lora_reference(tiny_dir: Path) -> dict[str, Any]:
    """diffusers with LoRA adapters loaded (make_lora_reference.py, same weights)."""
    return _fixture(tiny_dir, "loras.npz")


@pytest.fixture(scope="session")
def tiny_single_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights as one single-file checkpoint (Stability's key names), as make_reference.py
    writes it for diffusers' from_single_file."""
    from worker.engine import single_file

    path = tmp_path_factory.mktemp("single-file") / "tiny-sdxl.safetensors"
    single_file.write(path, *single_file.from_folder(tiny_dir))
    return path


@pytest.fixture(scope="session")
def tiny32(tiny_dir: Path) -> model.Model:
    return model.load_folder(tiny_dir, model.LoadOptions(np.float32), name="tiny")


@pytest.fixture(scope="session")
def engine32(tiny32: model.Model) -> Engine:
    """float32 weights, 4-row batches, the two test sizes."""
    return Engine(tiny32, SIZES, batch_rows=4)


@pytest.fixture(scope="session")
def controlnet_reference(tiny_dir: Path) -> dict[str, Any]:
    """diffusers' ControlNet pipelines and one ControlNet's residuals (make_controlnet_reference.py, same weights)."""
    return _fixture(tiny_dir, "controlnets.npz")


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_dir: Path, controlnet_reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """The fixture's random ControlNets for the tiny model, as diffusers folders: name -> folder."""
    from tests.helpers import variants

    root = tmp_path_factory.mktemp("controlnets")
    seeds = controlnet_reference["meta"]["controlnets"]
    return {name: variants.write_controlnet(tiny_dir, root / name, seed) for name, seed in seeds.items()}


@pytest.fixture(scope="session")
def ip_adapter_reference(tiny_dir: Path) -> dict[str, Any]:
    """diffusers' SDXL pipeline with an IP-Adapter loaded (make_ip_adapter_reference.py, same weights)."""
    return _fixture(tiny_dir, "ip_adapters.npz")


@pytest.fixture(scope="session")
def tiny_ip_adapter(tiny_dir: Path, ip_adapter_reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """The fixture's random IP-Adapter for the tiny model: its weights file (the image encoder beside it)."""
    from tests.helpers import variants

    folder = tmp_path_factory.mktemp("ip-adapter")
    return variants.write_ip_adapter(tiny_dir, folder, ip_adapter_reference["meta"]["adapter_seed"])


@pytest.fixture(scope="session")
def taesd_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """diffusers' AutoencoderTiny decodes (make_taesd_reference.py), with each case's random TAESD folder written
    again here (variants.write_taesd: the same weights, which the recorded digest checks): case -> its arrays,
    `config` and `folder`."""
    from tests.helpers import variants

    data = np.load(FIXTURES / "taesd.npz")
    meta = json.loads(bytes(data["meta"]).decode())
    root = tmp_path_factory.mktemp("taesd")
    cases = {}
    for name, case in meta["cases"].items():
        folder = variants.write_taesd(root / name, case["seed"], case["config"])
        assert variants.folder_digest(folder) == case["digest"], "taesd.npz was made from other weights: rerun it"
        arrays = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{name}/")}
        cases[name] = arrays | {"config": case["config"], "folder": folder}
    return cases
