#!/usr/bin/env bash
# One command: set up (with the test extras), lint, and run the tests. Extra arguments go to pytest.
#   scripts/test.sh              the whole suite (the README's test command; CI runs it through .ci/run)
#   scripts/test.sh fast         the fast tier: nothing that compiles, starts a service process, drives a browser
#                                or is slow on purpose (tests/conftest.py says what falls where); about a minute
#   scripts/test.sh fast -k jobs  either, with more pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
# SDXL_TEST_WORKERS pytest-xdist workers (default 3 on 2 cores; 0: all in this process; 16 min 59 s of pytest on a fresh clone there). A module's tests stay on one
# worker (its stack or engine starts once), and the slow tests, which mostly wait, run beside the compiling ones
# (tests/conftest.py, _order_for_workers): with a third worker the two cores stay busy while one waits. The fast tier runs in one process: workers' start-up costs more there
# than they win (measured: 55 s alone, 74 s on 2 workers).
workers="${SDXL_TEST_WORKERS:-3}"
tier=()
parallel=()
if [ "${1:-}" = fast ]; then
  shift
  tier=(-m "not engine and not stack and not browser and not slow")
elif [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadscope --no-loadscope-reorder)
fi
scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "${parallel[@]}" "${tier[@]}" "$@"
