"""Server settings, all from the environment (so the container is configured the same way), typed and checked
by pydantic-settings: the engine's (inference/settings.py: the model, device, memory budget and arithmetic, shared
with `hndsr predict`) and the HTTP server's below. An empty variable counts as unset.

| variable | default | meaning |
|---|---|---|
| `HNDSR_API_KEY` | unset | when set, `/v1/*` needs `Authorization: Bearer <key>` (one key for every client) |
| `HNDSR_API_KEYS_FILE` | unset | a YAML file of named clients, each with its key's SHA-256 and quotas (serving/clients.py); then `/v1/*` needs one of those keys |
| `HNDSR_MAX_UPLOAD_BYTES` | 20000000 | request body limit, enforced while reading |
| `HNDSR_MAX_INPUT_PIXELS` | 4000000 | input image limit (checked from the header) |
| `HNDSR_MAX_OUTPUT_PIXELS` | 16000000 | output image limit (input pixels x scale^2) |
| `HNDSR_MAX_BANDS` | 64 | most bands a raster may have, chosen or not (422 `too_many_bands`; a block holds every band) |
| `HNDSR_MAX_BYTES_PER_PIXEL` | 128 | most bytes per pixel over all of a raster's bands (413 `input_too_large`) |
| `HNDSR_MAX_STEPS` | 50 | most DDIM steps a request may ask for |
| `HNDSR_PNG_COMPRESS_LEVEL` | 1 | zlib level of the PNG answers, 0..9 (same pixels; 1 is 5x faster than 6 for about 15 % more bytes) |
| `HNDSR_DEADLINE_S` | 120 | per-request deadline, decoding and inference (504 when passed) |
| `HNDSR_POLL_S` | 30 | how often the alias is checked for a new version (0: never) |
| `HNDSR_DRAIN_S` | 30 | on SIGTERM, how long requests in flight may take to finish (then they are answered 503) |
| `HNDSR_CLIENT_TIMEOUT_S` | 30 | a request's headers must arrive within this; a body upload may pause at most this long |
| `HNDSR_MAX_CONNECTIONS` | 256 | open connections beyond this get 503 (health probes excepted) |
| `HNDSR_CANARY_WEIGHT` | 0 | share of clients (sticky by client) sent to the version `HNDSR_CANARY_ALIAS` points to, 0 to 1 |
| `HNDSR_SHADOW_SHARE` | 0 | instead of a split: share of production requests also run on the candidate in the background, compared, never returned |
| `HNDSR_CANARY_ALIAS` | `candidate` | the roll-out's alias (with MODEL_URI an alias URI of the same model) |
| `HNDSR_CANARY_WINDOW_S` | 300 | sliding window over which the candidate is compared with production |
| `HNDSR_CANARY_MIN_REQUESTS` | 20 | least candidate requests in the window before it is judged |
| `HNDSR_CANARY_MAX_ERROR_RATIO` | 0.05 | back out when the candidate's server-error ratio exceeds production's by more |
| `HNDSR_CANARY_MAX_LATENCY_RATIO` | 1.5 | back out when the candidate's p95 seconds per output megapixel exceed production's times this, in a size band where both have HNDSR_CANARY_MIN_REQUESTS answers |
| `HNDSR_CANARY_MAX_CONSISTENCY_DROP_DB` | 3 | back out when the candidate's median consistency (dB, hndsr.monitoring) on its answers lies more than this below production's, both with HNDSR_CANARY_MIN_REQUESTS answers in the window |
| `HNDSR_MONITORING` | true | compute each answer's label-free figures (consistency, input drift: hndsr.monitoring) for its headers, the metrics and the canary; false: none of them |
| `HNDSR_DRIFT_WINDOW_S` | 3600 | the input-drift figures (PSI per version and client) cover the inputs of this many seconds |
| `HNDSR_DRIFT_WINDOW_REQUESTS` | 500 | and at most this many of the latest requests |
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from inference.settings import EngineSettings, Positive, SettingsError, load
from inference.settings import env_name as _env_name

__all__ = ["Settings", "SettingsError", "env_name", "load_settings"]


class Settings(EngineSettings):
    """The engine's settings and the server's."""

    api_key: str | None = None
    api_keys_file: str | None = None
    max_upload_bytes: Positive = 20_000_000
    max_input_pixels: Positive = 4_000_000
    max_output_pixels: Positive = 16_000_000
    max_bands: Positive = 64
    max_bytes_per_pixel: Positive = 128
    max_steps: Positive = 50
    png_compress_level: Annotated[int, Field(ge=0, le=9)] = 1
    deadline_s: float = Field(120.0, gt=0)
    poll_s: float = Field(30.0, ge=0)
    drain_s: float = Field(30.0, gt=0)
    client_timeout_s: float = Field(30.0, gt=0)
    max_connections: Positive = 256
    canary_weight: float = Field(0.0, ge=0, le=1)
    shadow_share: float = Field(0.0, ge=0, le=1)
    canary_alias: str = Field("candidate", min_length=1)
    canary_window_s: float = Field(300.0, gt=0)
    canary_min_requests: Positive = 20
    canary_max_error_ratio: float = Field(0.05, ge=0, le=1)
    canary_max_latency_ratio: float = Field(1.5, gt=1)
    canary_max_consistency_drop_db: float = Field(3.0, gt=0)
    monitoring: bool = True
    drift_window_s: float = Field(3600.0, gt=0)
    drift_window_requests: Positive = 500

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_queue_pixels < self.max_output_pixels:
            raise ValueError("HNDSR_MAX_QUEUE_PIXELS must be at least HNDSR_MAX_OUTPUT_PIXELS")
        if self.canary_weight > 0 and self.shadow_share > 0:
            raise ValueError("set HNDSR_CANARY_WEIGHT (a split) or HNDSR_SHADOW_SHARE (shadow runs), not both")
        if self.api_key and self.api_keys_file:
            raise ValueError("set HNDSR_API_KEY (one shared key) or HNDSR_API_KEYS_FILE (named clients), not both")
        return self


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return _env_name(field, Settings)


def load_settings(**overrides) -> Settings:
    """The settings from the environment (and `overrides`, by field name); SettingsError naming the variable."""
    return load(Settings, **overrides)
