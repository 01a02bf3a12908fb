#!/usr/bin/env bash
# Docker for docker-compose.no-registry.yml on a Debian machine, installed and started only where missing:
# - the daemon: Debian's docker.io, started with no bridge network and no iptables rules (every container on
#   the host's network, as the no-registry file has them) when no daemon answers;
# - Compose v2: bookworm carries only Compose 1.29, which refuses docker-compose.yml's top-level `name`. The CLI
#   plugin (a static binary) is taken from trixie's docker-compose package, fetched with apt from a source list
#   of its own: nothing is added to the machine's sources, no trixie package is installed.
# Usage: scripts/docker-setup.sh        prints "started dockerd" when it started one
#        scripts/docker-setup.sh stop   stops the daemon this script started (and nothing else)
set -euo pipefail
state=/run/sdxl-docker
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
plugins=/usr/local/lib/docker/cli-plugins
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

if [ "${1:-}" = stop ]; then
  pid="$(cat "$state/dockerd.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && $sudo kill -0 "$pid" 2>/dev/null; then
    $sudo kill -TERM "$pid"
    for _ in $(seq 60); do $sudo kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  $sudo rm -f "$state/dockerd.pid"
  exit 0
fi

apt_install() {
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null \
    || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends "$@" >/dev/null; }
}

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null; then
    echo "installing docker.io (Debian's package)" >&2
    apt_install docker.io
  fi
  $sudo mkdir -p "$state"
  # setsid: the daemon outlives this script and the process group that ran it
  $sudo sh -c "setsid dockerd --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    --pidfile $state/dockerd.pid > $state/dockerd.log 2>&1 < /dev/null &"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not answer; see $state/dockerd.log" >&2; exit 1; }
  echo "started dockerd"
fi

if ! docker compose version 2>/dev/null | grep -q 'version v\?2\.'; then
  echo "installing Compose v2 as a Docker CLI plugin (from trixie's docker-compose package)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  chmod 755 "$tmp"  # apt's downloads run as the _apt user
  mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$tmp/sources.list"
  own_lists=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache::Archives=$tmp/archives"
    -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
  apt-get "${own_lists[@]}" update -qq
  (cd "$tmp" && apt-get "${own_lists[@]}" download docker-compose >/dev/null 2>&1)
  dpkg-deb -x "$tmp"/docker-compose_*.deb "$tmp/root"
  $sudo install -D -m 755 "$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" "$plugins/docker-compose"
  docker compose version >&2
fi
