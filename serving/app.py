"""The HTTP API (FastAPI). Nothing happens at import time: `create_app(settings)` builds the app and its
lifespan loads and warms the model, so a model that cannot be loaded stops start-up with the reason.

    GET  /healthz             the process is alive
    GET  /readyz              200 when a model is loaded and warm and the server is not draining, else 503
    POST /v1/super-resolve    multipart: file=<image>, scale=<real>, steps=<int, optional>, seed=<int, optional>
    GET  /v1/model            the loaded version, alias, run id, dataset hash, metrics, default steps
    GET  /metrics             Prometheus metrics
    GET  /docs                OpenAPI docs (/openapi.json)

Every client error is a 4xx JSON body {"error": <code>, "detail": <what to fix>}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hndsr.degradation import hr_size
from hndsr.images import ImageDecodeError, decode_rgb, encode_png
from serving import loader
from serving.engine import DeadlineExceeded, Engine, LoadedModel, Overloaded
from serving.metrics import Metrics
from serving.settings import Settings

log = logging.getLogger("hndsr.serving")

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file", "scale"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "PNG, JPEG or TIFF image"},
                "scale": {"type": "number", "description": "scale factor within the model's range, e.g. 4 or 2.5"},
                "steps": {"type": "integer", "minimum": 0,
                          "description": "DDIM steps; 0 = prior only; default: the model's validated default"},
                "seed": {"type": "integer", "minimum": 0, "description": "sampling seed (default 0)"},
            },
        }}},
    },
    "responses": {"200": {"description": "the super-resolved image", "content": {"image/png": {}}}},
}


class ClientError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class State:
    """What the running server holds: settings, the current model, the engine, readiness."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    state = State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            device = loader.pick_device(settings.device)
            state.model = await asyncio.to_thread(loader.load, settings.model_uri, device)
        except loader.ModelLoadError as exc:
            log.error("cannot load the model, not starting: %s", exc)
            raise
        state.metrics.set_model(state.model.info)
        state.engine = Engine(device, tile=settings.tile, overlap=settings.tile_overlap,
                              max_batch=settings.max_batch, max_queue_pixels=settings.max_queue_pixels,
                              on_batch=state.metrics.batch_size.observe)
        state.ready = True
        poller = asyncio.create_task(_poll(state)) if settings.poll_s > 0 else None
        try:
            yield
        finally:
            state.ready, state.draining = False, True
            if poller is not None:
                poller.cancel()
            state.engine.close()

    app = FastAPI(title="HNDSR super-resolution", version="1", lifespan=lifespan,
                  description="Continuous-scale satellite-image super-resolution (HNDSR: neural operator prior "
                              "refined by DDIM diffusion).")
    app.state.hndsr = state

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        state.metrics.rejections.labels(reason=exc.code).inc()
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc.errors()))

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        route = request.url.path if request.url.path in _ROUTES else "other"
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            response = _error(500, "internal_error", "the server failed on this request; it was logged")
        state.metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        state.metrics.latency.labels(route=route).observe(time.perf_counter() - start)
        return response

    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="ready to serve: model loaded and warm, not draining",
             responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        if state.ready and not state.draining and state.model is not None:
            return JSONResponse({"status": "ready", "version": state.model.info["version"]})
        reason = "draining" if state.draining else "loading"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/v1/model", summary="the model being served", responses={401: {"description": "API key needed"}})
    async def model_info(request: Request) -> JSONResponse:
        _authorize(request, settings)
        assert state.model is not None
        return JSONResponse(state.model.info)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        state.metrics.queue_pixels.set(state.engine.queued_pixels if state.engine else 0)
        state.metrics.queue_tiles.set(state.engine.queued_tiles if state.engine else 0)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/super-resolve", summary="super-resolve one image", openapi_extra=UPLOAD_SCHEMA,
              response_class=Response, responses={
                  400: {"description": "bad input"}, 401: {"description": "API key needed"},
                  413: {"description": "too large"}, 415: {"description": "not multipart or not an image"},
                  422: {"description": "bad parameter"}, 503: {"description": "busy; retry after Retry-After"},
                  504: {"description": "deadline passed"}})
    async def super_resolve(request: Request) -> Response:
        _authorize(request, settings)
        if state.draining or state.engine is None or state.model is None:
            raise ClientError(503, "not_ready", "the server is shutting down or not ready; retry elsewhere",
                              {"Retry-After": "5"})
        data, scale, steps, seed = await _read_upload(request, state)
        model = state.model  # captured now: a hot swap never changes the model of a request in flight
        low, high = model.model.min_scale, model.model.max_scale
        if not low <= scale <= high:
            raise ClientError(422, "scale_out_of_range", f"scale must be between {low:g} and {high:g}, got {scale:g}")
        steps = model.model.defaults.steps if steps is None else steps
        if steps > settings.max_steps:
            raise ClientError(422, "steps_out_of_range", f"steps must be between 0 and {settings.max_steps}, "
                              f"got {steps}")
        try:
            pixels = await asyncio.to_thread(decode_rgb, data, max_pixels=settings.max_input_pixels)
        except ImageDecodeError as exc:
            message = str(exc)
            if message.startswith("too many pixels"):
                raise ClientError(413, "input_too_large", f"{message}; send a smaller image") from None
            if message.startswith("unsupported format") or message.startswith("not a recognised image"):
                raise ClientError(415, "unsupported_image", f"{message}; send a PNG, JPEG or TIFF") from None
            raise ClientError(400, "bad_image", message) from None
        out_h, out_w = hr_size(pixels.shape[0], scale), hr_size(pixels.shape[1], scale)
        if out_h * out_w > settings.max_output_pixels:
            raise ClientError(413, "output_too_large", f"the output would be {out_w}x{out_h} = {out_h * out_w} "
                              f"pixels, above the limit of {settings.max_output_pixels}; use a smaller image or scale")
        start = time.perf_counter()
        try:
            job = state.engine.submit(model, pixels, scale, steps, seed, settings.deadline_s)
        except Overloaded as exc:
            raise ClientError(503, "overloaded", str(exc), {"Retry-After": "2"}) from None
        try:
            output = await asyncio.wrap_future(job.future)
        except DeadlineExceeded as exc:
            raise ClientError(504, "deadline_exceeded", f"{exc} ({settings.deadline_s:g} s)") from None
        except Overloaded as exc:
            raise ClientError(503, "overloaded", str(exc), {"Retry-After": "5"}) from None
        elapsed = time.perf_counter() - start
        body = await asyncio.to_thread(encode_png, output)
        state.metrics.images.inc()
        state.metrics.pixels.inc(out_h * out_w)
        return Response(body, media_type="image/png", headers={
            "X-Model-Version": str(model.info["version"]), "X-Model-Alias": str(model.info.get("alias") or ""),
            "X-Inference-Time-Ms": f"{elapsed * 1000:.1f}", "X-Output-Size": f"{out_w}x{out_h}",
            "X-Scale": f"{scale:g}", "X-Steps": str(steps), "X-Seed": str(seed)})

    return app


