"""The server's model life cycle after start-up (inference/runtime.py starts the engine): reading where an alias
points and loading a registered version for a role (production, or the roll-out candidate), with back-off."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from inference import loader
from inference.engine import LoadedModel
from inference.runtime import check_budget, load_options
from serving.state import LoadFailure, State

RETRY_MIN_S, RETRY_MAX_S = 5.0, 600.0  # the first and the longest wait before a failed version is tried again

log = logging.getLogger("hndsr.serving")


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
