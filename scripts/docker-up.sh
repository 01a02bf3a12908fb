#!/usr/bin/env bash
# The whole compose stack with one command on a machine that reaches PyPI and Debian's archive but no container
# registry: Docker and Compose v2 where missing (scripts/docker-setup.sh), the local base image
# (scripts/docker-base.sh; skipped when BASE_IMAGE names another), then `docker compose up --build --wait`
# with the stand-ins of docker-compose.no-registry.yml (COMPOSE_FILE, unless set otherwise).
# Needs SDXL_S3_SECRET_ACCESS_KEY (20+ characters). Extra arguments go to `docker compose up`.
# Stop: `docker compose down --volumes`, then `scripts/docker-setup.sh stop` (stops only a daemon it started).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SDXL_S3_SECRET_ACCESS_KEY:?set SDXL_S3_SECRET_ACCESS_KEY (20+ characters), e.g. \$(openssl rand -hex 20)}"
scripts/docker-setup.sh
[ -n "${BASE_IMAGE:-}" ] || scripts/docker-base.sh sdxl-base:bookworm
export COMPOSE_FILE="${COMPOSE_FILE:-docker-compose.yml:docker-compose.no-registry.yml}"
docker volume create sdxl-compile-cache >/dev/null  # the no-registry file's compile cache, kept across stacks
exec docker compose up --build --wait --detach "$@"
