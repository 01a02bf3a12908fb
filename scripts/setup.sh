#!/usr/bin/env bash
# Create .venv and install the project into it (again only when pyproject.toml changed).
# Usage: scripts/setup.sh [EXTRA]   EXTRA: worker (default), dev (tests), tpu, cuda
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-worker}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"' \
  || { echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$extra-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extra]"
  touch "$stamp"
fi
