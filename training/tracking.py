"""The one module that talks to MLflow tracking.

Tracking URI: `hndsr.provenance` (`MLFLOW_TRACKING_URI`, default `sqlite:///mlflow.db` in the current
folder, the repository root under DVC, with artifacts in `mlartifacts/`). One experiment; each stage execution
is one run tagged with the stage, git commit, dataset hash and params hash; every Optuna trial is a nested run under it. Metric names
are the same in every run (`val_psnr`, `train_loss`, ...), so the UI's compare view lines them up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from hndsr.provenance import git_commit, local_artifact_location, tracking_uri

log = logging.getLogger("hndsr.tracking")


def _experiment_id(mlflow, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # another stage or worker created it just now (a unique-name error): use that one
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, *, experiment: str, tags: dict[str, str], params: dict) -> Iterator[str]:
    """Open the run of one stage execution; yields its run id. The run ends FAILED if the block raises."""
    import mlflow

    artifact_location = local_artifact_location()  # read first: set_tracking_uri exports the variable
    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(mlflow, experiment, artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)  # nested trial runs go to the active experiment
    all_tags = {"stage": stage, "git_commit": git_commit(), **tags}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags) as run:
        mlflow.log_params(_flatten(params))
        log.info("MLflow run %s (stage %s) at %s", run.info.run_id, stage, tracking_uri())
        yield run.info.run_id


@contextlib.contextmanager
def trial_run(number: int, params: dict, tags: dict[str, str], *,
              stopped: tuple[type[BaseException], ...] = ()) -> Iterator[str]:
    """A nested run for one Optuna trial under the active stage run, with its sampled params. It ends FINISHED,
    KILLED when the block raises one of `stopped` (a pruned trial: stopped on purpose, not a failure), else
    FAILED."""
    import mlflow

    run = mlflow.start_run(run_name=f"trial-{number}", nested=True, tags={"trial": str(number), **tags})
    try:
        mlflow.log_params(_flatten(params))
        yield run.info.run_id
    except stopped:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_params(params: dict) -> None:
    import mlflow

    mlflow.log_params(_flatten(params))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_figure(figure, name: str) -> None:
    import mlflow

    mlflow.log_figure(figure, name)


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat
