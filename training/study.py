"""One Optuna study per stage execution: seeded TPE sampler, median pruner on intermediate validation
scores, storage from params (SQLite by default, PostgreSQL works the same), each trial a nested MLflow run.

Failed trials are recorded (Optuna state FAIL, MLflow tag `status=failed` with the error) and the study goes
on; only a study in which every trial failed is an error.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import optuna
import torch

from hndsr.errors import UserError
from training import tracking
from training.config import SearchParam, StageParams
from training.trainers import TrialResult

log = logging.getLogger("hndsr.study")


class TrainingError(UserError, RuntimeError):
    """A training stage could not produce a model; the message says why."""


def suggest(trial: optuna.Trial, search: dict[str, SearchParam]) -> dict:
    values = {}
    for name, space in sorted(search.items()):
        if space.choices is not None:
            values[name] = trial.suggest_categorical(name, space.choices)
        else:
            values[name] = trial.suggest_float(name, space.low, space.high, log=space.log)
    return values


def create_study(stage: str, params: StageParams, storage: str, run_id: str) -> optuna.Study:
    name = params.study_name or f"{stage}-{run_id}"
    try:
        return optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=params.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        )
    except Exception as exc:  # bad URL, unreachable database, missing driver
        raise TrainingError(f"cannot open the Optuna storage {storage!r} ({type(exc).__name__}: {exc}); "
                            "check train.study_storage") from None


def run_study(stage: str, params: StageParams, study: optuna.Study,
              train: Callable[[dict, Callable, int], TrialResult], tags: dict[str, str]) -> TrialResult:
    """Run `params.n_trials` trials of `train(hp, report, seed)`; return the best completed trial's result."""
    best: dict[str, TrialResult] = {}
    errors: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        hp = suggest(trial, params.search)
        seed = params.seed + trial.number
        torch.manual_seed(seed)
        log.info("%s trial %d of %d: %s", stage, trial.number, params.n_trials, hp or "the params' values")
        with tracking.trial_run(trial.number, hp, {"stage": stage, **tags}, stopped=(optuna.TrialPruned,)):
            def report(step: int, metrics: dict[str, float]) -> None:
                tracking.log_metrics(metrics, step=step)
                trial.report(metrics["val_score"], step)
                if trial.should_prune():
                    tracking.set_tags({"status": "pruned", "pruned_at_step": str(step)})
                    log.info("%s trial %d pruned at step %d: validation %.4f is behind the median of earlier "
                             "trials", stage, trial.number, step, metrics["val_score"])
                    raise optuna.TrialPruned(f"pruned at step {step}")

            try:
                result = train(hp, report, seed)
            except optuna.TrialPruned:
                raise
            except Exception as exc:
                errors.append(f"trial {trial.number}: {type(exc).__name__}: {exc}")
                tracking.set_tags({"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]})
                log.exception("trial %d failed", trial.number)
                raise
            tracking.log_metrics({"objective": result.score, **result.metrics})
            tracking.set_tags({"status": "complete"})
        if "result" not in best or result.score > best["result"].score:
            best["result"] = result
        log.info("trial %d: objective %.4f with %s", trial.number, result.score, hp)
        return result.score

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=params.n_trials, catch=(Exception,))
    if "result" not in best:
        first = errors[0] if errors else "every trial was pruned"
        raise TrainingError(f"all {params.n_trials} trials of {stage} failed; {first}")
    return best["result"]


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
