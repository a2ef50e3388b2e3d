# Two commands do everything on a fresh machine with Python 3.11+ and git:
#   make repro   set up .venv and run the pipeline (dvc repro) on the default data
#   make test    set up .venv and run the tests
# Set-up runs only when pyproject.toml changed since the last install, so re-running is cheap.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first and on its own so a build can be chosen, e.g. CPU-only wheels:
#   make repro TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Stage commands call `hndsr` and `dvc` from the venv.
RUN := PATH="$(BIN):$$PATH"

.PHONY: setup repro test lint status ui clean help

help:
	@echo "make repro   set up .venv and run the pipeline (dvc repro) on the default data"
	@echo "make test    set up .venv and run the tests"
	@echo "make lint    ruff over the code"
	@echo "make status  what dvc would re-run, and the current metrics"
	@echo "make ui      the MLflow UI on mlflow.db at http://127.0.0.1:5000 (MLFLOW_PORT=... to change)"
	@echo "make clean   remove .venv and pipeline outputs (data/, models/)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11+ not found; install it or pass PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is older than 3.11; pass PYTHON=/path/to/python3.11"; exit 1; }
	@echo "setting up $(VENV) with $(PYTHON) ($(TORCH_SPEC)); this takes a few minutes once"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	@touch $@

repro: $(STAMP)
	$(RUN) dvc repro

test: $(STAMP)
	$(RUN) pytest

lint: $(STAMP)
	$(RUN) ruff check .

status: $(STAMP)
	$(RUN) dvc status
	$(RUN) dvc metrics show

MLFLOW_PORT ?= 5000
ui: $(STAMP)
	$(RUN) mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) data/processed models
