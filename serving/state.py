"""What a running server holds (settings, the model being served, the engine, readiness) and the FastAPI
dependencies the routers use to reach it. Tests can override `get_settings` like any dependency."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from inference.engine import Engine, LoadedModel
from serving.canary import Monitor
from serving.clients import Client, ClientsError, Quotas, load_clients
from serving.drift import Drift
from serving.errors import ClientError
from serving.metrics import Metrics
from serving.settings import Settings, SettingsError

T = TypeVar("T")


@dataclass
class LoadFailure:
    """A version the hot reload could not load: why, how often, when to try again (never, if `permanent`)."""

    reason: str
    attempts: int
    retry_at: float  # time.monotonic()
    permanent: bool = False


class State:
    """The server's state; `model` is swapped whole by the hot reload, so a request keeps the one it took."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        try:  # named clients with quotas, or None (one shared key, or none)
            self.quotas = Quotas(load_clients(settings.api_keys_file)) if settings.api_keys_file else None
        except ClientsError as exc:
            raise SettingsError(f"HNDSR_API_KEYS_FILE={settings.api_keys_file!r}: {exc}") from None
        self.model: LoadedModel | None = None
        # A gradual roll-out (serving/canary.py): the candidate version, the share of clients it gets now (0 once
        # backed out), the versions backed out (never loaded again by this process) and the outcome window.
        self.canary: LoadedModel | None = None
        self.canary_weight = 0.0  # settings.canary_weight once a candidate is loaded
        self.backed_out: dict[str, str] = {}
        self.background: set[asyncio.Task] = set()  # tasks kept alive until done (registry records, shadow runs)
        self.shadow_running = False  # one shadow run at a time
        self.monitor = Monitor(settings.canary_window_s, settings.canary_min_requests,
                               settings.canary_max_error_ratio, settings.canary_max_latency_ratio,
                               settings.canary_max_consistency_drop_db)
        self.drift = Drift(self.metrics, settings.drift_window_s, settings.drift_window_requests)
        self.engine: Engine | None = None
        self.canary_lock = asyncio.Lock()  # one roll-out follow at a time (start-up's and the poll's may overlap)
        self.load_failures: dict[str, LoadFailure] = {}  # versions the hot reload could not load (serving/app.py)
        self.registry_down = False  # the last poll could not read the registry
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


CLIENT = "hndsr.client"  # the ASGI scope key of the named client a request came from (serving/clients.py)
VERSION = "hndsr.version"  # the ASGI scope key of the model version that answered (a metrics label)


def require_api_key(request: Request, state: StateDep, settings: SettingsDep) -> None:
    """With HNDSR_API_KEYS_FILE, the request must send one of the clients' keys as `Authorization: Bearer <key>`
    (the client is put in the scope for quotas and metrics); with HNDSR_API_KEY, that key; else nothing. 401
    otherwise."""
    if state.quotas is None and not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if state.quotas is not None:
        client = state.quotas.identify(token) if token else None
        if client is not None:
            request.scope[CLIENT] = client
            return
    elif token and hmac.compare_digest(token.encode(), settings.api_key.encode()):
        return
    raise ClientError(401, "unauthorized", "send your API key as `Authorization: Bearer <key>`"
                      + (" (this key is not known)" if token else ""), {"WWW-Authenticate": "Bearer"})


def request_client(request: Request) -> Client | None:
    """The named client of this request (after require_api_key), or None."""
    return request.scope.get(CLIENT)
