"""Where the pipeline records runs and which code made them: the MLflow tracking URI with its local default,
and the git commit. Training (runs) and the registry (versions) both tag with these; neither imports the other.
Also what software a machine runs (`software()`), which every machine of one job must share: a sweep's workers,
the Dask workers of `--cluster`, the nodes of a torchrun group (`check_same_software` refuses the others).

Tracking URI: `MLFLOW_TRACKING_URI`, default `sqlite:///mlflow.db` in the current folder (the repository root
under DVC) with artifacts in `mlartifacts/` beside it. This module only names places; it does not import MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

from hndsr.errors import UserError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def local_artifact_location() -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside the local default database, or None
    (the tracking server decides) when MLFLOW_TRACKING_URI is set. Read it before `mlflow.set_tracking_uri`,
    which exports that variable."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return Path(DEFAULT_ARTIFACTS).resolve().as_uri()


def git_commit() -> str:
    """HEAD's commit, `<sha>-dirty` when tracked files other than the pipeline's own outputs have uncommitted
    changes (code, params, dvc.yaml), or `unknown` outside git. What the pipeline writes while it runs (dvc.lock and
    every out, metric and plot that dvc.yaml declares) does not count: `dvc repro` rewrites dvc.lock before the
    later stages tag their runs, which says nothing about the code that ran."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        excluded = [f":(exclude){path}" for path in pipeline_outputs()]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_outputs(dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """The tracked files the pipeline itself writes: dvc.lock and the outs, metrics and plots of `dvc_file`."""
    import yaml

    paths = [str(dvc_file.with_name("dvc.lock"))]
    try:
        stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return paths
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for item in (stage or {}).get(key) or []:
                paths.append(str(dvc_file.parent / (next(iter(item)) if isinstance(item, dict) else item)))
    return paths


PACKAGES = ("hndsr", "pipeline", "training", "registry", "serving")  # the project's code, as installed


@functools.cache
def code_hash() -> str:
    """SHA-256 (12 hex digits) of the project's Python files as this interpreter imports them (every `*.py` of
    PACKAGES, by path within the package): the same commit gives the same hash, installed or editable, on any
    machine; any edit, even a comment, gives another."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        roots = list(spec.submodule_search_locations or []) if spec else []
        for root in roots[:1]:
            for path in sorted(Path(root).rglob("*.py")):
                content = path.read_bytes()
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\0{len(content)}\0".encode())
                digest.update(content)
    return digest.hexdigest()[:12]


def software() -> dict[str, str]:
    """What this machine runs, as far as the results of a shared job depend on it: the project's version and
    code (`code_hash`), Python's minor version, and the versions of torch (without its build label: a CUDA and a
    CPU build of one version may work together) and numpy."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    return {"hndsr": version("hndsr"), "code": code_hash(), "python": ".".join(platform.python_version_tuple()[:2]),
            "torch": version("torch"), "numpy": version("numpy")}


def software_differences(here: dict[str, str], there: dict[str, str]) -> list[str]:
    """Human-readable differences, e.g. `code 1a2b3c4d5e6f there, 9f8e7d6c5b4a here`; empty when the same."""
    return [f"{key} {there.get(key, 'unknown')} there, {here.get(key, 'unknown')} here"
            for key in sorted(set(here) | set(there)) if here.get(key) != there.get(key)]


class SoftwareMismatch(UserError):
    """Another machine of the job runs other software than this one (see `check_same_software`)."""


def check_same_software(where: str, theirs: dict[str, str], mine: dict[str, str] | None = None,
                        than: str = "this machine") -> None:
    """Raise `SoftwareMismatch` naming `where` (e.g. "the Dask worker tcp://10.0.0.3:40123") and each difference,
    when `theirs` is not what this machine runs: a job across machines gives one process's results only when
    every machine runs the same code and packages."""
    differences = software_differences(mine or software(), theirs)
    if differences:
        raise SoftwareMismatch(
            f"{where} runs other software than {than} ({'; '.join(differences)}): install the same commit "
            "of the project and the same locked packages on every machine (`make setup` from one commit, or one "
            "image built from it), then start it again")
