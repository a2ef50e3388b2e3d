"""Server settings, all from the environment (so the container is configured the same way).

| variable | default | meaning |
|---|---|---|
| `MODEL_URI` | `models:/hndsr@production` | a registry alias or version, or a local folder (an exported model) |
| `MLFLOW_TRACKING_URI` | `sqlite:///mlflow.db` | where `models:/` URIs are resolved |
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

import os
from dataclasses import dataclass, fields


class SettingsError(ValueError):
    """A setting has a value the server cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    model_uri: str = "models:/hndsr@production"
    device: str = "auto"
    api_key: str | None = None
    max_upload_bytes: int = 20_000_000
    max_input_pixels: int = 4_000_000
    max_output_pixels: int = 16_000_000
    max_queue_pixels: int = 64_000_000
    max_steps: int = 50
    tile: int = 64
    tile_overlap: int = 8
    max_batch: int = 8
    deadline_s: float = 120.0
    poll_s: float = 30.0
    drain_s: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict = {}
        for f in fields(cls):
            name = "MODEL_URI" if f.name == "model_uri" else f"HNDSR_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            if f.type in ("int", "float"):
                try:
                    value = int(raw) if f.type == "int" else float(raw)
                except ValueError:
                    raise SettingsError(f"{name}={raw!r} is not a number") from None
                if value <= 0 and f.name != "poll_s":
                    raise SettingsError(f"{name} must be positive, got {raw}")
                values[f.name] = value
            else:
                values[f.name] = raw
        settings = cls(**values)
        if not 2 <= settings.tile_overlap < settings.tile // 2:
            raise SettingsError("HNDSR_TILE_OVERLAP must be at least 2 and below half of HNDSR_TILE")
        if settings.max_queue_pixels < settings.max_output_pixels:
            raise SettingsError("HNDSR_MAX_QUEUE_PIXELS must be at least HNDSR_MAX_OUTPUT_PIXELS")
        return settings
