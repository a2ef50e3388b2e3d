"""The inference engine's settings, from the environment like the server's (serving/settings.py adds the HTTP
ones to these): which model, on which device, with what memory budget and arithmetic. `hndsr serve` and
`hndsr predict` read the same variables, so a scene predicted in batch is computed as the server computes it.
Typed and checked by pydantic-settings; an empty variable counts as unset.

| variable | default | meaning |
|---|---|---|
| `MODEL_URI` | `models:/hndsr@production` | a registry alias or version, or a local folder (an exported model) |
| `MLFLOW_TRACKING_URI` | `sqlite:///mlflow.db` | where `models:/` URIs are resolved (read by the registry) |
| `HNDSR_DEVICE` | `auto` | `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ... |
| `HNDSR_MAX_QUEUE_PIXELS` | 64000000 | output pixels queued or running before new requests get 503 |
| `HNDSR_PASS_MEGAPIXELS` | `auto` | the memory budget: most output megapixels one forward pass works on; an image whose output fits is one tile (auto: 0.6 on CPU, measured by benchmarks/tile_budget.py; on CUDA half the free memory, measured at start-up) |
| `HNDSR_TILE_OVERLAP` | 8 | least overlap between neighbouring tiles, LR pixels |
| `HNDSR_SELF_ENSEMBLE` | false | average every pass over the 8 flips and quarter turns of its tile (geometric self-ensemble): about 8x the compute; `hndsr predict --self-ensemble` sets it |
| `HNDSR_MAX_BATCH` | `auto` | most tiles per forward pass (auto: 1 on CPU, where batching measured slower; 8 on CUDA) |
| `HNDSR_WORKERS` | `auto` | passes in flight per device (auto: 2 on CPU, measured 11 % more throughput than 1; 1 on CUDA); memory is up to workers x pass budget |
| `HNDSR_PRECISION` | `auto` | `auto`: bfloat16 where the device has it and the start-up check passes; `float32`: always float32 |
| `HNDSR_COMPILE` | `auto` | `torch.compile` the diffusion UNet, kept if the start-up check passes: `auto` (CUDA only), `on`, `off` |
| `HNDSR_MIN_PSNR_DB` | 45 | tolerance of the start-up checks: least PSNR against float32 on the reference input |
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

Positive = Annotated[int, Field(gt=0)]


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HNDSR_", env_ignore_empty=True, frozen=True, extra="ignore",
                                      populate_by_name=True)

    model_uri: str = Field("models:/hndsr@production", validation_alias="MODEL_URI")
    device: str = "auto"
    max_queue_pixels: Positive = 64_000_000
    pass_megapixels: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    tile_overlap: Annotated[int, Field(ge=2, le=64)] = 8
    self_ensemble: bool = False  # average the 8 flips/turns of every pass (hndsr.model.DIHEDRAL): 8x the compute
    max_batch: Positive | Literal["auto"] = "auto"
    workers: Positive | Literal["auto"] = "auto"
    precision: Literal["auto", "float32"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    min_psnr_db: float = Field(45.0, gt=0)


def env_name(field: str, cls: type[BaseSettings] = EngineSettings) -> str:
    """The environment variable that sets `field` of `cls`."""
    alias = cls.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"HNDSR_{field.upper()}"


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S], **overrides) -> S:
    """Settings of class `cls` from the environment (and `overrides`, by field name); SettingsError naming the
    variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}  # a field typed as a union fails once per member: one line each
        for error in exc.errors():
            where = [str(part) for part in error["loc"]]
            field = where[0] if where and where[0] in cls.model_fields else None
            message = error["msg"].removeprefix("Value error, ")
            key = f"{env_name(field, cls)}={error.get('input')!r}: " if field else ""
            problems.setdefault(key, [])
            if message not in problems[key]:
                problems[key].append(message)
        lines = [key + " or ".join([first] + [m.removeprefix("Input should be ") for m in rest])
                 for key, (first, *rest) in problems.items()]
        raise SettingsError("; ".join(lines)) from None


def load_engine_settings(**overrides) -> EngineSettings:
    """The engine's settings (what `hndsr predict` reads); SettingsError naming the variable."""
    return load(EngineSettings, **overrides)
