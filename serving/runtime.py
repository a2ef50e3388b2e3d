"""Loading the model and starting the engine from settings: the one start-up shared by `hndsr serve` and
`hndsr predict`, so both run the same model checks, pass budget, batch size and workers."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from hndsr.degradation import hr_size
from serving import acceleration, loader
from serving.engine import Engine, LoadedModel, smallest_tile
from serving.settings import Settings
from serving.state import LoadFailure, State

RETRY_MIN_S, RETRY_MAX_S = 5.0, 600.0  # the first and the longest wait before a failed version is tried again

log = logging.getLogger("hndsr.serving")


def load_options(settings: Settings, max_batch: int) -> dict:
    """How loader.load checks a model's cheaper arithmetic (the batch size warms a compiled graph)."""
    return {"precision": settings.precision, "compile": settings.compile, "min_psnr_db": settings.min_psnr_db,
            "max_batch": max_batch}


def check_budget(loaded: LoadedModel, pass_pixels: int, overlap: int) -> None:
    """ModelLoadError unless the pass budget holds the smallest tile at the model's largest scale (so every
    request the model accepts has a tile plan)."""
    scale = loaded.model.max_scale
    smallest = hr_size(smallest_tile(overlap), scale) ** 2
    if smallest > pass_pixels:
        raise loader.ModelLoadError(
            f"HNDSR_PASS_MEGAPIXELS={pass_pixels / 1e6:g} is too small for this model: the smallest tile at its "
            f"largest scale (x{scale:g}) has {smallest / 1e6:.3f} output megapixels")


def start(settings: Settings, *, on_batch: Callable[[int], None] | None = None,
          calibrate: bool = True) -> tuple[LoadedModel, Engine]:
    """Load settings.model_uri on settings.device (checked and warmed), size the engine and start it; `calibrate`:
    measure the model's speed on it (Engine.calibrate), which the server's admission needs.
    Raises loader.ModelLoadError with the reason when the model cannot be loaded or does not fit the budget."""
    device = loader.pick_device(settings.device)
    max_batch = acceleration.default_max_batch(settings.max_batch, device)
    model = loader.load(settings.model_uri, device, **load_options(settings, max_batch))
    budget = acceleration.pass_megapixels(settings.pass_megapixels, model.model, device, model.acceleration)
    pass_pixels = int(budget * 1e6)
    check_budget(model, pass_pixels, settings.tile_overlap)
    workers = acceleration.default_workers(settings.workers, device)
    engine = Engine(device, pass_pixels=pass_pixels, overlap=settings.tile_overlap, max_batch=max_batch,
                    workers=workers, max_queue_pixels=settings.max_queue_pixels,
                    self_ensemble=settings.self_ensemble, on_batch=on_batch)
    if calibrate:  # the server refuses what could not finish by its deadline; batch prediction has none
        engine.calibrate(model)
        model.info["speed"] = model.speed.to_dict()
    log.info("engine on %s: passes of up to %.2f output megapixels (an image whose output fits is one tile), "
             "up to %d tiles per pass, %d passes in flight, tile overlap %d px%s", device, budget, max_batch,
             workers, settings.tile_overlap,
             ", self-ensemble on (8 passes per tile: 8x the time)" if settings.self_ensemble else "")
    return model, engine


async def read_alias(state: State, uri: str) -> str | None:
    """The version alias URI `uri` points to now; None when it points nowhere or the registry cannot be read now
    (unreachable, a locked database: no reload happens and nothing has failed; one line when it starts, one when
    it ends, counted in hndsr_registry_errors_total)."""
    try:
        version = await asyncio.to_thread(loader.current_version, uri)
    except loader.RegistryUnavailable as exc:
        state.metrics.registry_errors.inc()
        if not state.registry_down:
            log.warning("cannot read %s from the registry; still serving what is loaded (tried again every %g s): %s",
                        uri, state.settings.poll_s, exc)
        state.registry_down = True
        return None
    if state.registry_down:
        log.info("the registry answers again")
        state.registry_down = False
    return version


async def load_version(state: State, uri: str, version: str, role: str) -> LoadedModel | None:
    """Load registered `version` through alias URI `uri` for `role` (production, or the roll-out candidate) with
    the server's settings, or None when it cannot be (what is served stays). Outcomes in
    hndsr_model_reloads_total: loaded; refused (a weight file is not the one registered: counted per version in
    hndsr_model_integrity_failures_total and never tried again by this process); failed (any other reason: tried
    again after a back-off doubling from RETRY_MIN_S (or HNDSR_POLL_S if longer) up to RETRY_MAX_S, not at every poll)."""
    failure = state.load_failures.get(version)
    if failure is not None and (failure.permanent or time.monotonic() < failure.retry_at):
        return None
    serving = state.model.info["version"] if state.model is not None else "?"
    log.info("%s points to version %s; loading it as the %s", uri, version, role)
    try:
        new = await asyncio.to_thread(loader.load, uri, state.model.device, version=version,
                                      **load_options(state.settings, state.engine.max_batch))
        check_budget(new, state.engine.pass_pixels, state.settings.tile_overlap)
        await asyncio.to_thread(state.engine.calibrate, new)
        new.info["speed"] = new.speed.to_dict()
    except asyncio.CancelledError:
        raise
    except loader.ModelIntegrityError as exc:
        state.load_failures[version] = LoadFailure(str(exc), 1, math.inf, permanent=True)
        state.metrics.reloads.labels(outcome="refused").inc()
        state.metrics.integrity_failures.labels(version=version).inc()
        log.error("refused version %s as the %s, still serving version %s: %s (not tried again by this process; "
                  "restart it once the artifacts are restored)", version, role, serving, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - what is served keeps serving; the reason is logged
        attempts = failure.attempts + 1 if failure is not None else 1
        delay = min(RETRY_MAX_S, max(state.settings.poll_s, RETRY_MIN_S) * 2 ** (attempts - 1))
        state.load_failures[version] = LoadFailure(str(exc), attempts, time.monotonic() + delay)
        state.metrics.reloads.labels(outcome="failed").inc()
        log.error("loading version %s as the %s failed, still serving version %s (tried again in %.0f s): %s",
                  version, role, serving, delay, loader.first_line(exc))
        return None
    state.load_failures.pop(version, None)
    return new
