"""Every error answer of the API, in one place: `ClientError` (raised anywhere in a request, answered as a 4xx or
503/504 JSON body `{"error": <code>, "detail": <what to fix>}`), the status and code of each kind of image that
cannot be decoded, and the handlers that turn FastAPI's own errors into the same body."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hndsr.images import ImageDecodeError, ImageTooLarge, UnsupportedFormat
from hndsr.raster import (
    BadGeoreference,
    BandMismatch,
    OutOfRange,
    RasterError,
    TooManyBands,
    UnsupportedDtype,
    UnsupportedOutput,
)
from serving.server import TIMED_OUT

log = logging.getLogger("hndsr.serving")

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer" (metrics only)


class ClientError(Exception):
    """A request the server will not serve: HTTP `status`, a stable `code`, a `detail` saying what to do."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


# Most specific first: (error type, status, code, what the client should do).
IMAGE_ERRORS: tuple[tuple[type[ImageDecodeError], int, str, str], ...] = (
    (ImageTooLarge, 413, "input_too_large", "send a smaller image"),
    (BandMismatch, 422, "wrong_bands", ""),
    (TooManyBands, 422, "too_many_bands", ""),
    (UnsupportedDtype, 422, "unsupported_dtype", "convert the raster to one of these types"),
    (OutOfRange, 422, "values_out_of_range", ""),
    (UnsupportedOutput, 422, "unsupported_output", ""),
    (BadGeoreference, 400, "bad_georeference", ""),
    (RasterError, 400, "bad_raster", "send a readable TIFF/GeoTIFF"),
    (UnsupportedFormat, 415, "unsupported_image", "send a PNG, JPEG or TIFF"),
    (ImageDecodeError, 400, "bad_image", ""),
)


def image_error(exc: ImageDecodeError) -> ClientError:
    """The answer to an image that cannot be decoded."""
    status, code, hint = next((s, c, h) for kind, s, c, h in IMAGE_ERRORS if isinstance(exc, kind))
    return ClientError(status, code, f"{exc}; {hint}" if hint else str(exc))


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def install_handlers(app: FastAPI, on_client_error) -> None:
    """Answer ClientError, HTTP errors and request validation errors with the API's JSON error body;
    `on_client_error(code)` counts each ClientError (the rejection metric)."""

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        on_client_error(exc.code)
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client went away (or stalled and was cut off) while sending its request: a client event, one
        line in the log, status 499 (408 when stalled) in the metrics; nothing is sent, there is no one to read
        it."""
        if request.scope.get(TIMED_OUT):  # serving/protocol.py logged it
            return Response(status_code=408)
        client = request.client
        since = request.scope.get("hndsr.start")
        log.info("%s closed the connection while sending %s %s%s; counted as %d",
                 f"{client.host}:{client.port}" if client else "a client", request.method, request.url.path,
                 f" ({time.perf_counter() - since:.1f} s in)" if since else "", CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc.errors()))
