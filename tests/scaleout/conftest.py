"""A small real project for the scale-out tests: the ETL of three real images from imagery/realsat, tiny
training params, a fresh PostgreSQL database per test and a real `mlflow server` on PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.tracking import MlflowServer, start_mlflow_server

BIN = Path(sys.executable).parent
IMAGES = ("landsat8_grenada.png", "spacenet6_rotterdam_urban.png", "landsat7_bahamas_crop.png")
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
TINY = {
    "train": {"val_tiles": 4, "threads": 1, "heartbeat_s": 2},
    "train_autoencoder": {"n_trials": 1, "iterations": 40, "eval_every": 20, "batch_size": 8, "crop": 32,
                          "model": {"latent_channels": 8, "width": 8, "blocks": 1}, "search": {}},
    "train_operator": {"n_trials": 1, "iterations": 60, "eval_every": 30, "batch_size": 8, "crop": 32,
                       "model": {"width": 8, "modes": 4, "layers": 2}, "search": {}},
    "train_diffusion": {"n_trials": 1, "iterations": 20, "eval_every": 10, "batch_size": 8, "crop": 32,
                        "model": {"width": 8, "emb_dim": 16}, "search": {}},
}


def env(**extra: str) -> dict[str, str]:
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    if "MLFLOW_TRACKING_URI" not in extra:
        full.pop("MLFLOW_TRACKING_URI", None)
    return full


def hndsr(project: Path, *args: str, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hndsr"), *args], cwd=project, env=env(**extra), capture_output=True,
                          text=True, timeout=timeout)


def altered(folder: Path) -> Path:
    """A copy of hndsr/ with one comment more: what a machine with a local edit, or another commit, runs."""
    shutil.copytree(REPO / "hndsr", folder / "hndsr", ignore=shutil.ignore_patterns("__pycache__"))
    with (folder / "hndsr" / "cores.py").open("a") as file:
        file.write("# changed on one machine only\n")
    return folder


def write_params(project: Path, **sections: dict) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.fixture(scope="session")
def etl_project(tmp_path_factory, realsat) -> Path:
    """params.yaml (tiny training) and data/processed from the real ETL of three real images."""
    root = tmp_path_factory.mktemp("scaleout")
    raw = root / "raw"
    raw.mkdir()
    for name in IMAGES:
        shutil.copy(realsat / name, raw / name)
    project = root / "project"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["etl"].update(source=str(raw), splits={"train": 0.5, "val": 0.25, "test": 0.25}, split_seed=7)
    for name, values in TINY.items():
        params[name].update(values)
    params["train_diffusion"]["sampling"].update(steps_choices=[2], temperature_choices=[0.5],
                                                 strength_choices=[0.25, 0.5])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = hndsr(project, "etl", "--params", "params.yaml", "--out", "data/processed")
    assert result.returncode == 0, result.stderr[-3000:]
    return project


@pytest.fixture
def project(tmp_path, etl_project) -> Path:
    """A fresh copy of the ETL project for one test."""
    copy = tmp_path / "project"
    shutil.copytree(etl_project, copy)
    return copy


def _database() -> Iterator[str]:
    import psycopg

    name = f"hndsr_scaleout_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"the PostgreSQL server on 127.0.0.1:5432 is required for the scale-out tests: {exc}")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def study_database() -> Iterator[str]:
    """A new PostgreSQL database for the Optuna studies of one test."""
    yield from _database()


@pytest.fixture
def tracking_server(tmp_path, s3_server) -> Iterator[MlflowServer]:
    """`mlflow server` as the README sets it up for a team: runs and registry in a new PostgreSQL database,
    artifacts in S3 (a local S3 server process) through the server's proxy, so clients need no S3 credentials."""
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    for url in _database():
        server = start_mlflow_server(url, f"s3://{bucket}/artifacts", tmp_path,
                                     {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint})
        try:
            yield server
        finally:
            server.stop()
