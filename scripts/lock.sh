#!/usr/bin/env bash
# Remake constraints.txt from the test environment (.venv, the dev extra: a superset of every other extra
# but tpu/cuda's platform wheels), after a dependency change has passed the tests. setup.sh, CI and the
# Dockerfiles install with -c constraints.txt, so they get exactly these versions.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Made by scripts/lock.sh from the environment the tests last passed in; do not edit by hand."
  # A package installed from a local wheel freezes as "name @ file:///..."; a fresh machine has no such file,
  # so pin it by version from the registry instead.
  .venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+cpu$//' \
    | sed -E 's|^([A-Za-z0-9_.-]+) @ file://.*/[A-Za-z0-9_.]+-([0-9][^-]*)-.*\.whl.*$|\1==\2|' | sort -f
} > constraints.txt
if grep -q ' @ ' constraints.txt; then
  echo "constraints.txt names a package by URL; pin it by version:" >&2
  grep ' @ ' constraints.txt >&2
  exit 1
fi
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
