#!/usr/bin/env bash
# The accelerator benchmark in two steps (docs/benchmarks.md):
#   bench/accelerator.sh prepare     here: download the wheels the GPU machine lacks into .wheels/ (ignored)
#   bench/accelerator.sh run         there (carry .wheels): install them, run bench/accelerator.py into $OUT
# The lent GPU machines have Python 3.12, jax with CUDA, flax and torch, but transformers 5 (no Flax
# classes) and no diffusers, and no network: diffusers 0.39 and transformers 4.57 travel as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    rm -rf .wheels && mkdir -p .wheels
    pip download --quiet --no-deps -d .wheels diffusers==0.39.0 transformers==4.57.1 huggingface_hub==0.36.2
    pip download --quiet --no-deps -d .wheels --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 tokenizers==0.22.2 safetensors==0.8.0
    ls -la .wheels ;;
  run)
    python -m pip install --quiet --no-deps --no-index .wheels/*.whl
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
    python bench/accelerator.py --peak-tflops "${PEAK_TFLOPS:-989}" --out "$OUT/accelerator.json" \
      "${@:2}" 2>&1 | tee "$OUT/accelerator.log" ;;
  *) echo "usage: $0 prepare|run [bench/accelerator.py options]" >&2; exit 2 ;;
esac
