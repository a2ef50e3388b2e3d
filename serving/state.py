"""What a running server holds (settings, the model being served, the engine, readiness) and the FastAPI
dependencies the routers use to reach it. Tests can override `get_settings` like any dependency."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from serving.engine import Engine, LoadedModel
from serving.errors import ClientError
from serving.metrics import Metrics
from serving.settings import Settings


class State:
    """The server's state; `model` is swapped whole by the hot reload, so a request keeps the one it took."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False
        self.preloaded: tuple[LoadedModel, Engine] | None = None  # started before the app (by `hndsr serve`)


def get_state(request: Request) -> State:
    return request.app.state.hndsr


StateDep = Annotated[State, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With HNDSR_API_KEY set, the request must send `Authorization: Bearer <key>` (401 otherwise)."""
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ClientError(401, "unauthorized", "send the API key as `Authorization: Bearer <key>`",
                          {"WWW-Authenticate": "Bearer"})
