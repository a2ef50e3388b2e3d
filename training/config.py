"""Typed params of the training stages (sections `train_<stage>`; `train` and `evaluate` are in hndsr.params)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hndsr.config import ConfigError, from_mapping
from hndsr.params import load_params

STAGE_NAMES = ("autoencoder", "operator", "diffusion")


@dataclass(frozen=True)
class SearchParam:
    """One dimension of an Optuna search space: a float range (optionally log) or a list of choices."""

    low: float | None = None  # a range's lower end
    high: float | None = None  # a range's upper end
    log: bool = False  # draw the range on a log scale (learning rates)
    choices: list[Any] | None = None  # instead of a range: the values to choose among


@dataclass(frozen=True)
class StageParams:
    """One training stage (params section `train_<stage>`). `model` holds the network's constructor
    arguments; `search` names what Optuna varies: `lr`, or `model.<field>` to override a model argument."""

    n_trials: int = 2  # Optuna trials of the stage's study (each a nested MLflow run)
    iterations: int = 600  # optimiser steps per trial
    batch_size: int = 16  # crops per step (divided among torchrun processes)
    crop: int = 48  # HR crop edge in pixels, a multiple of 4
    lr: float = 1e-3  # AdamW learning rate (when `search` does not vary it)
    eval_every: int = 100  # steps between validations (the trial's objective; Optuna prunes on it)
    seed: int = 0  # trial k seeds torch and its sampler with seed + k
    model: dict[str, Any] = field(default_factory=dict)  # the network's constructor arguments (below)
    search: dict[str, SearchParam] = field(default_factory=dict)  # what Optuna varies: `lr` or `model.<key>`
    study_name: str | None = None  # join an existing study (several workers); null: a new one per run
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated and saved; 0 = off
    hf_weight: float = 0.0  # operator only: weight of a high-frequency L1 term in its pixel loss; 0 = off

    def check(self, section: str) -> None:
        for key, value in (("n_trials", self.n_trials), ("iterations", self.iterations),
                           ("batch_size", self.batch_size), ("eval_every", self.eval_every)):
            if value < 1:
                raise ConfigError(f"{section}.{key}: must be at least 1, got {value}")
        if self.crop < 8 or self.crop % 4:
            raise ConfigError(f"{section}.crop: must be a multiple of 4 and at least 8, got {self.crop}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"{section}.ema: must be in [0, 1) (e.g. 0.999; 0 = off), got {self.ema}")
        if not math.isfinite(self.hf_weight) or self.hf_weight < 0:
            raise ConfigError(f"{section}.hf_weight: must be a number >= 0 (0 = off), got {self.hf_weight}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"{section}.lr: must be a positive number, got {self.lr}")
        for name, space in self.search.items():
            where = f"{section}.search.{name}"
            if name != "lr" and not name.startswith("model."):
                raise ConfigError(f"{where}: searchable names are `lr` and `model.<field>`")
            if space.choices is not None:
                if not space.choices or space.low is not None or space.high is not None:
                    raise ConfigError(f"{where}: give either a non-empty `choices` list or `low` and `high`")
            elif space.low is None or space.high is None or not space.low < space.high:
                raise ConfigError(f"{where}: needs low < high (or a `choices` list)")
            elif space.log and space.low <= 0:
                raise ConfigError(f"{where}: a log range needs low > 0")


@dataclass(frozen=True)
class DiffusionExtras:
    """Sampling settings the diffusion stage chooses on validation (params section `train_diffusion.sampling`)."""

    steps_choices: list[int] = field(default_factory=lambda: [4, 8])  # DDIM steps tried (steps = 0 always competes)
    temperature_choices: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])  # noise scale tried
    strength_choices: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    eta: float = 0.0  # DDIM eta: 0 = deterministic sampling
    max_psnr_cost: float = 0.4  # dB below steps = 0 allowed at any validation scale
    min_gain_over_bicubic: float = 0.1  # dB above bicubic required at every validation scale
    min_gmsd_gain: float = 0.02  # relative GMSD reduction against steps = 0 for steps to be the default
    num_train_timesteps: int = 1000  # the noise schedule's length
    prediction_type: str = "sample"


def load_stage(path: str | Path, stage: str) -> tuple[StageParams, DiffusionExtras | None]:
    """The `train_<stage>` section; for diffusion also its `sampling` sub-section."""
    name = f"train_{stage}"
    raw = dict(load_params(path).section(name))
    extras = None
    if stage == "diffusion":
        extras = from_mapping(DiffusionExtras, raw.pop("sampling", {}) or {}, where=f"{name}.sampling")
    params = from_mapping(StageParams, raw, where=name)
    params.check(name)
    if params.hf_weight and stage != "operator":
        raise ConfigError(f"{name}.hf_weight: only the operator's pixel loss has a high-frequency term; remove it")
    return params, extras
