"""The sweep of one stage execution: an Optuna study that any number of workers, on any machines, work through.

The stage's run (`hndsr train STAGE`, the DVC stage) creates the study in the storage from params
(`train.study_storage`, or `HNDSR_STUDY_STORAGE`; SQLite by default, PostgreSQL for several machines) and queues
exactly `n_trials` trials: that is the global budget. Every worker (the stage's own process, and each
`hndsr train STAGE --worker` on this or another machine) claims queued trials one at a time (Optuna's own
WAITING -> RUNNING transition, atomic in the database, so no trial runs twice and no worker adds a trial), trains
it and reports to the study; the sweep ends when the queue is empty and no trial is running.

A worker's trial sends a heartbeat to the storage every `train.heartbeat_s`; a trial whose heartbeat is older
than twice that (its worker died or lost the network) is failed by whichever worker looks next, and its MLflow
run is ended FAILED with the reason. The budget stays exact: a failed trial counts, as in one process.

Every trial is a nested MLflow run under the stage's run, whichever worker ran it, and logs its network, scores
and validation curve as the artifact `trial/`; the stage takes the best completed trial across all workers from
there. Each trial's sampler is a TPE sampler seeded with `seed + trial number`, so a trial's hyperparameters
depend on the study's history and its number, not on which worker drew it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from hndsr.checkpoint import load_network, save_network
from training import distributed, tracking
from training.config import SearchParam, StageParams
from training.errors import TrainingError
from training.trainers import TrialResult

log = logging.getLogger("hndsr.study")

ATTR = "hndsr"  # the study's user attribute describing the sweep (stage, budget, parent run, hashes)
STORAGE_VARIABLE = "HNDSR_STUDY_STORAGE"
RESULT = "trial"  # each trial run's artifact folder: config.json, model.safetensors, result.json


def suggest(trial: optuna.Trial, search: dict[str, SearchParam]) -> dict:
    values = {}
    for name, space in sorted(search.items()):
        if space.choices is not None:
            values[name] = trial.suggest_categorical(name, space.choices)
        else:
            values[name] = trial.suggest_float(name, space.low, space.high, log=space.log)
    return values


def storage_url(configured: str) -> str:
    """The study storage: `HNDSR_STUDY_STORAGE` when set (a password need not go into params.yaml), else params."""
    return os.environ.get(STORAGE_VARIABLE) or configured


def redact(url: str) -> str:
    """`url` without a password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        credentials, host = rest.split("@", 1)
        if ":" in credentials:
            return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def _lost(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Called by Optuna for a trial just failed for a stale heartbeat: end its MLflow run the same way."""
    worker = trial.user_attrs.get("worker", "an unknown worker")
    log.warning("trial %d of %s failed: no heartbeat from %s since %s (worker gone)", trial.number,
                study.study_name, worker, trial.datetime_start)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        tracking.end_lost_run(run_id, f"worker {worker} stopped sending heartbeats (killed or cut off)")


def open_storage(url: str, heartbeat_s: int, attempts: int = 6) -> optuna.storages.RDBStorage:
    """The study storage at `url`. Machines that open a new database at the same moment (workers waiting for a
    sweep, and its stage) race to create Optuna's schema: the losers' errors are retried."""
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                                                  heartbeat_stale_trial_callback=_lost)
        except Exception as exc:  # bad URL, unreachable database, missing driver; or the schema race
            if attempt < attempts and _schema_race(exc):
                log.info("Optuna's tables in %s are being created by another machine; opening it again",
                         redact(url))
                time.sleep(0.5 * attempt)
                continue
            raise TrainingError(f"cannot open the Optuna storage {redact(url)!r} ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); check train.study_storage or "
                                f"{STORAGE_VARIABLE}") from None
    raise AssertionError("unreachable")


def _schema_race(exc: Exception) -> bool:
    """An error of creating a table, type or row that another connection created first."""
    import sqlalchemy.exc

    return isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) and any(
        text in str(exc) for text in ("already exists", "duplicate key", "UNIQUE constraint failed"))


@dataclass
class Sweep:
    """One stage execution's study and what every worker needs to know about it."""

    storage: optuna.storages.RDBStorage
    name: str
    info: dict  # the ATTR user attribute: stage, budget, parent_run, sweep_hash, dataset_hash, upstream, open

    @property
    def budget(self) -> int:
        return int(self.info["budget"])

    def study(self, params: StageParams, number: int = 0) -> optuna.Study:
        """A fresh view of the study (no cached trials), with the sampler for trial `number`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.load_study(study_name=self.name, storage=self.storage,
                                     sampler=optuna.samplers.TPESampler(seed=params.seed + number),
                                     pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[optuna.trial.FrozenTrial]:
        study_id = self.storage.get_study_id_from_name(self.name)
        return self.storage.get_all_trials(study_id, deepcopy=False, states=states)

    def fail_stale(self, params: StageParams) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study(params))

    def close(self) -> None:
        study_id = self.storage.get_study_id_from_name(self.name)
        self.info = {**self.info, "open": False}
        self.storage.set_study_user_attr(study_id, ATTR, self.info)


def start_sweep(stage: str, params: StageParams, url: str, heartbeat_s: int, info: dict) -> Sweep:
    """Create the study of a stage execution and queue its budget of `params.n_trials` trials."""
    storage = open_storage(url, heartbeat_s)
    name = params.study_name or f"{stage}-{info['parent_run']}"
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        raise TrainingError(f"the Optuna study {name!r} already exists in {redact(url)}: a sweep runs once; set "
                            f"train_{stage}.study_name to a new name (or null: one study per run)") from None
    except Exception as exc:
        raise TrainingError(f"cannot create the Optuna study {name!r} in {redact(url)} ({type(exc).__name__}: "
                            f"{exc})") from None
    info = {"stage": stage, "budget": params.n_trials, "open": True, **info}
    for _ in range(params.n_trials):
        study.enqueue_trial({})
    study.set_user_attr(ATTR, info)  # last: a worker joins only a study whose budget is queued
    log.info("study %s in %s: %d trials queued for any worker (`hndsr train %s --worker`)", name, redact(url),
             params.n_trials, stage)
    return Sweep(storage, name, info)


def find_sweep(stage: str | None, url: str, heartbeat_s: int, wait_s: float) -> Sweep | None:
    """The newest open sweep (of `stage`, or of any stage) with queued trials; waits up to `wait_s` for one."""
    storage = open_storage(url, heartbeat_s)
    deadline, said = time.monotonic() + wait_s, False
    while True:
        candidates = []
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            info = summary.user_attrs.get(ATTR)
            if not info or not info.get("open") or (stage and info.get("stage") != stage):
                continue
            sweep = Sweep(storage, summary.study_name, info)
            if sweep.trials((TrialState.WAITING,)):
                candidates.append((summary.datetime_start, sweep))
        if candidates:  # the newest: a sweep none of whose trials has started yet counts as newer than any
            return max(candidates, key=lambda c: c[0] or datetime.datetime.max)[1]
        if time.monotonic() >= deadline:
            return None
        if not said:
            log.info("no open %ssweep with queued trials in %s yet; waiting up to %.0f s",
                     f"{stage} " if stage else "", redact(url), wait_s)
            said = True
        time.sleep(min(5.0, max(0.5, heartbeat_s / 2)))


class _Heartbeat:
    """Records the claimed trial's heartbeat in the storage every `interval` s until the trial ends."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a database hiccup: the next beat may get through before the grace ends
                log.warning("heartbeat of trial id %d not recorded: %s", self.trial_id, exc)

    def __enter__(self) -> _Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _claim(sweep: Sweep) -> tuple[int, int] | None:
    """Take one queued trial (WAITING -> RUNNING, atomic in the database): (trial id, number), or None."""
    study_id = sweep.storage.get_study_id_from_name(sweep.name)
    for frozen in sweep.trials((TrialState.WAITING,)):
        trial_id = sweep.storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if sweep.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return trial_id, frozen.number
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


Train = Callable[[dict, Callable, int], TrialResult]


def work(stage: str, params: StageParams, sweep: Sweep, train: Train, tags: dict[str, str]) -> int:
    """Claim and run queued trials of `sweep` until none is left; returns how many this worker ran. Under
    torchrun this is rank 0's loop (the other ranks run `follow`)."""
    done = 0
    while True:
        sweep.fail_stale(params)
        claimed = _claim(sweep)
        if claimed is None:
            distributed.send_trial(None)  # the other ranks' `follow` ends (after an error they are ended by torchrun)
            return done
        _run_trial(stage, params, sweep, *claimed, train, tags)
        done += 1


def follow(train: Train) -> None:
    """A torchrun rank other than 0: train every trial rank 0 draws, until it says the sweep is over."""
    while (message := distributed.receive_trial()) is not None:
        hp, seed = message
        torch.manual_seed(seed)

        def report(step: int, metrics: dict | None) -> None:
            if distributed.receive_decision():
                raise optuna.TrialPruned(f"pruned at step {step}")

        with contextlib.suppress(optuna.TrialPruned):
            train(hp, report, seed)


def _run_trial(stage: str, params: StageParams, sweep: Sweep, trial_id: int, number: int, train: Train,
               tags: dict[str, str]) -> None:
    study = sweep.study(params, number)
    trial = optuna.Trial(study, trial_id)
    worker = worker_name()
    with _Heartbeat(sweep.storage, trial_id, sweep.storage.heartbeat_interval):
        trial.set_user_attr("worker", worker)
        hp = suggest(trial, params.search)
        seed = params.seed + number
        torch.manual_seed(seed)
        log.info("%s trial %d of %d on %s: %s", stage, number, sweep.budget, worker, hp or "the params' values")
        distributed.send_trial((hp, seed))
        state, score = TrialState.FAIL, None
        try:
            with tracking.trial_run(number, hp, {"stage": stage, "worker": worker, **tags},
                                    parent_run_id=sweep.info["parent_run"],
                                    stopped=(optuna.TrialPruned,)) as run_id:
                trial.set_user_attr("mlflow_run_id", run_id)

                def report(step: int, metrics: dict[str, float]) -> None:
                    tracking.log_metrics(metrics, step=step)
                    trial.report(metrics["val_score"], step)
                    if trial.should_prune():
                        tracking.set_tags({"status": "pruned", "pruned_at_step": str(step)})
                        log.info("%s trial %d pruned at step %d: validation %.4f is behind the median of earlier "
                                 "trials", stage, number, step, metrics["val_score"])
                        distributed.send_decision(True)
                        raise optuna.TrialPruned(f"pruned at step {step}")
                    distributed.send_decision(False)

                try:
                    result = train(hp, report, seed)
                    if not math.isfinite(result.score):
                        raise ValueError(f"the validation score is {result.score}")
                    _log_result(stage, result)
                    tracking.log_metrics({"objective": result.score, **result.metrics})
                except Exception as exc:
                    if not isinstance(exc, optuna.TrialPruned):
                        message = f"{type(exc).__name__}: {exc}"[:500]
                        tracking.set_tags({"status": "failed", "error": message})
                        trial.set_user_attr("error", message)
                    raise
                tracking.set_tags({"status": "complete"})
            state, score = TrialState.COMPLETE, result.score
            log.info("trial %d: objective %.4f with %s", number, result.score, hp)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception:
            log.exception("trial %d failed", number)
            if distributed.world().active:  # the other ranks are mid-step and cannot go on in step: stop all
                raise
        finally:
            try:
                study.tell(trial, score) if state == TrialState.COMPLETE else study.tell(trial, state=state)
            except optuna.exceptions.UpdateFinishedTrialError:  # failed meanwhile for a stale heartbeat
                log.warning("trial %d had already been failed for a missed heartbeat; its result is not counted",
                            number)


def _log_result(stage: str, result: TrialResult) -> None:
    """The trial's network, scores and curve as its MLflow run's artifact `trial/`, where the stage finds the best
    trial whichever worker ran it."""
    with tempfile.TemporaryDirectory(prefix="hndsr-trial-") as folder:
        save_network(folder, stage, result.network)
        record = {"score": result.score, "metrics": result.metrics, "history": result.history}
        (Path(folder) / "result.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        tracking.log_artifacts(folder, RESULT)


def load_result(stage: str, run_id: str) -> TrialResult:
    with tempfile.TemporaryDirectory(prefix="hndsr-best-") as folder:
        local = Path(tracking.download_artifacts(run_id, RESULT, folder))
        network, _ = load_network(local, stage)
        record = json.loads((local / "result.json").read_text())
    return TrialResult(network, record["score"], record["metrics"], record["history"])


def finish(stage: str, params: StageParams,
           sweep: Sweep) -> tuple[TrialResult, optuna.trial.FrozenTrial, optuna.Study]:
    """Wait until no trial of the sweep is running (failing those whose worker is gone), close it and return the
    best completed trial's result across all workers (the lowest number among equal scores)."""
    said = False
    while running := sweep.trials((TrialState.RUNNING,)):
        if not said:
            log.info("waiting for %d trial(s) running on other workers: %s", len(running),
                     ", ".join(f"{t.number} ({t.user_attrs.get('worker', '?')})" for t in running))
            said = True
        time.sleep(max(0.5, sweep.storage.heartbeat_interval / 2))
        sweep.fail_stale(params)
    sweep.close()
    study = sweep.study(params)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        errors = [f"trial {t.number}: {t.user_attrs['error']}" for t in study.trials if "error" in t.user_attrs]
        first = errors[0] if errors else ("every trial was pruned" if any(t.state == TrialState.PRUNED
                                          for t in study.trials) else "every trial failed")
        raise TrainingError(f"all {sweep.budget} trials of {stage} failed; {first}")
    best = max(complete, key=lambda t: (t.value, -t.number))
    log.info("best trial of %s: %d (objective %.4f, %s)", sweep.name, best.number, best.value,
             best.user_attrs.get("worker"))
    return load_result(stage, best.user_attrs["mlflow_run_id"]), best, study


def log_study_plots(study: optuna.Study) -> None:
    """Optimisation history and parameter importances as image artifacts of the active MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots = {"optuna_history.png": optuna_plots.plot_optimization_history,
                 "optuna_param_importances.png": optuna_plots.plot_param_importances}
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except Exception as exc:  # e.g. importances need two completed trials with varied params
                log.warning("cannot draw %s: %s", name, exc)
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            tracking.log_figure(figure, name)
            plt.close(figure)
