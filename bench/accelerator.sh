#!/usr/bin/env bash
# The accelerator run (docs/benchmarks.md has the exact device command), at most TOTAL_S = 420 s:
#   bench/accelerator.sh prepare     here: the wheels the GPU machine lacks into .wheels/ (ignored), the commit,
#                                    and the FLOP file if the run's is missing (bench/results/accelerator-flops-*)
#   bench/accelerator.sh run         there, carrying .wheels: install them (20 s at most), then
#                                    bench/accelerator.py with what is left, writing $OUT/results.json
#   bench/accelerator.sh --dry-run   here: the same script on the CPU at the tiny size (tests/bench/)
# The GPU machines have Python 3.12, jax with CUDA, flax, torch and transformers 5 (no Flax classes), no diffusers
# and no network: diffusers 0.39 and transformers 4.57 (the seed's path needs their Flax classes) travel as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL_S=420 # bench/accelerator.py's BUDGET_S adds up to this
python="${PYTHON:-python3}"
case "${1:-}" in
  prepare)
    rm -rf .wheels && mkdir -p .wheels
    python3 -m pip download --quiet --no-deps -d .wheels diffusers==0.39.0 transformers==4.57.1 huggingface_hub==0.36.2
    python3 -m pip download --quiet --no-deps -d .wheels --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 tokenizers==0.22.2 safetensors==0.8.0
    # the device gets the working tree without .git: the commit it was prepared from travels with the wheels, and
    # bench/harness.py's Environment reads it there (its dirty flag as the harness' own: tracked files only)
    "$python" -c 'from bench import harness; print(harness.save_provenance())'
    flops=bench/results/accelerator-flops-sdxl-1024.json
    [[ -f $flops ]] || "$python" bench/accelerator.py count --out "$flops"
    ls -la .wheels; du -sh .wheels ;;
  run)
    # Beside the machine's own packages and first on the path (its transformers 5 has no Flax classes).
    timeout 20 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .wheels/*.whl || echo "wheels: install failed or cut at 20 s; parts e and f may skip"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    out="${OUT:-bench/results/accelerator}"
    mkdir -p "$out"
    left=$((TOTAL_S - SECONDS - 5)) # 5 s for the kill's grace
    timeout -k 5 "$left" python3 bench/accelerator.py --out "$out/results.json" --budget-s "$left" "${@:2}" ;;
  --dry-run)
    out="${OUT:-$(mktemp -d)}"
    mkdir -p "$out"
    # CPU only; XLA:CPU's backend optimisations off: the programs compile several times faster, which is all a
    # dry run needs of them (its figures are not measurements)
    export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    "$python" bench/accelerator.py --dry-run --out "$out/results.json" --budget-s "${DRY_RUN_BUDGET_S:-900}" "${@:2}" ;;
  *) echo "usage: $0 prepare|run|--dry-run" >&2; exit 2 ;;
esac
