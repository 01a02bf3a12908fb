"""worker/main.py's process set-up, in fresh interpreters (what a process imports is decided once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_worker_never_imports_pytorch_even_where_it_is_installed(tmp_path):
    # A "torch" that fails loudly when imported stands in for an installed one: diffusers try-imports torch
    # at its own import whenever it can be found, which costs seconds of every start with a real CUDA build.
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('the worker imported torch')\n")
    script = (
        "import sys, worker.main, worker.engine.engine, worker.engine.model, diffusers\n"
        "from transformers.utils import is_torch_available\n"
        "assert sys.modules['torch'] is None and not is_torch_available() and not diffusers.is_torch_available()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    # the same imports without worker.main do reach the stand-in: the test can tell the two apart
    bare = subprocess.run([sys.executable, "-c", "import worker.engine.engine"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert bare.returncode != 0 and "the worker imported torch" in bare.stderr
