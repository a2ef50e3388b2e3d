"""The Optuna study runner with real MLflow tracking (SQLite) and real storages (SQLite, PostgreSQL)."""

import uuid

import mlflow
import optuna
import pytest
import torch

from training import tracking
from training.config import SearchParam, StageParams
from training.study import TrainingError, create_study, run_study
from training.trainers import TrialResult

PARAMS = StageParams(n_trials=3, search={"lr": SearchParam(low=1e-4, high=1e-2, log=True)})


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _result(score: float) -> TrialResult:
    return TrialResult(torch.nn.Linear(1, 1), score, {"val_psnr_x2": score}, [{"step": 1, "val_score": score}])


def _children(uri: str, parent: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]


def test_failed_trials_are_recorded_and_the_best_completed_one_wins(mlflow_db, tmp_path):
    def train(hp, report, seed):
        if seed == 1:
            raise RuntimeError("out of patience")
        report(1, {"val_score": float(seed), "train_loss": 1.0})
        return _result(float(seed))

    with tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        study = create_study("operator", PARAMS, f"sqlite:///{tmp_path / 'optuna.db'}", run_id)
        best = run_study("operator", PARAMS, study, train, tags={"dataset_hash": "d"})
    assert best.score == 2.0
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                              optuna.trial.TrialState.COMPLETE]
    children = sorted(_children(mlflow_db, run_id), key=lambda r: int(r.data.tags["trial"]))
    assert [c.data.tags["status"] for c in children] == ["complete", "failed", "complete"]
    assert [c.info.status for c in children] == ["FINISHED", "FAILED", "FINISHED"]
    assert "out of patience" in children[1].data.tags["error"]
    assert all("lr" in c.data.params for c in children)
    assert children[2].data.metrics["objective"] == 2.0


def test_every_trial_failing_is_an_error(mlflow_db, tmp_path):
    def train(hp, report, seed):
        raise ValueError("bad input")

    expected = r"all 3 trials of operator failed; trial 0: ValueError: bad input"
    with pytest.raises(TrainingError, match=expected), \
            tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        study = create_study("operator", PARAMS, f"sqlite:///{tmp_path / 'optuna.db'}", run_id)
        run_study("operator", PARAMS, study, train, tags={})


def test_pruner_stops_a_trial_that_falls_behind(mlflow_db, tmp_path):
    def train(hp, report, seed):
        for step in range(1, 4):
            report(step, {"val_score": 10.0 - seed * step})  # later trials fall behind
        return _result(10.0 - seed * 3)

    with tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        study = create_study("operator", PARAMS, f"sqlite:///{tmp_path / 'optuna.db'}", run_id)
        run_study("operator", PARAMS, study, train, tags={})
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED
    children = sorted(_children(mlflow_db, run_id), key=lambda r: int(r.data.tags["trial"]))
    assert {c.data.tags["status"] for c in children} == {"complete", "pruned"}
    pruned = children[1]
    # Pruned is stopped on purpose, not a failure: KILLED in MLflow, with its sampled params and where it stopped.
    assert pruned.data.tags["status"] == "pruned" and pruned.info.status == "KILLED"
    assert "lr" in pruned.data.params and pruned.data.tags["pruned_at_step"] in {"1", "2", "3"}


def test_same_seed_same_suggestions(tmp_path):
    def suggestions(path):
        study = create_study("s", PARAMS, f"sqlite:///{path}", "run")
        return [study.ask().suggest_float("lr", 1e-4, 1e-2, log=True) for _ in range(3)]

    assert suggestions(tmp_path / "a.db") == suggestions(tmp_path / "b.db")


def test_unusable_storage_is_a_clear_error():
    with pytest.raises(TrainingError, match="cannot open the Optuna storage 'nosuchdb://x'"):
        create_study("operator", PARAMS, "nosuchdb://x", "run")


@pytest.fixture
def postgres_url():
    import psycopg

    name = f"hndsr_test_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"the PostgreSQL server on 127.0.0.1:5432 is required for this test: {exc}")
    admin.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


def test_study_on_postgresql_is_shared_by_name(mlflow_db, postgres_url):
    params = StageParams(n_trials=2, search=PARAMS.search, study_name="shared-operator")

    def train(hp, report, seed):
        report(1, {"val_score": 1.0})  # all equal, so the pruner keeps every trial
        return _result(1.0)

    with tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        run_study("operator", params, create_study("operator", params, postgres_url, run_id), train, tags={})
    # A second worker (another machine) joins the same study by name and adds its trials.
    with tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        run_study("operator", params, create_study("operator", params, postgres_url, run_id), train, tags={})
    study = optuna.load_study(study_name="shared-operator", storage=postgres_url)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
