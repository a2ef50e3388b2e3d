"""The serving image's and the compose stack's production files for what they promise (the CUDA default, the
lock, the GPU reservation), by reading them: tests/deploy/test_image.py and test_stack.py build and run them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.code_graph import pyproject

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "mlflow" / "docker-compose.yml"


def compose_client() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose client: `make tools` installs docker-compose")


@pytest.mark.parametrize("overlay", [None, "docker-compose.gpu.yml", "docker-compose.local.yml"])
def test_compose_files_parse_with_a_compose_client(overlay):
    files = ["-f", str(COMPOSE)] + (["-f", str(COMPOSE.parent / overlay)] if overlay else [])
    result = subprocess.run([*compose_client(), *files, "config", "--quiet"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def locked_version(package: str) -> str:
    text = (REPO / "requirements" / "dev.txt").read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)", text, re.MULTILINE).group(1)


def test_the_stack_runs_the_locked_versions():
    """The MLflow server the clients talk to, and the local override's builds, at the lock's versions."""
    production = yaml.safe_load(COMPOSE.read_text())["services"]
    assert production["mlflow"]["image"] == f"ghcr.io/mlflow/mlflow:v{locked_version('mlflow')}"
    local = yaml.safe_load((COMPOSE.parent / "docker-compose.local.yml").read_text())["services"]
    packages = local["mlflow"]["build"]["args"]["PACKAGES"] + " " + local["minio"]["build"]["args"]["PACKAGES"]
    for package in ("mlflow", "boto3", "moto"):
        assert f"{package}=={locked_version(package)}" in packages.replace("moto[server]", "moto"), package
    assert local["mlflow"]["image"].endswith(locked_version("mlflow"))


def test_compose_wires_tracking_storage_and_a_gpu_server():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"postgres", "minio", "mlflow", "serve"} <= set(services)
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "postgresql" in services["mlflow"]["environment"]["BACKEND_STORE_URI"]
    assert "--artifacts-destination s3://" in mlflow_command
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    serve = services["serve"]
    assert serve["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert serve["build"]["dockerfile"] == "serving/Dockerfile"
    assert "deploy" not in serve  # runs anywhere; the GPU reservation is the overlay's
    gpu = yaml.safe_load((COMPOSE.parent / "docker-compose.gpu.yml").read_text())["services"]["serve"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert not (REPO / "mlflow" / "__init__.py").exists()  # would shadow the mlflow package


def test_dockerfile_is_minimal_locked_non_root_and_health_checked():
    text = (REPO / "serving" / "Dockerfile").read_text()
    base = text.split("ARG BASE=", 1)[1].splitlines()[0]
    assert base.startswith("python:3.11")  # the Python the lock files are resolved for
    # The serve extra's lock, hash-checked; torch at the version pyproject.toml pins; the project without deps.
    assert "pip install -q --require-hashes --no-deps -r /tmp/requirements/serve.txt" in text
    torch_pin = next(d for d in pyproject()["project"]["optional-dependencies"]["serve"] if d.startswith("torch"))
    assert f'ARG TORCH_SPEC="{torch_pin}"' in text and "pip install -q ${TORCH_SPEC}" in text
    assert "pip install -q --no-deps --no-build-isolation ." in text
    assert "\nUSER hndsr" in text and "HEALTHCHECK" in text and "/readyz" in text
    assert 'ENTRYPOINT ["hndsr", "serve"' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "models", "mlflow.db"} <= set(ignored)
    assert "requirements" not in ignored
