"""Where the pipeline records runs and which code made them: the MLflow tracking URI with its local default,
and the git commit. Training (runs) and the registry (versions) both tag with these; neither imports the other.

Tracking URI: `MLFLOW_TRACKING_URI`, default `sqlite:///mlflow.db` in the current folder (the repository root
under DVC) with artifacts in `mlartifacts/` beside it. This module only names places; it does not import MLflow.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
