"""Server settings, all from the environment (so the container is configured the same way), typed and checked
by pydantic-settings. An empty variable counts as unset.

| variable | default | meaning |
|---|---|---|
| `MODEL_URI` | `models:/hndsr@production` | a registry alias or version, or a local folder (an exported model) |
| `MLFLOW_TRACKING_URI` | `sqlite:///mlflow.db` | where `models:/` URIs are resolved (read by the registry) |
| `HNDSR_DEVICE` | `auto` | `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ... |
| `HNDSR_API_KEY` | unset | when set, `/v1/*` needs `Authorization: Bearer <key>` (one key for every client) |
| `HNDSR_API_KEYS_FILE` | unset | a YAML file of named clients, each with its key's SHA-256 and quotas (serving/clients.py); then `/v1/*` needs one of those keys |
| `HNDSR_MAX_UPLOAD_BYTES` | 20000000 | request body limit, enforced while reading |
| `HNDSR_MAX_INPUT_PIXELS` | 4000000 | input image limit (checked from the header) |
| `HNDSR_MAX_OUTPUT_PIXELS` | 16000000 | output image limit (input pixels x scale^2) |
| `HNDSR_MAX_BANDS` | 64 | most bands a raster may have, chosen or not (422 `too_many_bands`; a block holds every band) |
| `HNDSR_MAX_BYTES_PER_PIXEL` | 128 | most bytes per pixel over all of a raster's bands (413 `input_too_large`) |
| `HNDSR_MAX_QUEUE_PIXELS` | 64000000 | output pixels queued or running before new requests get 503 |
| `HNDSR_MAX_STEPS` | 50 | most DDIM steps a request may ask for |
| `HNDSR_PASS_MEGAPIXELS` | `auto` | the memory budget: most output megapixels one forward pass works on; an image whose output fits is one tile (auto: 0.6 on CPU, measured by benchmarks/tile_budget.py; on CUDA half the free memory, measured at start-up) |
| `HNDSR_TILE_OVERLAP` | 8 | least overlap between neighbouring tiles, LR pixels |
| `HNDSR_SELF_ENSEMBLE` | false | average every pass over the 8 flips and quarter turns of its tile (geometric self-ensemble): about 8x the compute; `hndsr predict --self-ensemble` sets it |
| `HNDSR_MAX_BATCH` | `auto` | most tiles per forward pass (auto: 1 on CPU, where batching measured slower; 8 on CUDA) |
| `HNDSR_WORKERS` | `auto` | passes in flight per device (auto: 2 on CPU, measured 11 % more throughput than 1; 1 on CUDA); memory is up to workers x pass budget |
| `HNDSR_PRECISION` | `auto` | `auto`: bfloat16 where the device has it and the start-up check passes; `float32`: always float32 |
| `HNDSR_COMPILE` | `auto` | `torch.compile` the diffusion UNet, kept if the start-up check passes: `auto` (CUDA only), `on`, `off` |
| `HNDSR_MIN_PSNR_DB` | 45 | tolerance of the start-up checks: least PSNR against float32 on the reference input |
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
"""

from __future__ import annotations

from typing import Annotated, Literal

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
    api_keys_file: str | None = None
    max_upload_bytes: Positive = 20_000_000
    max_input_pixels: Positive = 4_000_000
    max_output_pixels: Positive = 16_000_000
    max_bands: Positive = 64
    max_bytes_per_pixel: Positive = 128
    max_queue_pixels: Positive = 64_000_000
    max_steps: Positive = 50
    pass_megapixels: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    tile_overlap: Annotated[int, Field(ge=2, le=64)] = 8
    self_ensemble: bool = False  # average the 8 flips/turns of every pass (hndsr.model.DIHEDRAL): 8x the compute
    max_batch: Positive | Literal["auto"] = "auto"
    workers: Positive | Literal["auto"] = "auto"
    precision: Literal["auto", "float32"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    min_psnr_db: float = Field(45.0, gt=0)
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
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"HNDSR_{field.upper()}"


def load_settings(**overrides) -> Settings:
    """The settings from the environment (and `overrides`, by field name); SettingsError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}  # a field typed as a union fails once per member: one line each
        for error in exc.errors():
            where = [str(part) for part in error["loc"]]
            field = where[0] if where and where[0] in Settings.model_fields else None
            message = error["msg"].removeprefix("Value error, ")
            key = f"{env_name(field)}={error.get('input')!r}: " if field else ""
            problems.setdefault(key, [])
            if message not in problems[key]:
                problems[key].append(message)
        lines = [key + " or ".join([first] + [m.removeprefix("Input should be ") for m in rest])
                 for key, (first, *rest) in problems.items()]
        raise SettingsError("; ".join(lines)) from None
