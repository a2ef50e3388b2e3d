#!/usr/bin/env bash
# Builds the serving image (serving/Dockerfile) on this machine: `make image` and the container tests call it.
#   deploy/images/build.sh [--tag NAME] [--local-base] [--ca-certs DIR] [--cpu-torch | --torch-wheel FILE]
#                          [-- DOCKER_BUILD_ARGS...]
#   deploy/images/build.sh --worker [--serve IMAGE] [--tag NAME]
#   --tag NAME          the image's name (default hndsr-serve:latest, with --worker hndsr-worker:latest)
#   --worker            the scale-out image (deploy/images/worker.Dockerfile): the serving image IMAGE (--serve,
#                       default hndsr-serve:latest, built first) plus the training stack; `make worker-image`
#   --local-base        build on deploy/images/base.sh's image (Debian's packages; no container registry needed)
#                       instead of python:3.11-slim-bookworm
#   --ca-certs DIR      trust DIR/*.crt inside the build and the image (networks that intercept TLS)
#   --cpu-torch         torch's CPU build: its wheel from pip's find-links folders (PIP_FIND_LINKS, pip config)
#                       when one is there, else from download.pytorch.org/whl/cpu
#   --torch-wheel FILE  install torch from FILE instead of PyPI's default (the CUDA build)
# The files go through deploy/images/build-extra/ for the build and are removed from it afterwards. It prints
# the build time and the image's size.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=
WORKER=
SERVE=hndsr-serve:latest
BASE=
CERTS=
WHEEL=
CPU_TORCH=
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --local-base) BASE=$(deploy/images/base.sh); shift ;;
    --ca-certs) CERTS=$2; shift 2 ;;
    --torch-wheel) WHEEL=$2; shift 2 ;;
    --cpu-torch) CPU_TORCH=1; shift ;;
    --worker) WORKER=1; shift ;;
    --serve) SERVE=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$WORKER" ]; then
  TAG=${TAG:-hndsr-worker:latest}
  docker image inspect "$SERVE" >/dev/null 2>&1 || {
    echo "error: no image $SERVE to build the worker image on: build the serving image first (make image)" >&2
    exit 2
  }
  echo "building $TAG from deploy/images/worker.Dockerfile on $SERVE" >&2
  start=$(date +%s)
  docker build -f deploy/images/worker.Dockerfile -t "$TAG" --build-arg "SERVE=$SERVE" "$@" . >&2
  echo "built $TAG in $(( $(date +%s) - start )) s, $(( $(docker image inspect --format '{{.Size}}' "$TAG") / 1000000 )) MB" >&2
  exit 0
fi
TAG=${TAG:-hndsr-serve:latest}

if [ -n "$CPU_TORCH" ] && [ -z "$WHEEL" ]; then
  version=$(grep -o '"torch==[^"]*"' pyproject.toml | head -n1 | tr -d '"' | cut -d= -f3)
  links="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
  for dir in $links; do
    for wheel in "${dir#file://}"/torch-"$version"+cpu-cp311-cp311-*linux*_x86_64.whl; do
      [ -f "$wheel" ] && WHEEL=$wheel && break 2
    done
  done
  [ -n "$WHEEL" ] || CPU_SPEC="torch==$version --index-url https://download.pytorch.org/whl/cpu"
fi

EXTRA=deploy/images/build-extra
added=()
cleanup() { for f in "${added[@]}"; do rm -f "$f"; done; }
trap cleanup EXIT
put() {  # a hard link where possible (no copy of a 200 MB wheel), else a copy
  local target="$EXTRA/$(basename "$1")"
  ln -f "$1" "$target" 2>/dev/null || cp -f "$1" "$target"
  added+=("$target")
}
args=()
if [ -n "$BASE" ]; then args+=(--build-arg "BASE=$BASE"); fi
if [ -n "$CERTS" ]; then
  for cert in "$CERTS"/*.crt; do [ -e "$cert" ] && put "$cert"; done
fi
if [ -n "$WHEEL" ]; then
  [ -f "$WHEEL" ] || { echo "error: no torch wheel at $WHEEL" >&2; exit 2; }
  put "$WHEEL"
  args+=(--build-arg "TORCH_SPEC=/tmp/build-extra/$(basename "$WHEEL")")
fi

if [ -n "${CPU_SPEC:-}" ]; then args+=(--build-arg "TORCH_SPEC=$CPU_SPEC"); fi

echo "building $TAG from serving/Dockerfile${BASE:+ on $BASE}${WHEEL:+ with $(basename "$WHEEL")}" >&2
start=$(date +%s)
docker build -f serving/Dockerfile -t "$TAG" "${args[@]}" "$@" . >&2
size=$(docker image inspect --format '{{.Size}}' "$TAG")
echo "built $TAG in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB" >&2
