"""The server's side of a gradual roll-out (docs/tutorials/rollout.md): loading the candidate the
roll-out alias points to, choosing a version per request, and backing the candidate out when it does worse
than production (the rules: serving/canary.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
from datetime import UTC, datetime

import numpy as np
from fastapi import Request

from inference import loader
from inference.engine import LoadedModel, Preempted
from serving import runtime
from serving.canary import bucket
from serving.state import State, request_client

log = logging.getLogger("hndsr.serving")


async def follow_canary(state: State) -> None:
    """Load the version the roll-out alias points to, unless it is production or was backed out (by this process,
    or by any server before: the `canary.backed_out` tag on the version); drop the candidate when the alias is
    removed or moved to production."""
    settings = state.settings
    uri = loader.alias_uri(settings.model_uri, settings.canary_alias)
    if uri is None or (settings.canary_weight <= 0 and settings.shadow_share <= 0) or state.model is None:
        return
    version = await runtime.read_alias(state, uri)
    current = str(state.canary.info["version"]) if state.canary is not None else None
    if version is None or version == str(state.model.info["version"]):
        if current is not None and not state.registry_down:
            log.info("roll-out of version %s ended (%s %s); every client goes to production", current, uri,
                     "removed" if version is None else "now production")
            _drop(state, current)
        return
    if version == current or version in state.backed_out:
        return
    # Backed out by this or another server (or before a restart): recorded on the version in the registry.
    try:
        why = await asyncio.to_thread(loader.backed_out, settings.model_uri, version)
    except loader.RegistryUnavailable as exc:
        log.warning("cannot read version %s's record from the registry; trying again at the next poll: %s", version,
                    exc)
        return
    if why is not None:
        state.backed_out[version] = why
        log.warning("%s points to version %s, which was backed out of a roll-out (%s); not loading it: every "
                    "client goes to production (move %s to another version to start a new roll-out)", uri, version,
                    why, settings.canary_alias)
        if current is not None:
            _drop(state, current)
        return
    candidate = await runtime.load_version(state, uri, version, "roll-out candidate")
    if candidate is None:
        return
    if current is not None:
        _drop(state, current)
    state.canary, state.canary_weight = candidate, settings.canary_weight
    state.metrics.canary_weight.set(state.canary_weight)
    if settings.shadow_share > 0:
        log.info("shadowing %.0f %% of production requests on version %s (answers from production only)",
                 100 * settings.shadow_share, version)
    else:
        log.info("rolling out version %s to %.0f %% of clients (sticky per client)", version,
                 100 * state.canary_weight)


def _drop(state: State, version: str, *, forget: bool = True) -> None:
    state.canary, state.canary_weight = None, 0.0
    state.metrics.canary_weight.set(0)
    if forget:  # a backed-out version's numbers stay on /rollout
        state.monitor.forget(version)


def identity(request: Request) -> str:
    """Who the client is, for sticky routing: its named key, else its API key (hashed), else its address."""
    client = request_client(request)
    if client is not None:
        return f"client:{client.name}"
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()
    return f"address:{request.client.host if request.client else ''}"


def choose(state: State, request: Request) -> LoadedModel:
    """The model this request goes to: the candidate for the clients below the weight, else production."""
    canary = state.canary
    if canary is not None and state.canary_weight > 0 and bucket(identity(request)) < state.canary_weight:
        return canary
    return state.model


def shadow(state: State, lr, scale: float, steps: int, seed: int, answer) -> None:
    """Maybe run this production request on the candidate too, in the background: only when a shadow share is
    set, the draw falls in it, no other shadow run is in flight and the engine has no client work waiting;
    never delays or fails the production answer (inference/engine.py preempts it for client work)."""
    candidate, production = state.canary, state.model
    share = state.settings.shadow_share
    if candidate is None or share <= 0 or random.random() >= share:
        return
    version = str(candidate.info["version"])
    if candidate.model.data != production.model.data \
            or not candidate.model.min_scale <= scale <= candidate.model.max_scale:
        state.metrics.shadow.labels(candidate=version, outcome="skipped").inc()  # other bands or scale range
        return
    if state.shadow_running or state.engine.queued_tiles > 0:
        state.metrics.shadow.labels(candidate=version, outcome="dropped").inc()
        return
    state.shadow_running = True
    task = asyncio.get_running_loop().create_task(
        _shadow(state, candidate, str(production.info["version"]), lr, scale, steps, seed, answer))
    state.background.add(task)
    task.add_done_callback(state.background.discard)


async def _shadow(state: State, candidate: LoadedModel, production: str, lr, scale, steps, seed, answer) -> None:
    version = str(candidate.info["version"])
    try:
        steps = min(steps, state.settings.max_steps)
        job = state.engine.submit(candidate, lr, scale, steps, seed, state.settings.deadline_s, background=True)
        output = await asyncio.wrap_future(job.future)
        state.metrics.shadow_seconds.labels(candidate=version).observe(time.monotonic() - job.submitted)
        if output.shape == answer.shape:
            mse = float(np.mean((output.astype(np.float64) - answer) ** 2))
            state.metrics.shadow_psnr.labels(production=production, candidate=version).observe(
                99.0 if mse == 0 else 10 * math.log10(1.0 / mse))
        state.metrics.shadow.labels(candidate=version, outcome="compared").inc()
    except Preempted:
        state.metrics.shadow.labels(candidate=version, outcome="preempted").inc()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the candidate's failure is a number, never the client's problem
        state.metrics.shadow.labels(candidate=version, outcome="failed").inc()
        log.warning("shadow run on candidate version %s failed: %s", version, exc)
    finally:
        state.shadow_running = False


def judge(state: State) -> None:
    """Back the candidate out if its window says so (called after each candidate outcome)."""
    canary, production = state.canary, state.model
    if canary is None or production is None:
        return
    version = str(canary.info["version"])
    verdict = state.monitor.verdict(version, str(production.info["version"]))
    if verdict is None:
        return
    why, numbers = verdict
    _drop(state, version, forget=False)
    state.backed_out[version] = why
    state.metrics.canary_backouts.labels(version=version).inc()
    log.warning("backed out roll-out candidate version %s: %s; every client goes to production version %s "
                "(production not moved)", version, why, production.info["version"])
    tags = {"canary.backed_out": "true", "canary.backed_out.at": datetime.now(UTC).isoformat(timespec="seconds"),
            "canary.backed_out.reason": why[:4000], "canary.backed_out.numbers": json.dumps(numbers)[:4000]}
    task = asyncio.get_running_loop().create_task(_record(state, version, tags))
    state.background.add(task)
    task.add_done_callback(state.background.discard)


async def _record(state: State, version: str, tags: dict[str, str]) -> None:
    try:
        await asyncio.to_thread(loader.record_backout, state.settings.model_uri, version, tags)
        log.info("recorded the back-out on version %s in the registry", version)
    except Exception as exc:  # noqa: BLE001 - the back-out itself has happened; the record is best effort
        log.error("could not record the back-out of version %s in the registry: %s", version, exc)
