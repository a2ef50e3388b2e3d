"""Typed params for the training and evaluation stages (sections `train`, `train_<stage>`, `evaluate`)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hndsr.config import ConfigError, from_mapping

STAGE_NAMES = ("autoencoder", "operator", "diffusion")


@dataclass(frozen=True)
class TrainCommon:
    """Shared by the three training stages and evaluation (params section `train`)."""

    data_dir: str = "data/processed"
    models_dir: str = "models"
    metrics_dir: str = "metrics"
    experiment: str = "hndsr"
    scale_range: list[float] = field(default_factory=lambda: [2.0, 4.0])
    device: str = "auto"  # auto | cpu | cuda
    study_storage: str = "sqlite:///optuna.db"
    val_tiles: int = 40  # validation tiles per scale, evenly spaced through the split
    threads: int = 0  # CPU threads for torch; 0 = torch's default

    def __post_init__(self) -> None:
        low, high = (self.scale_range + [0, 0])[:2]
        if len(self.scale_range) != 2 or not 1 < low < high:
            raise ConfigError(f"train.scale_range: must be [low, high] with 1 < low < high, got {self.scale_range}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be auto, cpu or cuda, got {self.device!r}")
        if self.val_tiles < 1:
            raise ConfigError("train.val_tiles: must be at least 1")


@dataclass(frozen=True)
class SearchParam:
    """One dimension of an Optuna search space: a float range (optionally log) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass(frozen=True)
class StageParams:
    """One training stage (params section `train_<stage>`). `model` holds the network's constructor
    arguments; `search` names what Optuna varies: `lr`, or `model.<field>` to override a model argument."""

    n_trials: int = 2
    iterations: int = 600
    batch_size: int = 16
    crop: int = 48
    lr: float = 1e-3
    eval_every: int = 100
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    search: dict[str, SearchParam] = field(default_factory=dict)
    study_name: str | None = None  # join an existing study (several workers); null: a new one per run

    def check(self, section: str) -> None:
        for key, value in (("n_trials", self.n_trials), ("iterations", self.iterations),
                           ("batch_size", self.batch_size), ("eval_every", self.eval_every)):
            if value < 1:
                raise ConfigError(f"{section}.{key}: must be at least 1, got {value}")
        if self.crop < 8 or self.crop % 4:
            raise ConfigError(f"{section}.crop: must be a multiple of 4 and at least 8, got {self.crop}")
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

    steps_choices: list[int] = field(default_factory=lambda: [4, 8])
    temperature_choices: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    strength_choices: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    eta: float = 0.0
    max_psnr_cost: float = 0.4  # dB below steps = 0 allowed at any validation scale
    min_gain_over_bicubic: float = 0.1  # dB above bicubic required at every validation scale
    num_train_timesteps: int = 1000
    prediction_type: str = "sample"


@dataclass(frozen=True)
class EvaluateParams:
    """Params section `evaluate`."""

    steps: int | None = None  # null: the diffusion checkpoint's validated default
    seed: int = 0
    grid_tiles: int = 4  # test tiles in the sample grid image
    batch_size: int = 16


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found; run from the repository root or pass --params")
    return yaml.safe_load(path.read_text()) or {}


def section(document: dict, name: str, path: str | Path) -> dict:
    if name not in document:
        raise ConfigError(f"{path}: has no `{name}` section")
    return document[name] or {}


def load_common(path: str | Path) -> TrainCommon:
    return from_mapping(TrainCommon, section(load_yaml(path), "train", path), where="train")


def load_stage(path: str | Path, stage: str) -> tuple[StageParams, DiffusionExtras | None]:
    """The `train_<stage>` section; for diffusion also its `sampling` sub-section."""
    name = f"train_{stage}"
    raw = dict(section(load_yaml(path), name, path))
    extras = None
    if stage == "diffusion":
        extras = from_mapping(DiffusionExtras, raw.pop("sampling", {}) or {}, where=f"{name}.sampling")
    params = from_mapping(StageParams, raw, where=name)
    params.check(name)
    return params, extras


def load_evaluate(path: str | Path) -> EvaluateParams:
    return from_mapping(EvaluateParams, section(load_yaml(path), "evaluate", path), where="evaluate")


def params_hash(*sections: Any) -> str:
    """SHA-256 of the params a stage ran with (dataclasses or dicts), for MLflow tags and study names."""
    text = json.dumps([asdict(s) if hasattr(s, "__dataclass_fields__") else s for s in sections], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
