"""Several devices, the persistent compile cache and the worker's own engine start: each needs a fresh JAX
process (XLA_FLAGS and the cache directory are read once at start), so these run the engine in subprocesses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worker.engine.program_kind import Programs

# what a served engine without refiner or adapters compiles per size at start (the starting noise included)
SERVED = len(Programs.SERVED.kinds())

SCRIPT = """
import json, sys, numpy as np
from worker.engine import cache, compile_log, model, weight_cache
from worker.engine.engine import Engine, Programs, Row
args = json.loads(sys.argv[1])
aot = converted = None
if args.get("cache"):
    folder = cache.enable(args["cache"])
    aot, converted = folder / "executables", folder / "weights"
counter = compile_log.install()
import jax
m = model.load_folder(args["tiny"], model.LoadOptions(np.float32, weight_cache_dir=converted))
engine = Engine(m, [(64, 64)], batch_rows=4, aot_dir=aot)
engine.compile(Programs(args["programs"]))
rows = [Row("a cat", seed=1, steps=3), Row("a dog", "grass", seed=2, steps=4, scheduler="ddim"),
        Row("a cow", seed=3, steps=2, guidance_scale=9.0)]
out = engine.generate(rows, 64, 64)
np.save(args["out"], out.images)
weight_cache.flush()
print(json.dumps({"devices": jax.device_count(), "compiles": counter.compiles, "cache_hits": counter.cache_hits,
                  "requests": counter.requests, "aot_loaded": engine.aot_loaded, "weights": m.weight_sources}))
"""


# The engine as `python -m worker` builds it (worker.main.build_engine), on the same rows as SCRIPT.
WORKER_SCRIPT = """
import json, sys, jax, numpy as np
from common.settings import Settings
from worker.engine.engine import Engine, EngineInputError, Row
from worker.main import build_engine
args = json.loads(sys.argv[1])
engine = build_engine(Settings(model=args["tiny"], image_sizes="64x64", batch_rows=4, compile_cache_dir=args["cache"]))
leaves = jax.tree_util.tree_leaves(engine.model.params)
rows = [Row("a cat", seed=1, steps=3), Row("a dog", "grass", seed=2, steps=4, scheduler="ddim"),
        Row("a cow", seed=3, steps=2, guidance_scale=9.0)]
np.save(args["out"], engine.generate(rows, 64, 64).images)
try:
    Engine(engine.model, [(64, 64)], batch_rows=4)
    refused = ""
except EngineInputError as exc:
    refused = str(exc)
print(json.dumps({"leaves": len(leaves), "host_arrays": sum(not isinstance(x, jax.ShapeDtypeStruct) for x in leaves),
                  "refused": refused, "aot_loaded": engine.aot_loaded}))
