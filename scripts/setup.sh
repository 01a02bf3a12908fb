#!/usr/bin/env bash
# Create .venv and install the project into it (again only when pyproject.toml changed).
# Usage: scripts/setup.sh [EXTRA]   EXTRA: worker (default), dev (tests), tpu, cuda, or reference: the seed's
# diffusers 0.39 Flax pipeline in its own environment, .venv-reference (bench/engine.py compares against it)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-worker}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"' \
  || { echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
venv=.venv
[ "$extra" = reference ] && venv=.venv-reference
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.installed-$extra-$(sha256sum pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  if [ "$extra" = reference ]; then
    # the old transformers and diffusers this extra pins are not in constraints.txt (made from .venv)
    "$venv/bin/python" -m pip install --quiet -e ".[$extra]"
  else
    # constraints.txt: the versions CI and the Dockerfiles were last tested with (scripts/lock.sh remakes it)
    "$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[$extra]"
  fi
  touch "$stamp"
fi
if [ "$extra" = dev ] && ! command -v "${SDXL_CHROMIUM:-chromium}" >/dev/null; then
  # The playground's browser tests drive Debian's chromium with Playwright (Playwright's own browser download
  # is not used). SDXL_CHROMIUM: another Chromium or Chrome executable.
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing chromium (Debian package) for the browser tests" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
      || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y --no-install-recommends chromium >/dev/null; }
  else
    echo "the browser tests need Chromium: install it, or set SDXL_CHROMIUM to its executable" >&2
    exit 1
  fi
fi
