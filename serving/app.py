"""The HTTP API (FastAPI). Nothing happens at import time: `create_app(settings)` builds the app and its
lifespan loads and warms the model, so a model that cannot be loaded stops start-up with the reason.

    GET  /healthz             the process is alive                                  (routers/health.py)
    GET  /readyz              200 when a model is loaded and warm and the server is not draining, else 503
    POST /v1/super-resolve    multipart: file=<image or raster>, scale=<real>, steps, seed, format, bands (optional)
    GET  /v1/model            the loaded version, alias, run id, dataset hash, metrics  (routers/inference.py)
    GET  /metrics             Prometheus metrics                                    (routers/metrics.py)
    GET  /                    the web page (serving/ui: plain HTML, CSS and JavaScript, nothing from elsewhere)
    GET  /docs, /redoc        OpenAPI docs (/openapi.json), their scripts served from the package (fastapi-offline)

Every client error is a 4xx JSON body {"error": <code>, "detail": <what to fix>} (serving/errors.py); the server
keeps serving. Settings: serving/settings.py. State and dependencies: serving/state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from inference import acceleration, loader
from inference import runtime as engine_start
from serving import rollout, runtime
from serving.errors import error_response, install_handlers
from serving.routers import health, inference, metrics
from serving.settings import Settings, load_settings
from serving.state import VERSION, State, request_client

log = logging.getLogger("hndsr.serving")

UI = Path(__file__).with_name("ui")
_ROUTES = {"/healthz", "/readyz", "/v1/super-resolve", "/v1/model", "/metrics", "/rollout"}  # metric labels; others: "other"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    state = State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        acceleration.keep_freed_memory()
        if state.preloaded is not None:  # `hndsr serve` started it before uvicorn (start-up errors are one line)
            state.model, state.engine = state.preloaded
            state.preloaded = None
        else:
            try:
                state.model, state.engine = await asyncio.to_thread(engine_start.start, settings,
                                                                    on_batch=state.metrics.batch_size.observe)
            except loader.ModelLoadError as exc:
                log.error("cannot load the model, not starting: %s", exc)
                raise
        state.metrics.set_model(state.model.info)
        state.ready = True
        canary = asyncio.create_task(_follow_canary(state))  # in the background: production serves meanwhile
        poller = asyncio.create_task(_poll(state)) if settings.poll_s > 0 else None
        try:
            yield
        finally:
            state.ready, state.draining = False, True
            canary.cancel()
            if poller is not None:
                poller.cancel()
            state.engine.close()

    # The docs pages load Swagger UI / ReDoc from the installed package, not a CDN: they work on air-gapped hosts.
    app: FastAPI = FastAPIOffline(title="HNDSR super-resolution", version="1", lifespan=lifespan,
                                  static_url="/docs-assets",
                                  description="Continuous-scale satellite-image super-resolution (HNDSR: neural "
                                              "operator prior refined by DDIM diffusion).")
    app.state.hndsr = state
    install_handlers(app, on_client_error=lambda code: state.metrics.rejections.labels(reason=code).inc())
    for router in (health.router, inference.router, metrics.router):
        app.include_router(router)
    app.mount("/ui-assets", StaticFiles(directory=UI), name="ui-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page; its policy allows nothing but this server (and the images it makes in the browser)."""
        return FileResponse(UI / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'"})

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = request.scope["hndsr.start"] = time.perf_counter()
        route = request.url.path if request.url.path in _ROUTES else "other"
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            response = error_response(500, "internal_error", "the server failed on this request; it was logged")
        version = request.scope.get(VERSION, "")
        state.metrics.requests.labels(route=route, status=str(response.status_code), version=version).inc()
        client = request_client(request)
        if client is not None:
            state.metrics.client_requests.labels(client=client.name, status=str(response.status_code)).inc()
        state.metrics.latency.labels(route=route, version=version).observe(time.perf_counter() - start)
        return response

    return app


async def _poll(state: State) -> None:
    """Follow the aliases: load and warm a new version in the background, then swap it in; the same for the
    roll-out's candidate."""
    while True:
        await asyncio.sleep(state.settings.poll_s)
        await _follow_production(state)
        await _follow_canary(state)


async def _follow_production(state: State) -> None:
    """Load the version the production alias points to now, if it is not the one served (runtime.load_version:
    checked, and never retried at every poll when it fails)."""
    settings = state.settings
    version = await runtime.read_alias(state, settings.model_uri)
    if version is None or state.model is None or version == str(state.model.info["version"]):
        return
    new = await runtime.load_version(state, settings.model_uri, version, "production")
    if new is None:
        return
    state.model = new  # requests admitted earlier keep the model they captured
    state.metrics.set_model(new.info)
    state.metrics.reloads.labels(outcome="loaded").inc()
    log.info("now serving version %s", version)


async def _follow_canary(state: State) -> None:
    try:
        async with state.canary_lock:
            await rollout.follow_canary(state)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # production keeps serving every client
        state.metrics.reloads.labels(outcome="failed").inc()
        log.error("cannot load the roll-out candidate (%s); production serves every client: %s",
                  state.settings.canary_alias, exc)

