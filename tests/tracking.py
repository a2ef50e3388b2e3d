"""Real `mlflow server` processes and real (tiny) trained candidates for the registry, container and CI
workflow tests (a plugin of tests/conftest.py: one definition, so a session trains the candidates once).

Candidates are trained once per session by the real stage commands (`hndsr etl/train/evaluate`) on three real
images from imagery/realsat:
- `good`:  operator trained long enough to beat bicubic on the test split;
- `good2`: the same autoencoder, operator trained with another seed (a second, different good candidate);
- `bad`:   one iteration per stage, i.e. an untrained model (below bicubic).
Each test copies what it needs into its own project folder and uses its own registered-model name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, stop_process

BIN = Path(sys.executable).parent
IMAGES = ("landsat8_grenada.png", "spacenet6_rotterdam_urban.png", "landsat7_bahamas_crop.png")


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    if env is None or "MLFLOW_TRACKING_URI" not in env:
        full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop_process(self.process, timeout=20)


def start_mlflow_server(backend: str, artifacts: str, workdir: Path, env: dict[str, str] | None = None,
                        host: str = "127.0.0.1") -> MlflowServer:
    """`host`: the address it listens on and is reached at (containers reach this host at Docker's bridge)."""
    port = free_port()
    log = workdir / f"mlflow-server-{port}.log"
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
         "--host", host, "--port", str(port), "--workers", "1"],
        cwd=workdir, env={**os.environ, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    uri = f"http://{host}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return MlflowServer(uri, process, log)
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"mlflow server did not answer within 120 s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def postgres_s3_mlflow_server(workdir: Path, s3_server, prefix: str) -> Iterator[tuple[MlflowServer, str]]:
    """`mlflow server` with runs and registry in a new database on the PostgreSQL at 127.0.0.1:5432 and
    artifacts in a new bucket of `s3_server`, as a team runs it; the database is dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    database = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    server = start_mlflow_server(f"postgresql://postgres@127.0.0.1:5432/{database}", f"s3://{bucket}/artifacts",
                                 workdir, env)
    try:
        yield server, bucket
    finally:
        server.stop()
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """`mlflow server` on a loopback port: SQLite backend, artifacts proxied to a local folder."""
    workdir = tmp_path_factory.mktemp("mlflow-sqlite")
    server = start_mlflow_server(f"sqlite:///{workdir / 'mlflow.db'}", str(workdir / "artifacts"), workdir)
    yield server
    server.stop()


TRAIN = {  # small networks, a few hundred operator iterations: ~1 min of CPU for all three candidates
    "train": {"val_tiles": 4},
    "train_autoencoder": {"n_trials": 1, "iterations": 40, "eval_every": 20, "batch_size": 8, "crop": 32,
                          "model": {"latent_channels": 8, "width": 8, "blocks": 1}, "search": {}},
    "train_operator": {"n_trials": 1, "iterations": 300, "eval_every": 150, "batch_size": 8, "crop": 32,
                       "model": {"width": 12, "modes": 6, "layers": 2}, "search": {}},
    "train_diffusion": {"n_trials": 1, "iterations": 20, "eval_every": 10, "batch_size": 8, "crop": 32,
                        "model": {"width": 8, "emb_dim": 16}, "search": {}},
}
PROMOTE = {"min_gain_over_bicubic": 0.05, "max_psnr_regression": 0.1, "max_ssim_regression": 0.01,
           "latency_budget_ms": 60000, "latency_repeats": 1}


def _params(realsat_copy: Path, **stage_overrides) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["etl"].update(source=str(realsat_copy), splits={"train": 0.5, "val": 0.25, "test": 0.25}, split_seed=7)
    for name, values in TRAIN.items():
        params[name].update(values)
    for name, values in stage_overrides.items():
        params[name].update(values)
    params["train_diffusion"]["sampling"].update(steps_choices=[2], temperature_choices=[0.5],
                                                 strength_choices=[0.25])
    params["promote"].update(PROMOTE)
    return params


def _stage(project: Path, *args: str) -> None:
    result = run(["hndsr", *args, "--params", "params.yaml"], project)
    assert result.returncode == 0, f"hndsr {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-3000:]}"


@pytest.fixture(scope="session")
def candidates(tmp_path_factory, realsat) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    raw = root / "raw"
    raw.mkdir()
    for name in IMAGES:
        shutil.copy(realsat / name, raw / name)
    projects = {}
    for name, overrides in {
        "good": {},
        "good2": {"train_operator": {"seed": 1}},
        "bad": {f"train_{s}": {"iterations": 1, "eval_every": 1} for s in ("autoencoder", "operator", "diffusion")},
    }.items():
        project = root / name
        project.mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump(_params(raw, **overrides), sort_keys=False))
        projects[name] = project
    _stage(projects["good"], "etl", "--out", "data/processed")
    for project in (projects["good2"], projects["bad"]):
        shutil.copytree(projects["good"] / "data", project / "data")
    _stage(projects["good"], "train", "autoencoder")
    shutil.copytree(projects["good"] / "models" / "autoencoder", projects["good2"] / "models" / "autoencoder")
    for name, project in projects.items():
        stages = ("autoencoder", "operator", "diffusion") if name == "bad" else ("operator", "diffusion")
        for stage in stages:
            _stage(project, "train", stage)
        _stage(project, "evaluate")
    return projects


@pytest.fixture
def make_project(tmp_path, candidates) -> Callable[..., Path]:
    """make_project(candidate, model_name=..., **promote overrides): a fresh folder holding that candidate's
    params, data, models and metrics (no MLflow database of its own)."""
    default_name = f"hndsr-test-{uuid.uuid4().hex[:8]}"

    def make(candidate: str, *, model_name: str | None = None, folder: str | None = None, **promote) -> Path:
        return copy_candidate(candidates[candidate], tmp_path / (folder or candidate), model_name or default_name,
                              **promote)

    return make


def copy_candidate(source: Path, project: Path, model_name: str, **promote) -> Path:
    """A new project folder with a trained candidate's params, data, models and metrics, registering as
    `model_name` (and `promote` overrides)."""
    project.mkdir(parents=True)
    for name in ("data", "models", "metrics"):
        shutil.copytree(source / name, project / name)
    params = yaml.safe_load((source / "params.yaml").read_text())
    params["promote"].update(model_name=model_name, **promote)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project
