#!/usr/bin/env bash
# Remake constraints.txt from the test environment (.venv, the dev extra: a superset of every other extra
# but tpu/cuda's platform wheels), after a dependency change has passed the tests. setup.sh, CI and the
# Dockerfiles install with -c constraints.txt, so they get exactly these versions.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Made by scripts/lock.sh from the environment the tests last passed in; do not edit by hand."
  .venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+cpu$//' | sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
