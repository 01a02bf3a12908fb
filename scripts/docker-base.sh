#!/usr/bin/env bash
# A local stand-in for the official python:3.11-slim-bookworm image, made from Debian's packages, for machines
# that reach Debian's archive but no container registry. debootstrap makes a minimal bookworm with Python 3.11;
# a venv in /usr/local/python, first on PATH, gives the `python` and `pip` the official image has. The result
# is imported as a local image (default sdxl-base:bookworm); the Dockerfiles take it as BASE_IMAGE.
# Usage: scripts/docker-base.sh [TAG]    (does nothing when TAG already exists; needs a Docker daemon)
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"  # debootstrap and chroot need root
tag="${1:-sdxl-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
docker info >/dev/null 2>&1 || { echo "no Docker daemon answers (scripts/docker-setup.sh starts one)" >&2; exit 1; }
if docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  apt-get install -y --no-install-recommends debootstrap >/dev/null \
    || { apt-get update -qq && apt-get install -y --no-install-recommends debootstrap >/dev/null; }
fi
root="$(mktemp -d /tmp/sdxl-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root" >&2
# minbase: essential packages and apt only (no init, no man pages' tools); python3.11 is bookworm's python3
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" \
  > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# Like the official slim images: no documentation, no apt lists or package cache left in the image.
cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
echo 'APT::Install-Recommends "false";' > "$root/etc/apt/apt.conf.d/docker-no-recommends"
# The host's own certificate authorities (a TLS-inspecting proxy's, say) are trusted inside too, by apt and pip,
# so that the images build wherever the host itself reaches PyPI.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
in_root() { env -i PATH=/usr/local/python/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 chroot "$root" "$@"; }
in_root python3 -m venv /usr/local/python
in_root pip install --quiet --no-cache-dir --disable-pip-version-check --upgrade pip
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap bookworm, python3.11 venv in /usr/local/python (scripts/docker-base.sh)" \
  - "$tag" >/dev/null
echo "made $tag" >&2
