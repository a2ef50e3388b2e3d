"""Server settings, all from the environment (so the container is configured the same way), typed and checked
by pydantic-settings. An empty variable counts as unset.

| variable | default | meaning |
|---|---|---|
| `MODEL_URI` | `models:/hndsr@production` | a registry alias or version, or a local folder (an exported model) |
| `MLFLOW_TRACKING_URI` | `sqlite:///mlflow.db` | where `models:/` URIs are resolved (read by the registry) |
| `HNDSR_DEVICE` | `auto` | `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ... |
| `HNDSR_API_KEY` | unset | when set, `/v1/*` needs `Authorization: Bearer <key>` |
| `HNDSR_MAX_UPLOAD_BYTES` | 20000000 | request body limit, enforced while reading |
| `HNDSR_MAX_INPUT_PIXELS` | 4000000 | input image limit (checked from the header) |
| `HNDSR_MAX_OUTPUT_PIXELS` | 16000000 | output image limit (input pixels x scale^2) |
| `HNDSR_MAX_QUEUE_PIXELS` | 64000000 | output pixels queued or running before new requests get 503 |
| `HNDSR_MAX_STEPS` | 50 | most DDIM steps a request may ask for |
| `HNDSR_TILE`, `HNDSR_TILE_OVERLAP` | 64, 8 | LR tile edge and overlap, pixels |
| `HNDSR_MAX_BATCH` | 8 | tiles per forward pass |
| `HNDSR_DEADLINE_S` | 120 | per-request deadline (504 when passed) |
| `HNDSR_POLL_S` | 30 | how often the alias is checked for a new version (0: never) |
| `HNDSR_DRAIN_S` | 30 | on SIGTERM, how long requests in flight may take to finish |
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Positive = Annotated[int, Field(gt=0)]


class SettingsError(ValueError):
    """A setting has a value the server cannot use; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HNDSR_", env_ignore_empty=True, frozen=True, extra="ignore",
                                      populate_by_name=True)

    model_uri: str = Field("models:/hndsr@production", validation_alias="MODEL_URI")
    device: str = "auto"
    api_key: str | None = None
    max_upload_bytes: Positive = 20_000_000
    max_input_pixels: Positive = 4_000_000
    max_output_pixels: Positive = 16_000_000
    max_queue_pixels: Positive = 64_000_000
    max_steps: Positive = 50
    tile: Positive = 64
    tile_overlap: Positive = 8
    max_batch: Positive = 8
    deadline_s: float = Field(120.0, gt=0)
    poll_s: float = Field(30.0, ge=0)
    drain_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not 2 <= self.tile_overlap < self.tile // 2:
            raise ValueError("HNDSR_TILE_OVERLAP must be at least 2 and below half of HNDSR_TILE")
        if self.max_queue_pixels < self.max_output_pixels:
            raise ValueError("HNDSR_MAX_QUEUE_PIXELS must be at least HNDSR_MAX_OUTPUT_PIXELS")
        return self


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"HNDSR_{field.upper()}"


def load_settings(**overrides) -> Settings:
    """The settings from the environment (and `overrides`, by field name); SettingsError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = [str(part) for part in error["loc"]]
            field = where[0] if where and where[0] in Settings.model_fields else None
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{env_name(field)}={error.get('input')!r}: {message}" if field else message)
        raise SettingsError("; ".join(problems)) from None
