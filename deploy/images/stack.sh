#!/usr/bin/env bash
# The tracking stack (mlflow/docker-compose.yml) with its registry images swapped for local builds
# (mlflow/docker-compose.local.yml), for machines that reach a Debian mirror and PyPI but no container registry:
#   deploy/images/stack.sh up -d postgres minio minio-init mlflow    builds what is missing, then compose up
#   deploy/images/stack.sh --profile monitoring up -d                 the whole stack, Prometheus included
#   deploy/images/stack.sh down -v                                    everything, volumes too
#   deploy/images/stack.sh --images                                   only build what is missing (e.g. ahead of time)
# Any compose arguments pass through, to `docker compose` (v2) or else `docker-compose` (v1). Before `up` it
# builds the local base (deploy/images/base.sh), the serving image as `make image` does when HNDSR_SERVE_IMAGE
# (default hndsr-serve:latest) is missing, and the local images, trusting HNDSR_CA_CERTS/*.crt (default
# /usr/local/share/ca-certificates, this machine's extra CA certificates) for pip inside the builds.
set -euo pipefail
cd "$(dirname "$0")/../.."

HNDSR_LOCAL_BASE=$(deploy/images/base.sh)
export HNDSR_LOCAL_BASE
export HNDSR_SERVE_IMAGE=${HNDSR_SERVE_IMAGE:-hndsr-serve:latest}
CERTS=${HNDSR_CA_CERTS:-/usr/local/share/ca-certificates}
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
files=(-f mlflow/docker-compose.yml -f mlflow/docker-compose.local.yml)

build_images() {
  if ! docker image inspect "$HNDSR_SERVE_IMAGE" >/dev/null 2>&1; then
    deploy/images/build.sh --tag "$HNDSR_SERVE_IMAGE" --local-base --cpu-torch --ca-certs "$CERTS"
  fi
  added=()
  trap 'rm -f "${added[@]}"' EXIT
  for cert in "$CERTS"/*.crt; do
    [ -e "$cert" ] || continue
    cp -f "$cert" deploy/images/build-extra/ && added+=("deploy/images/build-extra/$(basename "$cert")")
  done
  echo "building the local images (cached after the first time)" >&2
  "${compose[@]}" "${files[@]}" --profile monitoring build -q postgres minio mlflow prometheus >&2
}

if [ "${1:-}" = "--images" ]; then build_images; exit 0; fi
if [[ " $* " == *" up "* ]]; then build_images; fi
"${compose[@]}" "${files[@]}" "$@"
