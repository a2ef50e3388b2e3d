"""Reading the `/v1/super-resolve` request: a multipart body with the image (`file`) and the form fields `scale`,
`steps`, `seed`, `format` (png or tiff) and `bands` (1-based raster bands, e.g. 1,2,3). The byte limit is enforced while the body streams in, before it is parsed to the end, so a
client cannot make the server hold more than HNDSR_MAX_UPLOAD_BYTES of it."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from serving.errors import ClientError

# A body that was not what its headers said leaves the connection's byte stream in doubt: answer and close it,
# so bytes after a short Content-Length are never read as another request (which got a stray plain-text 400).
CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class Upload:
    image: bytes
    scale: float
    steps: int | None  # None: the model's default
    seed: int
    format: str | None = None  # png | tiff; None: by the input (inference/rasters.py)
    bands: list[int] | None = None  # 1-based bands of a raster to feed the model


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The upload of a super-resolve request, or a ClientError saying what is wrong with it."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ClientError(415, "not_multipart", "send multipart/form-data with a `file` field and a `scale` field "
                          f"(got content type {content_type or 'none'!r})")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ClientError(413, "upload_too_large", f"the body is {declared} bytes, above the limit of {max_bytes}")
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise ClientError(400, "bad_multipart", "the Content-Type multipart/form-data has no boundary parameter, so "
                          "the parts cannot be found; let your HTTP client build the body (curl -F, "
                          "requests/httpx files=)", CLOSE)
    closing = b"\r\n--" + boundary + b"--"
    received, tail, closed = 0, b"", False

    async def limited() -> AsyncIterator[bytes]:
        nonlocal received, tail, closed
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise ClientError(413, "upload_too_large", f"the body is above the limit of {max_bytes} bytes")
            closed = closed or closing in tail + chunk  # the closing delimiter, even split across two chunks
            tail = (tail + chunk)[-len(closing):]
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # malformed multipart, too many parts
        if received == 0:
            raise ClientError(400, "empty_body", "the request body is empty; send the image as the `file` field") \
                from None
        raise ClientError(400, "bad_multipart", f"cannot parse the multipart body: {exc.message}", CLOSE) from None
    try:
        if received == 0:
            raise ClientError(400, "empty_body", "the request body is empty; send the image as the `file` field")
        if not closed:  # a Content-Length shorter than the body, or a body cut off: its parts cannot be trusted
            raise ClientError(400, "bad_multipart", f"the body ended after {received} bytes without the multipart's "
                              "closing boundary: it was cut short (is Content-Length the body's length?)", CLOSE)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ClientError(422, "missing_file", "the `file` field (the image, sent as a file part) is missing")
        data = await upload.read()
        if not data:
            raise ClientError(400, "empty_file", "the uploaded file is empty")
        scale = _number(form.get("scale"), "scale", float, required=True)
        steps = _number(form.get("steps"), "steps", int)
        seed = _number(form.get("seed"), "seed", int)
        fmt = _text(form.get("format"), "format")
        bands = _text(form.get("bands"), "bands")
    finally:
        await form.close()
    if not math.isfinite(scale):
        raise ClientError(422, "invalid_scale", "scale must be a finite number")
    if steps is not None and steps < 0:
        raise ClientError(422, "steps_out_of_range", f"steps must be 0 or more, got {steps}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ClientError(422, "invalid_seed", f"seed must be between 0 and 2^63-1, got {seed}")
    if fmt is not None and fmt.lower() not in ("png", "tiff", "tif", "geotiff"):
        raise ClientError(422, "invalid_format", f"format must be png or tiff, got {fmt[:20]!r}")
    fmt = None if fmt is None else "png" if fmt.lower() == "png" else "tiff"
    return Upload(data, scale, steps, seed or 0, fmt, None if bands is None else _band_list(bands))


def _text(value, name: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ClientError(422, f"invalid_{name}", f"`{name}` must be a plain form field, not a file")
    return value.strip()


def _band_list(text: str) -> list[int]:
    try:
        bands = [int(part) for part in text.split(",")]
    except ValueError:
        bands = []
    if not bands or min(bands) < 1:
        raise ClientError(422, "invalid_bands", f"`bands` must be 1-based band indexes like 1,2,3, got {text[:40]!r}")
    return bands


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
