"""The model API: what is being served (`GET /v1/model`) and super-resolution (`POST /v1/super-resolve`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from hndsr import imagefile, monitoring
from hndsr.degradation import hr_size
from hndsr.images import ImageDecodeError
from inference import rasters
from inference.engine import DeadlineExceeded, Overloaded
from serving import rollout
from serving.errors import ClientError, image_error
from serving.state import VERSION, StateDep, request_client, require_api_key
from serving.upload import read_upload

log = logging.getLogger("hndsr.serving")

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_api_key)],
                   responses={401: {"description": "API key needed"}})

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file", "scale"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "PNG, JPEG or TIFF/GeoTIFF (any data type and band count the model takes)"},
                "scale": {"type": "number", "description": "scale factor within the model's range, e.g. 4 or 2.5"},
                "steps": {"type": "integer", "minimum": 0,
                          "description": "DDIM steps; 0 = prior only; default: the model's validated default"},
                "seed": {"type": "integer", "minimum": 0, "description": "sampling seed (default 0)"},
                "format": {"type": "string", "enum": ["png", "tiff"],
                           "description": "answer format; default PNG for 8-bit RGB, GeoTIFF otherwise "
                                          "(or send Accept: image/tiff)"},
                "bands": {"type": "string", "description": "1-based raster bands to use, e.g. 1,2,3 "
                                                           "(default: every band but alpha)"},
            },
        }}},
    },
    "responses": {"200": {"description": "the super-resolved image (a GeoTIFF keeps the input's CRS, origin, "
                                         "data type, bands and nodata; pixel size / scale)",
                          "content": {"image/png": {}, "image/tiff": {}}}},
}


@router.get("/model", summary="the model being served")
async def model_info(state: StateDep) -> JSONResponse:
    if state.model is None:
        raise ClientError(503, "not_ready", "no model is loaded yet; retry shortly", {"Retry-After": "5"})
    engine = state.engine.describe() if state.engine is not None else None
    return JSONResponse({**state.model.info, "engine": engine})


@router.post("/super-resolve", summary="super-resolve one image", openapi_extra=UPLOAD_SCHEMA,
             response_class=Response, responses={
                 400: {"description": "bad input"}, 413: {"description": "too large"},
                 415: {"description": "not multipart or not an image"}, 422: {"description": "bad parameter"},
                 503: {"description": "busy; retry after Retry-After"}, 504: {"description": "deadline passed"}})
async def super_resolve(request: Request, state: StateDep) -> Response:
    if state.draining:
        raise ClientError(503, "shutting_down", "the server is shutting down; send the request again (a load "
                          "balancer sends it to another replica)", {"Retry-After": "1"})
    if state.engine is None or state.model is None:
        raise ClientError(503, "not_ready", "the model is not loaded yet; retry shortly", {"Retry-After": "5"})
    client = request_client(request)
    if client is not None:
        state.quotas.take(client, "requests", 1)  # before the upload is read: an over-quota client costs little
    state.in_flight += 1  # the shutdown drain waits for these (and answers 503 to those left when it runs out)
    try:
        return await _super_resolve(request, state)
    finally:
        state.in_flight -= 1


def _check_output(out_h: int, out_w: int, limit: int) -> None:
    if out_h * out_w > limit:
        raise ClientError(413, "output_too_large", f"the output would be {out_w}x{out_h} = {out_h * out_w} "
                          f"pixels, above the limit of {limit}; use a smaller image or scale")


def _check_time(state: StateDep, model, header, scale: float, steps: int, *, candidate: bool) -> None:
    """Refuse at once (413 `would_not_finish`) a request whose estimated time alone on this server (the model's
    speed measured at load, Engine.calibrate) is past the deadline, saying the largest input and the most steps
    that would finish; for a roll-out candidate, a failure of the candidate (production answers)."""
    settings = state.settings
    seconds = state.engine.estimate(model, header.height, header.width, scale, steps)
    if seconds is None or seconds <= settings.deadline_s:
        return
    if candidate:
        state.monitor.record(str(model.info["version"]), ok=False)
        rollout.judge(state)
        raise CandidateFailed() from RuntimeError(f"estimated {seconds:.0f} s, past the {settings.deadline_s:g} s "
                                                  "deadline")
    ratio = settings.deadline_s / seconds
    edge = math.isqrt(int(header.height * header.width * ratio))  # cost grows with the pixels
    speed = model.speed
    passes = seconds / (speed.fixed_s + steps * speed.step_s)  # full-budget passes' worth of work
    fewer = math.floor((settings.deadline_s / passes - speed.fixed_s) / speed.step_s) if speed.step_s > 0 else -1
    steps_hint = f", or at most {fewer} steps at this size" if 0 <= fewer < steps else ""
    raise ClientError(413, "would_not_finish", f"a {header.width}x{header.height} input at x{scale:g} with {steps} "
                      f"steps would take about {seconds:.0f} s on this server, past its deadline of "
                      f"{settings.deadline_s:g} s (HNDSR_DEADLINE_S): send at most about {edge}x{edge} px at this "
                      f"scale and steps{steps_hint}, or tile the scene (`hndsr predict` has no deadline)")


class CandidateFailed(Exception):
    """The roll-out candidate failed on this request; production answers it instead."""


async def _super_resolve(request: Request, state: StateDep) -> Response:
    upload = await state.until_drained(read_upload(request, state.settings.max_upload_bytes))
    model = rollout.choose(state, request)  # captured now: a hot swap never changes the model of a request in flight
    try:
        return await _answer(request, state, upload, model, candidate=model is not state.model)
    except CandidateFailed as failure:
        version = str(model.info["version"])
        state.metrics.canary_retries.labels(version=version).inc()
        log.warning("roll-out candidate version %s failed on a request (%s); production version %s answers it",
                    version, failure.__cause__, state.model.info["version"])
        return await _answer(request, state, upload, state.model, candidate=False, retry=True)


async def _answer(request: Request, state: StateDep, upload, model, *, candidate: bool,
                  retry: bool = False) -> Response:
    """Decode, check, run on `model` and encode; `candidate`: a server error raises CandidateFailed;
    `retry`: the quota was already taken for this request."""
    settings = state.settings
    version = str(model.info["version"])
    request.scope[VERSION] = version
    scale, seed = upload.scale, upload.seed
    low, high = model.model.min_scale, model.model.max_scale
    if not low <= scale <= high:
        raise ClientError(422, "scale_out_of_range", f"scale must be between {low:g} and {high:g}, got {scale:g}")
    steps = model.model.defaults.steps if upload.steps is None else upload.steps
    if steps > settings.max_steps:
        raise ClientError(422, "steps_out_of_range", f"steps must be between 0 and {settings.max_steps}, got {steps}")
    spec = model.model.data
    deadline = time.monotonic() + settings.deadline_s  # decoding and inference together
    limits = {"max_bands": settings.max_bands, "max_bytes_per_pixel": settings.max_bytes_per_pixel}
    try:  # the size from the header: limits, quota and admission before anything is decoded
        header = await asyncio.to_thread(imagefile.inspect, upload.image, settings.max_input_pixels, **limits)
    except ImageDecodeError as exc:
        raise image_error(exc) from None
    client = request_client(request)
    reserved = 0
    if header is not None:
        out_h, out_w = hr_size(header.height, scale), hr_size(header.width, scale)
        _check_output(out_h, out_w, settings.max_output_pixels)
        _check_time(state, model, header, scale, steps, candidate=candidate)
        if client is not None and not retry:
            state.quotas.take(client, "megapixels", out_h * out_w)
        try:
            state.engine.reserve(out_h * out_w)
        except Overloaded as exc:
            raise ClientError(503, "overloaded", str(exc), {"Retry-After": "2"}) from None
        reserved = out_h * out_w
    try:
        try:
            decoded = await asyncio.to_thread(imagefile.decode, upload.image, spec, upload.bands,
                                              settings.max_input_pixels, deadline=deadline, **limits)
            fmt = rasters.choose_format(upload.format, request.headers.get("accept", ""), decoded)
        except ImageDecodeError as exc:
            raise image_error(exc) from None
        except imagefile.DecodeTimeout as exc:
            raise ClientError(504, "deadline_exceeded", f"{exc} ({settings.deadline_s:g} s, HNDSR_DEADLINE_S); "
                              "send a smaller raster or fewer bands") from None
        in_h, in_w = decoded.lr.shape[:2]
        out_h, out_w = hr_size(in_h, scale), hr_size(in_w, scale)
        if not reserved:  # a header only the full decoder could read
            _check_output(out_h, out_w, settings.max_output_pixels)
            if client is not None and not retry:
                state.quotas.take(client, "megapixels", out_h * out_w)
        try:
            job = state.engine.submit(model, decoded.lr, scale, steps, seed, max(0.0, deadline - time.monotonic()),
                                      reserved=bool(reserved))
            reserved = 0  # the job holds it now, and releases it when it ends
        except Overloaded as exc:
            raise ClientError(503, "overloaded", str(exc), {"Retry-After": "2"}) from None
    finally:
        if reserved:
            state.engine.release(reserved)
    try:
        output = await state.until_drained(asyncio.wrap_future(job.future))
    except DeadlineExceeded as exc:  # a server error of this version too: the candidate's is answered by production
        state.monitor.record(version, ok=False)
        if candidate:
            rollout.judge(state)
            raise CandidateFailed() from exc
        raise ClientError(504, "deadline_exceeded", f"{exc} ({settings.deadline_s:g} s)") from None
    except ClientError:  # the shutdown drain ran out (State.until_drained)
        raise
    except Overloaded as exc:  # out of device memory
        raise ClientError(503, "overloaded", str(exc), {"Retry-After": "5"}) from None
    except Exception as exc:  # the model failed on this input: a server error of this version
        state.monitor.record(version, ok=False)
        if candidate:
            rollout.judge(state)
            raise CandidateFailed() from exc
        raise
    queued = (job.started or job.submitted) - job.submitted
    inference = (job.finished or time.monotonic()) - (job.started or job.submitted)
    # The answer's encoding and its label-free figures (hndsr.monitoring) side by side: the figures cost a shrink
    # of the output, a histogram and a small FFT, which mostly hide behind the encoding.
    body, assessment = await asyncio.gather(
        asyncio.to_thread(imagefile.encode, output, decoded, spec, scale, fmt,
                          png_compress_level=settings.png_compress_level,
                          tags={"HNDSR_MODEL_VERSION": version, "HNDSR_SCALE": f"{scale:.10g}",
                                "HNDSR_STEPS": str(steps), "HNDSR_SEED": str(seed)}),
        asyncio.to_thread(_assess, decoded, output, scale, model) if settings.monitoring else _nothing())
    state.monitor.record(version, ok=True, seconds=queued + inference, pixels=out_h * out_w,
                         consistency_db=assessment.consistency_psnr_db if assessment is not None else None)
    if candidate:
        rollout.judge(state)
    else:
        rollout.shadow(state, decoded.lr, scale, steps, seed, output)
    state.metrics.queue_wait.observe(queued)
    state.metrics.inference.observe(inference)
    figures = {}
    if assessment is not None:
        served = {str(m.info["version"]) for m in (state.model, state.canary) if m is not None}
        state.drift.observe(model, client.name if client is not None else "", assessment, served)
        figures = _figure_headers(assessment.to_dict(model.reference))
    state.metrics.images.inc()
    state.metrics.pixels.inc(out_h * out_w)
    if client is not None:
        state.metrics.client_pixels.labels(client=client.name).inc(out_h * out_w)
    return Response(body, media_type=rasters.FORMATS[fmt], headers={
        "X-Model-Version": version, "X-Model-Alias": str(model.info.get("alias") or ""),
        "X-Queue-Time-Ms": f"{queued * 1000:.1f}", "X-Inference-Time-Ms": f"{inference * 1000:.1f}",
        "X-Output-Size": f"{out_w}x{out_h}", "X-Scale": f"{scale:g}", "X-Steps": str(steps), "X-Seed": str(seed),
        **figures, **(state.quotas.headers(client) if client is not None else {})})


# The answer's label-free figures as response headers (hndsr.monitoring; absent: not computable for this input,
# e.g. no input reference for the version, or an input under 16 px for the shift).
FIGURE_HEADERS = {"consistency_psnr_db": "X-Consistency-PSNR-dB", "shift_px": "X-Consistency-Shift-Px",
                  "in_range_share": "X-Input-In-Range", "nodata_share": "X-Input-Nodata", "psi": "X-Input-PSI"}


def _figure_headers(figures: dict) -> dict[str, str]:
    return {header: f"{figures[key]:g}" for key, header in FIGURE_HEADERS.items() if figures.get(key) is not None}


async def _nothing() -> None:
    return None


def _assess(decoded, output, scale: float, model) -> monitoring.Assessment | None:
    """The answer's figures, or None if they cannot be computed (logged: the answer itself is good)."""
    try:
        return monitoring.assess(decoded.lr, decoded.valid, output, scale, model.reference)
    except Exception:  # noqa: BLE001 - monitoring never fails a request
        log.exception("could not compute the monitoring figures of an answer")
        return None
