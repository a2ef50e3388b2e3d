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
def trial_run(number: int, params: dict, tags: dict[str, str], *, parent_run_id: str,
              stopped: tuple[type[BaseException], ...] = ()) -> Iterator[str]:
    """A nested run for one Optuna trial under the stage's run `parent_run_id` (active in this process, or in
    another one on another machine: a sweep's worker), with its sampled params. It ends FINISHED, KILLED when the
    block raises one of `stopped` (a pruned trial: stopped on purpose, not a failure), else FAILED."""
    import mlflow

    active = mlflow.active_run()
    if active is None:  # a worker: the parent runs elsewhere; its trials go to the parent's experiment
        mlflow.set_tracking_uri(tracking_uri())
        experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"trial-{number}", parent_run_id=parent_run_id,
                               tags={"trial": str(number), **tags})
    else:
        run = mlflow.start_run(run_name=f"trial-{number}", nested=True, parent_run_id=parent_run_id,
                               tags={"trial": str(number), **tags})
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


def parent_run(run_id: str) -> str:
    """The status of a stage's run a worker is about to join (RUNNING while its sweep is open); a clear error when
    this machine's tracking server does not have it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from hndsr.errors import UserError

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except MlflowException:
        raise UserError(f"the sweep's stage run {run_id} is not in this machine's MLflow tracking store "
                        f"{tracking_uri()}: point MLFLOW_TRACKING_URI at the tracking server the stage uses") from None


def add_to_evaluation(*, experiment: str, dataset_hash: str, models: dict[str, str],
                      metrics: dict[str, float], tags: dict[str, str]) -> str | None:
    """Add `metrics` and `tags` to the newest `evaluate` run of this dataset and these weights ({stage: sha256},
    as eval.json's `models`), so a figure measured later (a peer's, by a benchmark) sits beside the evaluation it
    compares with in the MLflow UI. Returns that run's id, or None when no such run exists."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    conditions = ["tags.stage = 'evaluate'", f"tags.dataset_hash = '{dataset_hash}'",
                  *(f"tags.{stage}_weights = '{digest}'" for stage, digest in sorted(models.items()))]
    runs = client.search_runs([found.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    return run_id


def end_lost_run(run_id: str, reason: str) -> None:
    """End the run of a trial whose worker is gone: FAILED, with the reason (called from any process)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    client.set_tag(run_id, "status", "failed")
    client.set_tag(run_id, "error", reason[:500])
    client.set_terminated(run_id, status="FAILED")


def log_artifacts(folder: str | Path, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def download_artifacts(run_id: str, artifact_path: str, destination: str | Path) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                               dst_path=str(destination), tracking_uri=tracking_uri())


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
