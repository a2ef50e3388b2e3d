# Two commands do everything on a fresh machine with Python 3.11+ and git:
#   make repro   set up .venv and run the pipeline (dvc repro) on the default data
#   make test    set up .venv and run the tests
# Set-up installs the lock file requirements/dev.txt (every package pinned, hash-checked), then torch, then the
# project; it runs only when pyproject.toml or the lock changed since the last install, so re-running is cheap.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/dev.txt
# torch is pinned to one version (pyproject.toml) and installed on its own so its build can be chosen, e.g. the
# CPU-only wheels:   make repro TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
# The installers themselves: pip (installs the lock) and uv (resolves it, `make lock`).
PIP_SPEC := pip==26.3
UV_SPEC := uv==0.13.9
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Stage commands call `hndsr` and `dvc` from the venv.
RUN := PATH="$(BIN):$$PATH"

.PHONY: setup repro test tools image worker-image lint status ui clean help lock lock-check gpu-check gpu-kit docs docs-serve

help:
	@echo "make repro   set up .venv and run the pipeline (dvc repro) on the default data"
	@echo "make test    set up .venv and run the tests"
	@echo "make image   build the serving image hndsr-serve:latest on this machine (docs/how-to/container.md)"
	@echo "make worker-image   the scale-out image hndsr-worker:latest: sweep, Dask and torchrun nodes in containers"
	@echo "make gpu-check  the GPU path measured on this machine's GPU: CUDA tests, training, latency, agreement,"
	@echo "             HTTP (benchmarks/gpu_check.py; GPU_CHECK_ARGS=--dry-run runs it on the CPU at toy sizes)"
	@echo "make gpu-kit    pack wheels, data and models for a GPU machine without the project's stack (.gpu/)"
	@echo "make docs    build the documentation site into site/ (mkdocs build --strict); make docs-serve serves it"
	@echo "make lint    ruff over the code"
	@echo "make lock    re-resolve the lock files (requirements/*.txt) after changing pyproject.toml"
	@echo "             (make lock LOCK_ARGS=--upgrade moves every package to its newest allowed version)"
	@echo "make lock-check  fail if the lock files do not match pyproject.toml (CI runs it)"
	@echo "make status  what dvc would re-run, and the current metrics"
	@echo "make ui      the MLflow UI on mlflow.db at http://127.0.0.1:5000 (MLFLOW_PORT=... to change)"
	@echo "make clean   remove .venv and pipeline outputs (data/, models/)"

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -n "$(PYTHON)" || { echo "error: Python 3.11+ not found; install it or pass PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is older than 3.11; pass PYTHON=/path/to/python3.11"; exit 1; }
	@echo "setting up $(VENV) with $(PYTHON) from the lock file $(LOCK) and $(TORCH_SPEC); this takes a few minutes once"
	$(PYTHON) -m venv --clear $(VENV)  # exactly the lock: nothing left from an earlier install
	$(PIP) install $(PIP_SPEC)
	$(PIP) install --require-hashes --no-deps -r $(LOCK)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@echo "installed from $(LOCK): $$(grep -c '^[a-zA-Z0-9]' $(LOCK)) locked packages + $$($(BIN)/python -c 'import torch; print("torch", torch.__version__)')"
	@touch $@

# Only a venv with uv: `make lock` must work while the lock is stale (set-up would refuse it then).
$(BIN)/uv:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(UV_SPEC)

LOCK_ARGS ?=
lock: $(BIN)/uv
	$(BIN)/python requirements/lock.py $(LOCK_ARGS)

lock-check: $(BIN)/uv
	$(BIN)/python requirements/lock.py --check

repro: $(STAMP)
	$(RUN) dvc repro

# Tools the tests call that are not Python packages: promtool (Debian's prometheus package) for the monitoring
# kit's rule tests, kubectl (its kustomize builds the Kubernetes manifests; Debian's kubernetes-client if none is
# installed), Chromium and ChromeDriver (the web page's test), and a Docker engine with debootstrap and a compose
# client (the container, stack and workflow tests: Debian's docker.io, debootstrap, docker-compose; dockerd is
# started when none answers). Installed with apt-get (as root, or through sudo) when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
tools:
	@command -v promtool >/dev/null || { echo "installing promtool (Debian package prometheus) for tests/deploy"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }
	@command -v promtool >/dev/null || { echo "error: promtool could not be installed (apt-get install prometheus)"; exit 1; }
	@command -v kubectl >/dev/null || { echo "installing kubectl (Debian package kubernetes-client) for tests/deploy"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null; }; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { echo "installing chromium and chromedriver for the page test"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; }
	@for tool in docker:docker.io dockerd:docker.io debootstrap:debootstrap; do command -v $${tool%%:*} >/dev/null && continue; \
	  [ $${tool%%:*} = dockerd ] && docker info >/dev/null 2>&1 && continue; \
	  echo "installing $${tool#*:} for the container tests"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $${tool#*:} >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends $${tool#*:} >/dev/null; }; done
	@{ docker compose version || command -v docker-compose; } >/dev/null 2>&1 || { echo "installing docker-compose"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends docker-compose >/dev/null; }; }
	@docker info >/dev/null 2>&1 || { echo "starting dockerd (log: /var/log/hndsr-dockerd.log)"; \
	  $(SUDO) sh -c 'nohup dockerd >/var/log/hndsr-dockerd.log 2>&1 &'; \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done; \
	  docker info >/dev/null 2>&1 || { echo "error: dockerd did not start; see /var/log/hndsr-dockerd.log"; exit 1; }; }

# The serving image, built here as the tests build it: on a base made from Debian's packages (no container
# registry needed), trusting this machine's extra CA certificates, with torch's CPU build unless this machine has
# an NVIDIA GPU (then PyPI's default, the CUDA build). IMAGE_BASE=python:3.11-slim-bookworm builds on the registry's.
IMAGE_TAG ?= hndsr-serve:latest
IMAGE_BASE ?= local
IMAGE_CA_CERTS ?= /usr/local/share/ca-certificates
IMAGE_TORCH ?= $(if $(shell command -v nvidia-smi),cuda,cpu)
image: tools
	deploy/images/build.sh --tag $(IMAGE_TAG) --ca-certs $(IMAGE_CA_CERTS) $(if $(filter cpu,$(IMAGE_TORCH)),--cpu-torch) \
	  $(if $(filter local,$(IMAGE_BASE)),--local-base,-- --build-arg BASE=$(IMAGE_BASE))

# The scale-out image (deploy/images/worker.Dockerfile): the serving image plus the training stack, for sweep
# workers, Dask workers and torchrun nodes in containers (docs/how-to/scaling-out.md).
WORKER_TAG ?= hndsr-worker:latest
worker-image: image
	deploy/images/build.sh --worker --serve $(IMAGE_TAG) --tag $(WORKER_TAG)

test: $(STAMP) tools
	$(RUN) pytest

# The GPU check (docs/how-to/gpu-check.md): one run, one JSON report under reports/gpu/. Needs `make repro`'s models/ and
# data/processed/ (or GPU_CHECK_ARGS="--models DIR --data DIR").
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(RUN) python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

gpu-kit: $(STAMP)
	$(RUN) python benchmarks/gpu_kit.py

lint: $(STAMP)
	$(RUN) ruff check .

status: $(STAMP)
	$(RUN) dvc status
	$(RUN) dvc metrics show

MLFLOW_PORT ?= 5000
ui: $(STAMP)
	$(RUN) mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) data/processed models site

# The documentation site (docs/, mkdocs.yml): strict, so a broken link or anchor fails the build; the reference pages
# are written from the code at every build (docs/gen_reference.py). SITE_DIR: where the HTML goes.
SITE_DIR ?= site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(RUN) mkdocs build --strict --site-dir $(SITE_DIR)

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(RUN) mkdocs serve --strict --dev-addr 127.0.0.1:8001
