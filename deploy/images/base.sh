#!/usr/bin/env bash
# A local equivalent of python:3.11-slim-bookworm, made from Debian's packages, for machines that reach a
# Debian mirror and PyPI but no container registry (the images' tests and `make image` use it):
#   deploy/images/base.sh            prints the image name, hndsr-base:<content hash>, building it when missing
# Debian bookworm (minbase) + python3 (3.11, the Python of the lock files), python3-venv, ca-certificates and
# passwd (useradd): the image has `python3` and what the Dockerfiles need, nothing else. The tag is a hash of this
# script, the suite and the mirror, so a second call reuses the image (seconds) and a change here makes a new one.
# Environment: DEBIAN_MIRROR (default: the Debian mirror apt on this machine uses, else deb.debian.org),
# BASE_SUITE (default bookworm). Needs root (or sudo) for debootstrap, and a running Docker engine.
set -euo pipefail

SUITE=${BASE_SUITE:-bookworm}
PACKAGES=python3,python3-venv,ca-certificates,passwd

mirror_from_apt() {
  # The first Debian archive (not -security) that apt's sources name, in either format.
  grep -rhoE 'https?://[^ ]*debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -v security | head -n1 | tr -d ' ' || true
}
MIRROR=${DEBIAN_MIRROR:-$(mirror_from_apt)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

HASH=$( { cat "$0"; echo "$SUITE $MIRROR $PACKAGES"; } | sha256sum | cut -c1-12)
NAME=hndsr-base:$HASH
if docker image inspect "$NAME" >/dev/null 2>&1; then
  echo "$NAME"
  exit 0
fi

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap, or make tools)" >&2; exit 1; }
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/hndsr-base.XXXXXX")
trap '$SUDO rm -rf "$ROOT"' EXIT
echo "building $NAME: debootstrap --variant=minbase $SUITE from $MIRROR with $PACKAGES (about a minute, once)" >&2
start=$(date +%s)
$SUDO debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || {
  echo "error: debootstrap failed; its last lines:" >&2; tail -n 20 "$ROOT.log" >&2; rm -f "$ROOT.log"; exit 1; }
rm -f "$ROOT.log"
# What an image needs and a root file system lacks: no package caches, no host names of the build machine.
$SUDO rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/etc/hostname
$SUDO tar -C "$ROOT" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR" - "$NAME" >/dev/null
echo "built $NAME in $(( $(date +%s) - start )) s" >&2
echo "$NAME"
