#!/usr/bin/env bash
# One command: set up, start Redis (an embedded one if none answers), the API and one worker with the tiny
# model and local-folder storage, submit a sample job, wait, and print where the images are.
# Options go to scripts/demo.py (--once to stop after the sample job; --help for the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh worker
exec .venv/bin/python -m scripts.demo "$@"
