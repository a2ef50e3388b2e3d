"""What a running server holds (settings, the model being served, the engine, readiness) and the FastAPI
dependencies the routers use to reach it. Tests can override `get_settings` like any dependency."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from serving.engine import Engine, LoadedModel
from serving.errors import ClientError
from serving.metrics import Metrics
from serving.settings import Settings

T = TypeVar("T")


class State:
    """The server's state; `model` is swapped whole by the hot reload, so a request keeps the one it took."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False  # SIGTERM came: new work gets 503, /readyz 503, requests in flight go on
        self.drain_over = asyncio.Event()  # the drain time ran out: requests still in flight are answered 503
        self.in_flight = 0  # super-resolve requests being read or computed
        self.preloaded: tuple[LoadedModel, Engine] | None = None  # started before the app (by `hndsr serve`)

    async def until_drained(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, unless the shutdown drain runs out first: then it is cancelled and the request is
        answered 503 with Retry-After (a load balancer retries it on another replica)."""
        work = asyncio.ensure_future(awaitable)
        if self.drain_over.is_set():
            work.cancel()
        else:
            over = asyncio.ensure_future(self.drain_over.wait())
            try:
                await asyncio.wait({work, over}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                work.cancel()
                raise
            finally:
                over.cancel()
            if work.done():
                return work.result()
            work.cancel()
        raise ClientError(503, "shutting_down", "the server is shutting down and this request did not finish within "
                          f"its drain time ({self.settings.drain_s:g} s, HNDSR_DRAIN_S); send it again",
                          {"Retry-After": "1"})


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
