"""Fixtures shared by the whole suite: the tiny model folder (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as PyTorch-layout safetensors, where worker subprocesses find it too."""
    from worker.engine import tiny

    folder = tmp_path_factory.getbasetemp() / "tiny"
    tiny.ensure(folder)
    os.environ["SDXL_TINY_DIR"] = str(folder)
    return folder
