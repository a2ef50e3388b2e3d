"""Sweeps across processes (machines): `hndsr train STAGE` and `hndsr train --worker` on one Optuna study in the
PostgreSQL at 127.0.0.1:5432, logging to a real `mlflow server` on PostgreSQL with artifacts in S3 through its
proxy (the workers hold no S3 credentials); one worker is SIGKILLed mid-trial."""

import functools
import json
import shutil
import signal
import subprocess
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tests.scaleout.conftest import BIN, altered, env, hndsr, write_params

pytestmark = pytest.mark.scaleout

BUDGET = 6


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per database: the tests poll every 0.2 s for minutes, and a storage made
    from the URL at each poll held its pooled connections until garbage collection, which once exhausted the
    server's 100 connections on a slower machine ("sorry, too many clients already")."""
    return optuna.storages.RDBStorage(url)


def _study(url: str) -> optuna.Study | None:
    storage = _storage(url)
    summaries = [s for s in optuna.get_all_study_summaries(storage) if "hndsr" in s.user_attrs]
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage) if summaries else None


def _wait(condition, timeout: float, what: str, processes=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"{what}: a process exited early ({process.returncode}): {process.stdout.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_two_workers_share_one_budget_and_a_killed_worker_is_failed_by_heartbeat(project, study_database,
                                                                                tracking_server):
    write_params(project, train={"study_storage": study_database},
                 train_autoencoder={"n_trials": BUDGET, "iterations": 1500, "eval_every": 300,
                                    "search": {"lr": {"low": 1.0e-4, "high": 1.0e-3, "log": True}}})
    extra = {"MLFLOW_TRACKING_URI": tracking_server.uri}
    stage = subprocess.Popen([str(BIN / "hndsr"), "train", "autoencoder"], cwd=project, env=env(**extra),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: _study(study_database), 120, "the stage's study", [stage])
        # the second worker, as on another machine: joins whatever autoencoder sweep is open
        worker = subprocess.Popen([str(BIN / "hndsr"), "train", "autoencoder", "--worker", "--wait", "30"],
                                  cwd=project, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        name = f":{worker.pid}"

        def worker_mid_trial():  # the worker holds a running trial that has reported at least once
            return [t for t in _study(study_database).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if t.user_attrs.get("worker", "").endswith(name) and t.intermediate_values]

        killed = _wait(worker_mid_trial, 180, "the worker to be mid-trial", [worker])[0]
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        output, _ = stage.communicate(timeout=300)
    finally:
        for process in (stage, worker):
            if process.poll() is None:
                process.kill()
    assert stage.returncode == 0, output[-4000:]
    assert "no heartbeat from" in output and f"trial {killed.number} of" in output

    study = _study(study_database)
    trials = study.trials
    # the global budget is exact, each trial number ran once, and both workers ran trials
    assert len(trials) == BUDGET and sorted(t.number for t in trials) == list(range(BUDGET))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number]  # the killed worker's trial, failed by the heartbeat
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and killed.user_attrs["worker"] in workers

    # the MLflow nested runs match the trials one to one, under the stage's run, whichever worker ran them
    client = mlflow.MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("hndsr")
    runs = client.search_runs([experiment.experiment_id])
    stage_runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(stage_runs) == 1 and stage_runs[0].info.status == "FINISHED"
    children = {int(r.data.tags["trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == stage_runs[0].info.run_id}
    assert sorted(children) == list(range(BUDGET)) and len(runs) == BUDGET + 1
    for trial in trials:
        run = children[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["worker"] == trial.user_attrs["worker"]
        expected = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
        assert run.info.status == expected[trial.state]
    assert "heartbeats" in children[killed.number].data.tags["error"]

    # the stage's output is the best trial across both workers
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    metrics = json.loads((project / "metrics" / "autoencoder.json").read_text())
    assert metrics["objective"] == pytest.approx(best.value)
    assert metrics["trials_failed"] == 1
    assert metrics["trials_complete"] + metrics["trials_pruned"] + 1 == BUDGET
    config = json.loads((project / "models" / "autoencoder" / "config.json").read_text())
    assert config["best_params"] == best.params and config["run_id"] == stage_runs[0].info.run_id


def test_a_worker_with_other_params_or_data_is_refused(project, study_database, tracking_server):
    write_params(project, train={"study_storage": study_database},
                 train_autoencoder={"n_trials": 2, "iterations": 100000, "eval_every": 50000})
    extra = {"MLFLOW_TRACKING_URI": tracking_server.uri}
    stage = subprocess.Popen([str(BIN / "hndsr"), "train", "autoencoder"], cwd=project, env=env(**extra),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: _study(study_database), 120, "the stage's study", [stage])
        other = project.parent / "other"
        other.mkdir()
        (other / "params.yaml").write_text((project / "params.yaml").read_text())
        write_params(other, train_autoencoder={"iterations": 100001})
        refused = hndsr(other, "train", "--worker", **extra)
        assert refused.returncode == 1
        assert "this machine's params for autoencoder differ from those of the sweep" in refused.stderr
        write_params(other, train_autoencoder={"iterations": 100000})
        refused = hndsr(other, "train", "--worker", **extra)
        assert refused.returncode == 1 and "data/processed here is missing" in refused.stderr
        assert "dvc pull data/processed" in refused.stderr
        shutil.copytree(project / "data", other / "data")  # the same data, but other code (first on PYTHONPATH)
        code = altered(project.parent / "code")
        refused = hndsr(other, "train", "--worker", PYTHONPATH=str(code), **extra)
        assert refused.returncode == 1
        assert "the stage that opened autoencoder-" in refused.stderr
        assert "runs other software than this worker (code " in refused.stderr
        nothing = hndsr(other, "train", "diffusion", "--worker", **extra)  # no diffusion sweep open: exits
        assert nothing.returncode == 0 and "no open sweep of diffusion" in nothing.stderr
    finally:
        stage.kill()
        stage.wait()


def test_machines_opening_a_new_study_database_at_once_all_get_it(study_database):
    """Workers that wait for a sweep and its stage open an empty database together: Optuna's schema is created by
    one of them, the others' duplicate-creation errors are retried (seen with three containers on the stack)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from training.study import open_storage

    together = Barrier(6)

    def open_it(attempts: int):
        together.wait()
        return open_storage(study_database, heartbeat_s=2, attempts=attempts)

    with ThreadPoolExecutor(6) as pool:
        storages = list(pool.map(open_it, [6] * 6))
    assert len({s.get_current_version() for s in storages}) == 1
