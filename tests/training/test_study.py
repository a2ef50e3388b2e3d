"""The sweep runner with real MLflow tracking (SQLite) and real storages (SQLite, PostgreSQL)."""

import uuid

import mlflow
import optuna
import pytest
import torch

from hndsr.networks import NeuralOperator, OperatorConfig
from training import tracking
from training.config import SearchParam, StageParams
from training.errors import TrainingError
from training.study import find_sweep, finish, start_sweep, work
from training.trainers import TrialResult

PARAMS = StageParams(n_trials=3, search={"lr": SearchParam(low=1e-4, high=1e-2, log=True)})


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _result(score: float) -> TrialResult:
    network = NeuralOperator(OperatorConfig(width=4, modes=2, layers=1))
    with torch.no_grad():
        next(network.parameters()).fill_(score)  # tells the trials' networks apart
    return TrialResult(network, score, {"val_psnr_x2": score}, [{"step": 1, "val_score": score}])


def _sweep(params, storage, train, tags=None):
    """One stage execution's sweep in this process: returns (best result, study, stage run id)."""
    with tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        sweep = start_sweep("operator", params, storage, 5, {"parent_run": run_id})
        work("operator", params, sweep, train, tags or {})
        best, _, study = finish("operator", params, sweep)
    return best, study, run_id


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

    best, study, run_id = _sweep(PARAMS, f"sqlite:///{tmp_path / 'optuna.db'}", train, {"dataset_hash": "d"})
    assert best.score == 2.0
    # the best trial's network comes back from its run's artifact, bit for bit
    assert torch.equal(next(best.network.parameters()), next(_result(2.0).network.parameters()))
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
    with pytest.raises(TrainingError, match=expected):
        _sweep(PARAMS, f"sqlite:///{tmp_path / 'optuna.db'}", train)


def test_pruner_stops_a_trial_that_falls_behind(mlflow_db, tmp_path):
    def train(hp, report, seed):
        for step in range(1, 4):
            report(step, {"val_score": 10.0 - seed * step})  # later trials fall behind
        return _result(10.0 - seed * 3)

    _, study, run_id = _sweep(PARAMS, f"sqlite:///{tmp_path / 'optuna.db'}", train)
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED
    children = sorted(_children(mlflow_db, run_id), key=lambda r: int(r.data.tags["trial"]))
    assert {c.data.tags["status"] for c in children} == {"complete", "pruned"}
    pruned = children[1]
    # Pruned is stopped on purpose, not a failure: KILLED in MLflow, with its sampled params and where it stopped.
    assert pruned.data.tags["status"] == "pruned" and pruned.info.status == "KILLED"
    assert "lr" in pruned.data.params and pruned.data.tags["pruned_at_step"] in {"1", "2", "3"}


def test_same_seed_same_suggestions(mlflow_db, tmp_path):
    def suggestions(path):
        seen = []

        def train(hp, report, seed):
            seen.append(hp["lr"])
            report(1, {"val_score": 1.0})
            return _result(1.0)

        _sweep(PARAMS, f"sqlite:///{path}", train)
        return seen

    first = suggestions(tmp_path / "a.db")
    assert first == suggestions(tmp_path / "b.db") and len(set(first)) == 3


def test_unusable_storage_is_a_clear_error():
    with pytest.raises(TrainingError, match="cannot open the Optuna storage 'nosuchdb://x'"):
        start_sweep("operator", PARAMS, "nosuchdb://x", 5, {"parent_run": "run"})


def test_password_is_not_shown_in_storage_errors():
    with pytest.raises(TrainingError) as error:
        start_sweep("operator", PARAMS, "postgresql://u:secret@127.0.0.1:1/x", 5, {"parent_run": "run"})
    assert "secret" not in str(error.value) and "u:***@127.0.0.1:1" in str(error.value)


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


def test_a_named_study_runs_once_and_workers_find_open_sweeps(mlflow_db, postgres_url):
    params = StageParams(n_trials=2, search=PARAMS.search, study_name="shared-operator")

    def train(hp, report, seed):
        report(1, {"val_score": 1.0})  # all equal, so the pruner keeps every trial
        return _result(1.0)

    with tracking.stage_run("operator", experiment="test", tags={}, params={}) as run_id:
        sweep = start_sweep("operator", params, postgres_url, 5, {"parent_run": run_id})
        # open with queued trials: a worker of this stage (or of any stage) finds it; of another stage, not
        assert find_sweep("operator", postgres_url, 5, 0).name == "shared-operator"
        assert find_sweep(None, postgres_url, 5, 0).name == "shared-operator"
        assert find_sweep("diffusion", postgres_url, 5, 0) is None
        assert work("operator", params, sweep, train, {}) == 2
        finish("operator", params, sweep)
    assert find_sweep("operator", postgres_url, 5, 0) is None  # closed
    study = optuna.load_study(study_name="shared-operator", storage=postgres_url)
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    with pytest.raises(TrainingError, match="'shared-operator' already exists .* a sweep runs once"):
        start_sweep("operator", params, postgres_url, 5, {"parent_run": run_id})


def test_a_worker_joins_the_newest_open_sweep(mlflow_db, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    older = start_sweep("operator", PARAMS, storage, 5, {"parent_run": "a"})
    optuna.load_study(study_name=older.name, storage=storage).ask()  # one of its trials has started
    newer = start_sweep("operator", PARAMS, storage, 5, {"parent_run": "b"})  # none of its trials has
    assert find_sweep("operator", storage, 5, 0).name == newer.name
    newer.close()
    assert find_sweep("operator", storage, 5, 0).name == older.name
