"""worker/main.py's process set-up, in fresh interpreters (what a process imports is decided once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_engine_imports_neither_pytorch_nor_diffusers_even_where_they_are_installed(tmp_path, tiny_dir):
    # A "torch" and a "diffusers" that fail loudly when imported stand in for installed ones (the test extras
    # do install both). The engine loads the tiny model, tokenizes and generates an image without either:
    # its networks are its own, and transformers gives only the tokenizer.
    site = tmp_path / "site"
    for name in ("torch", "diffusers"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"raise RuntimeError('the worker imported {name}')\n")
    script = (
        "import sys, numpy as np\n"
        "from worker.engine import model\n"
        "from worker.engine.engine import Engine, Row\n"
        f"m = model.load_folder({str(tiny_dir)!r}, model.LoadOptions(np.float32))\n"
        "out = Engine(m, [(64, 64)], batch_rows=1).generate([Row('a cat', steps=1)], 64, 64)\n"
        "assert out.finite == [True]\n"
        "assert not any(k.split('.')[0] in ('torch', 'diffusers') for k in sys.modules if sys.modules[k])\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    # the stand-ins do fail when imported: the test can tell the two apart
    bare = subprocess.run(
        [sys.executable, "-c", "import diffusers"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bare.returncode != 0 and "the worker imported diffusers" in bare.stderr


def test_a_worker_holds_the_models_that_fit_its_memory_and_says_so(tiny_dir, tmp_path, caplog, monkeypatch):
    """SDXL_MODEL_MEMORY_BYTES: the first model fits, the second (the same size) would not: one engine, the second
    refused before its weights are read, and the log names it; a budget nothing fits in stops the start."""
    import numpy as np
    import pytest

    from common.settings import Settings
    from worker.engine import model
    from worker.main import build_engines

    size = model.load_folder(tiny_dir, model.LoadOptions(np.float32)).nbytes
    settings = Settings(
        models="first=tiny,second=tiny",
        model_memory_bytes=int(size * 1.5),
        dtype="float32",
        image_sizes="64x64",
        batch_rows=1,
        compile_cache_dir=str(tmp_path / "cache"),
        weight_cache=False,
    )
    monkeypatch.setenv("SDXL_TINY_DIR", str(tiny_dir))
    with caplog.at_level("WARNING", logger="worker"):
        engines = build_engines(settings)
    assert list(engines) == ["first"]
    assert "not serving model 'second'" in caplog.text and f"take {size} bytes" in caplog.text
    with pytest.raises(SystemExit, match="no model fits"):
        build_engines(settings.model_copy(update={"model_memory_bytes": 10}))


def test_a_worker_without_the_host_memory_for_its_weights_says_so_and_stops(tiny_dir, tmp_path, caplog, monkeypatch):
    """SDXL_HOST_AVAILABLE_BYTES stands for what the kernel says is free: below what reading the weights needs,
    the start stops before anything is read, with the bytes and the dtype in the log and the exit message
    (where the kernel would otherwise kill it mid-read without a word)."""
    import pytest

    from common.settings import Settings
    from worker.main import build_engines

    settings = Settings(
        model="tiny",
        dtype="float32",
        image_sizes="64x64",
        batch_rows=1,
        compile_cache_dir=str(tmp_path / "cache"),
        host_available_bytes=1000,
    )
    monkeypatch.setenv("SDXL_TINY_DIR", str(tiny_dir))
    with (
        caplog.at_level("ERROR", logger="worker"),
        pytest.raises(SystemExit, match=r"needs \d+ bytes .* float32|float32.* needs \d+ bytes"),
    ):
        build_engines(settings)
    assert "1000 bytes" in caplog.text and "float32" in caplog.text
    assert not (tmp_path / "cache" / "weights").exists()  # nothing read, nothing converted


def test_unset_batch_rows_follow_the_platform():
    from worker.main import platform_batch_rows

    gib = 2**30
    assert platform_batch_rows("gpu", 1, 139.8 * gib, 4) == 8  # an H200
    assert platform_batch_rows("gpu", 8, 79.6 * gib, 4) == 64  # eight H100 80 GB: 8 rows each
    assert platform_batch_rows("gpu", 1, 39.4 * gib, 4) == 4  # an A100 40 GB keeps the default
    assert platform_batch_rows("tpu", 4, 16 * gib, 4) == 4
    assert platform_batch_rows("cpu", 1, 0, 4) == 4


def test_a_set_batch_rows_is_kept_and_this_cpu_keeps_the_default():
    from worker.main import batch_rows

    assert batch_rows(Settings(batch_rows=2)) == 2
    assert batch_rows(Settings()) == Settings().batch_rows


def test_a_worker_reads_sdxl_controlnets_for_its_model_and_stops_on_one_that_does_not_fit(tiny_dir, tmp_path):
    import dataclasses

    import numpy as np
    import pytest

    from tests.helpers import variants
    from worker import main
    from worker.engine import model

    folder = variants.write_controlnet(tiny_dir, tmp_path / "edges", 21)
    tiny = model.load_folder(tiny_dir, model.LoadOptions(np.float32), name="tiny")
    (got,) = main._controlnets(Settings(controlnets=f"edges={folder}"), tiny)
    assert got.name == "edges" and got.source == str(folder)
    other = dataclasses.replace(tiny, configs=dataclasses.replace(tiny.configs, unet=tiny.unet.__class__()))  # SDXL's
    with pytest.raises(SystemExit, match=r"SDXL_CONTROLNETS: ControlNet 'edges' .*not an SDXL ControlNet"):
        main._controlnets(Settings(controlnets=f"edges={folder}"), other)


def test_a_worker_reads_sdxl_ip_adapters_for_its_model_and_stops_on_one_that_does_not_fit(tiny_dir, tmp_path):
    import dataclasses

    import numpy as np
    import pytest

    from tests.helpers import variants
    from worker import main
    from worker.engine import model

    weights = variants.write_ip_adapter(tiny_dir, tmp_path / "style", 31)
    tiny = model.load_folder(tiny_dir, model.LoadOptions(np.float32), name="tiny")
    (got,) = main._ip_adapters(Settings(ip_adapters=f"style={weights}"), tiny)
    assert got.name == "style" and got.source == str(weights)
    other = dataclasses.replace(tiny, configs=dataclasses.replace(tiny.configs, unet=tiny.unet.__class__()))  # SDXL's
    with pytest.raises(SystemExit, match=r"SDXL_IP_ADAPTERS: IP-Adapter 'style' .*image_proj.proj"):
        main._ip_adapters(Settings(ip_adapters=f"style={weights}"), other)


def test_a_worker_reads_sdxl_preview_decoder_once_and_stops_on_a_folder_that_is_not_a_taesd(tmp_path):
    import pytest

    from tests.helpers import variants
    from worker import main

    assert main._preview_decoder(Settings()) is None  # unset: the fixed map
    folder = variants.write_taesd(tmp_path / "taesdxl", 31, {})
    got = main._preview_decoder(Settings(preview_decoder=str(folder)))
    assert got.source == str(folder) and got.config.scale_factor == 8
    with pytest.raises(SystemExit, match=r"SDXL_PREVIEW_DECODER: .*not a diffusers AutoencoderTiny folder"):
        main._preview_decoder(Settings(preview_decoder=str(tmp_path)))
