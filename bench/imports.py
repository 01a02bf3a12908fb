"""Import time of the worker's engine where PyTorch is installed: as the worker imports it (worker/main.py marks
torch absent) against letting diffusers and transformers import torch, in alternating fresh processes.

    pip install torch            # into the environment measured (a CUDA build, as on most GPU hosts)
    python bench/imports.py --rounds 7 --json bench/results/imports-cpu-torch.json

Method (docs/benchmarks.md): each round starts one fresh interpreter per arm, the arms' order alternating
round to round. Each child times, from its first line, `import worker.main` (which holds the mark) and then
the engine's modules (worker.engine.engine, worker.engine.model: jax, flax, diffusers, transformers); in the
"torch imported" arm the mark is taken back between the two, so both arms import the same modules but torch.
The parent also times each child's whole life (interpreter start to exit). Medians, and their difference.
Without a torch in the environment the two arms are the same, and the script says so.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

CHILD = """
import time
t0 = time.perf_counter()
import json, sys
import worker.main
if sys.argv[1] == "torch imported":
    del sys.modules["torch"]  # what a process without worker.main's mark does
import worker.engine.engine, worker.engine.model
print(json.dumps({"import_s": time.perf_counter() - t0, "torch": sys.modules.get("torch") is not None}))
"""

ARMS = ("as the worker (torch marked absent)", "torch imported")


def run(arm: str) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, arm], cwd=ROOT, capture_output=True, text=True, check=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    want = arm == "torch imported"
    assert found["torch"] == want, f"{arm}: torch imported = {found['torch']}"
    return {"import_s": found["import_s"], "process_s": time.perf_counter() - t0}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    if importlib.util.find_spec("torch") is None:
        sys.exit("no torch in this environment: both arms would be the same (pip install torch to measure)")
    result_file = harness.start("imports", args, __doc__)  # torch's version from its metadata, not imported

    run(ARMS[0])  # untimed: the first start pays for reading everything off the disk
    samples: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for i in range(args.rounds):
        for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
            samples[arm].append(run(arm))
    result: dict[str, object] = {}
    for arm in ARMS:
        for measure in ("import_s", "process_s"):
            timing = harness.Timing.of([s[measure] for s in samples[arm]])
            result[f"{arm}: {measure} median"] = round(timing.median_s, 3)
            result[f"{arm}: {measure} p10, p90"] = [round(timing.p10_s, 3), round(timing.p90_s, 3)]
    for measure in ("import_s", "process_s"):
        saved = result[f"{ARMS[1]}: {measure} median"] - result[f"{ARMS[0]}: {measure} median"]  # type: ignore[operator]
        result[f"saved per start: {measure}"] = round(saved, 3)
    result["samples"] = samples
    for k, v in result.items():
        if k != "samples":
            print(f"{k:55s} {v}")
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
