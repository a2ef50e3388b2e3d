"""Params files (params.yaml): the one reader, the sections several packages share, and hashing.

Every command reads its params through `load_params`, which returns a `ParamsFile`: a read-only mapping of the
file's top-level sections that remembers which sections were read. DVC re-runs a stage only when a params key it
declares changes, so a section read but not declared in `dvc.yaml` is a silent staleness bug; with
`HNDSR_PARAMS_TRACE=<file>` set, `hndsr` appends one JSON line per command (its arguments and the sections it read
from each params file) to that file, and the tests compare those lines with `dvc.yaml`.

Sections read by more than one package live here as typed configs: `train` (training, evaluation and the
registry read where models, metrics and data are) and `evaluate` (the evaluate stage and the gate, which
re-scores models on the test split).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hndsr.config import ConfigError, from_mapping

T = TypeVar("T")
TRACE_ENV = "HNDSR_PARAMS_TRACE"

_sections_read: dict[str, set[str]] = {}  # params file (as given) -> top-level sections read in this process


class ParamsFile(Mapping):
    """The top-level sections of a params file; reading a section (`file[name]`, `.section(name)`) is recorded."""

    def __init__(self, path: str | Path, document: dict) -> None:
        self.path = str(path)
        self._document = document
        _sections_read.setdefault(self.path, set())

    def __getitem__(self, name: str) -> Any:
        value = self._document[name]
        _sections_read[self.path].add(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._document)

    def __len__(self) -> int:
        return len(self._document)

    def section(self, name: str) -> dict:
        """Section `name` (an empty section is `{}`); ConfigError if the file has none."""
        if name not in self._document:
            raise ConfigError(f"{self.path}: has no `{name}` section")
        return self[name] or {}


def load_params(path: str | Path) -> ParamsFile:
    """Read a params file; ConfigError (one line) if it is missing, not YAML, or not a mapping of sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found; run from the repository root or pass --params")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (etl, train, ...), got {type(document).__name__}")
    return ParamsFile(path, document)


def load_section(cls: type[T], path: str | Path, name: str) -> T:
    """Section `name` of the params file at `path` as the typed config `cls` (unknown keys are errors)."""
    return from_mapping(cls, load_params(path).section(name), where=name)


def sections_read() -> dict[str, list[str]]:
    """The sections this process has read, by params file."""
    return {path: sorted(names) for path, names in _sections_read.items()}


def write_trace(command: list[str]) -> None:
    """Append `{"command", "sections"}` to the file named by HNDSR_PARAMS_TRACE, if it is set."""
    target = os.environ.get(TRACE_ENV)
    if not target:
        return
    line = json.dumps({"command": command, "sections": sections_read()}, sort_keys=True)
    with open(target, "a", encoding="utf-8") as trace:
        trace.write(line + "\n")


def params_hash(*sections: Any) -> str:
    """SHA-256 of the params a step ran with (dataclasses or mappings), for MLflow tags and study names."""
    plain = [asdict(s) if hasattr(s, "__dataclass_fields__") else _plain(s) for s in sections]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    return {k: value[k] for k in value} if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class TrainCommon:
    """Shared by the three training stages, evaluation and the registry (params section `train`)."""

    data_dir: str = "data/processed"  # the ETL's Parquet splits and manifest
    models_dir: str = "models"  # checkpoints: models/<stage>/config.json + model.safetensors
    metrics_dir: str = "metrics"  # each stage's metrics JSON (DVC metrics) and reports
    experiment: str = "hndsr"
    scale_range: list[float] = field(default_factory=lambda: [2.0, 4.0])
    device: str = "auto"  # auto | cpu | cuda
    study_storage: str = "sqlite:///optuna.db"
    val_tiles: int = 40  # validation tiles per scale, evenly spaced through the split
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    heartbeat_s: int = 60  # a sweep's trial whose worker is silent for twice this is failed
    processes: int = 1  # >1: `hndsr train` runs itself under torchrun with this many processes (one per GPU)

    def __post_init__(self) -> None:
        low, high = (self.scale_range + [0, 0])[:2]
        if len(self.scale_range) != 2 or not 1 < low < high:
            raise ConfigError(f"train.scale_range: must be [low, high] with 1 < low < high, got {self.scale_range}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be auto, cpu or cuda, got {self.device!r}")
        if self.val_tiles < 1:
            raise ConfigError("train.val_tiles: must be at least 1")
        if self.heartbeat_s < 1 or self.processes < 1:
            raise ConfigError("train.heartbeat_s and train.processes: must be at least 1")


@dataclass(frozen=True)
class EvaluateParams:
    """Params section `evaluate`: how the test split is scored (by the evaluate stage and the gate)."""

    steps: int | None = None  # null: the diffusion checkpoint's validated default
    seed: int = 0  # the sampling seed of every test tile
    grid_tiles: int = 4  # test tiles in the sample grid image
    batch_size: int = 16  # test tiles per forward pass
    # Also score the geometric self-ensemble (8 flips/turns averaged, 8x the time; hndsr.model.DIHEDRAL) as
    # ensemble_psnr/ensemble_ssim per scale and print its cost. The main figures (and the gate) stay plain.
    self_ensemble: bool = False


def load_common(path: str | Path) -> TrainCommon:
    return load_section(TrainCommon, path, "train")


def load_evaluate(path: str | Path) -> EvaluateParams:
    return load_section(EvaluateParams, path, "evaluate")