_ROUTES = {"/healthz", "/readyz", "/v1/super-resolve", "/v1/model", "/metrics"}


def _authorize(request: Request, settings: Settings) -> None:
    if not settings.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ClientError(401, "unauthorized", "send the API key as `Authorization: Bearer <key>`",
                          {"WWW-Authenticate": "Bearer"})


async def _read_upload(request: Request, state: State) -> tuple[bytes, float, int | None, int]:
    """Read the multipart body, enforcing the byte limit while streaming; return (image, scale, steps, seed)."""
    settings = state.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ClientError(415, "not_multipart", "send multipart/form-data with a `file` field and a `scale` field "
                          f"(got content type {content_type or 'none'!r})")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise ClientError(413, "upload_too_large", f"the body is {declared} bytes, above the limit of "
                          f"{settings.max_upload_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_upload_bytes:
            raise ClientError(413, "upload_too_large", f"the body is above the limit of {settings.max_upload_bytes} "
                              "bytes")
        chunks.append(chunk)
    if size == 0:
        raise ClientError(400, "empty_body", "the request body is empty; send the image as the `file` field")
    request._body = b"".join(chunks)  # Starlette's form parser reads the buffered body
    try:
        form = await request.form(max_files=1, max_fields=10)
    except Exception as exc:  # malformed multipart, too many parts
        raise ClientError(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ClientError(422, "missing_file", "the `file` field (the image, sent as a file part) is missing")
    data = await upload.read()
    if not data:
        raise ClientError(400, "empty_file", "the uploaded file is empty")
    scale = _number(form.get("scale"), "scale", float, required=True)
    if not math.isfinite(scale):
        raise ClientError(422, "invalid_scale", "scale must be a finite number")
    steps = _number(form.get("steps"), "steps", int)
    seed = _number(form.get("seed"), "seed", int)
    if steps is not None and steps < 0:
        raise ClientError(422, "steps_out_of_range", f"steps must be 0 or more, got {steps}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ClientError(422, "invalid_seed", f"seed must be between 0 and 2^63-1, got {seed}")
    return data, scale, steps, seed or 0


def _number(value, name: str, kind, *, required: bool = False):
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ClientError(422, f"missing_{name}", f"the `{name}` field is missing")
        return None
    if not isinstance(value, str):
        raise ClientError(422, f"invalid_{name}", f"`{name}` must be a plain form field, not a file")
    try:
        return kind(value.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ClientError(422, f"invalid_{name}", f"`{name}` must be {what}, got {value[:40]!r}") from None


async def _poll(state: State) -> None:
    """Follow the alias: load and warm a new version in the background, then swap it in."""
    settings = state.settings
    while True:
        await asyncio.sleep(settings.poll_s)
        try:
            version = await asyncio.to_thread(loader.current_version, settings.model_uri)
            if version is None or state.model is None or version == str(state.model.info["version"]):
                continue
            log.info("%s now points to version %s; loading it", settings.model_uri, version)
            new = await asyncio.to_thread(loader.load, settings.model_uri, state.model.device, version=version)
            state.model = new  # requests admitted earlier keep the model they captured
            state.metrics.set_model(new.info)
            log.info("now serving version %s", version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the old model keeps serving
            log.error("hot reload failed, still serving version %s: %s",
                      state.model.info["version"] if state.model else "?", exc)