"""


def _run(
    tmp_path: Path,
    tiny_dir: Path,
    devices: int,
    name: str,
    cache: Path | None = None,
    script: str = SCRIPT,
    programs: Programs = Programs.SERVED,
) -> tuple[dict, np.ndarray]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = tmp_path / f"{name}.npy"
    args = {"tiny": str(tiny_dir), "out": str(out), "cache": str(cache) if cache else None, "programs": programs.value}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def test_four_devices_give_the_same_images_as_one(tmp_path, tiny_dir):
    rows_run = Programs.guided | Programs.uint8  # what the script's rows run: compiled alone, the rest is not used
    one, img1 = _run(tmp_path, tiny_dir, 1, "one", programs=rows_run)
    four, img4 = _run(tmp_path, tiny_dir, 4, "four", programs=rows_run)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert img1.shape == img4.shape == (3, 64, 64, 3)
    assert np.abs(img1.astype(int) - img4.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> tuple[dict, np.ndarray, Path]:
    """One cold start into an empty cache, shared: (what it reported, its images, the cache it wrote). The tests
    that need a filled cache copy it (a cold compile of the served programs is most of each test's time)."""
    folder = tmp_path_factory.mktemp("devices-cold")
    report, images = _run(folder, tiny_dir, 1, "cold", folder / "cache")
    return report, images, folder / "cache"


def _copy(cold_cache: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(cold_cache, cache)
    return cache


def test_warm_cache_skips_the_xla_compile(tmp_path, tiny_dir, cold):
    cold, img_cold, cold_cache = cold
    assert cold["cache_hits"] == 0 and cold["compiles"] > 0
    assert any(cold_cache.rglob("*")), "nothing was written to the cache"
    assert cold["aot_loaded"] == 0 and list((cold_cache).rglob("executables/*.bin"))
    cache = _copy(cold_cache, tmp_path)
    warm, img_warm = _run(tmp_path, tiny_dir, 1, "warm", cache)
    # Both programs come back whole (no tracing, no compiling); anything small left hits JAX's cache. The
    # weights are mapped from the converted copy the cold start wrote, not converted again.
    assert set(cold["weights"].values()) == {"checkpoint"}
    assert set(warm["weights"].values()) == {"converted cache"} and len(warm["weights"]) == 4
    assert warm["aot_loaded"] == SERVED  # every served part, the noise included
    assert warm["compiles"] == 0 and warm["requests"] < cold["requests"]
    np.testing.assert_array_equal(img_cold, img_warm)


class _Planted:
    """A pickle that, once unpickled, touches a file: what a writer of a shared cache could plant."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_or_foreign_executable_is_never_unpickled(tmp_path, tiny_dir, cold):
    import pickle

    from worker.engine import cache as aot_cache

    cache = _copy(cold[2], tmp_path)  # as a first start left it
    marker = tmp_path / "pwned"
    planted = pickle.dumps(_Planted(str(marker)))
    files = list(cache.rglob("executables/*.bin"))
    assert files
    for i, path in enumerate(files):  # one unsealed, the others sealed with a key this deployment lacks
        path.write_bytes(planted if i == 0 else aot_cache.seal(planted, b"someone-else's-key-0123"))
    again, _ = _run(tmp_path, tiny_dir, 1, "again", cache)
    assert again["aot_loaded"] == 0 and not marker.exists()
    assert not any(p.exists() for p in files)  # refused files are deleted, not checked at every start
    # JAX's cache answered those compiles: its executables do not serialize whole, so none was written.
    # Without it, the next start compiles for real and writes sealed files, which the one after loads.
    for entry in cache.rglob("*"):
        if entry.is_file() and entry.parent.name not in ("executables", "weights", "shapes"):
            entry.unlink()
    third, _ = _run(tmp_path, tiny_dir, 1, "third", cache)
    assert third["aot_loaded"] == 0 and third["cache_hits"] == 0
    assert all(aot_cache.unseal(p.read_bytes(), aot_cache.signing_key()) for p in files)
    fourth, _ = _run(tmp_path, tiny_dir, 1, "fourth", cache)
    assert fourth["aot_loaded"] == SERVED


def test_seals_detect_any_change():
    from worker.engine.cache import seal, unseal

    sealed = seal(b"payload", b"k" * 32)
    assert unseal(sealed, b"k" * 32) == b"payload"
    assert unseal(sealed, b"j" * 32) is None
    assert unseal(sealed[:-1] + b"X", b"k" * 32) is None
    assert unseal(b"payload", b"k" * 32) is None


def test_the_worker_serves_from_the_devices_copy_alone(tmp_path, tiny_dir, cold):
    # Once placed, the worker drops its host copy of the weights (6.7 GB for SDXL on an accelerator host);
    # its images are still those of an engine that kept them, and the model cannot make a second engine.
    _, kept, cold_cache = cold
    cache = _copy(cold_cache, tmp_path)
    worker, dropped = _run(tmp_path, tiny_dir, 1, "dropped", cache, script=WORKER_SCRIPT)
    assert worker["leaves"] > 100 and worker["host_arrays"] == 0
    assert "host weights were dropped" in worker["refused"]
    # the same executables: the dtype names them, however it was spelled (np.float32 there, jnp.float32 here)
    assert worker["aot_loaded"] == SERVED
    np.testing.assert_array_equal(kept, dropped)
