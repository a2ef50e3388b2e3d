"""Prometheus metrics of this server process."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from serving.state import StateDep

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    state.metrics.queue_pixels.set(state.engine.queued_pixels if state.engine else 0)
    state.metrics.queue_tiles.set(state.engine.queued_tiles if state.engine else 0)
    state.metrics.queue_capacity.set(state.engine.max_queue_pixels if state.engine else 0)
    state.metrics.ready.set(1 if state.ready and not state.draining and state.model is not None else 0)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/rollout", summary="the roll-out as this server sees it: weight, versions and their live numbers")
async def rollout_numbers(state: StateDep) -> dict:
    """Open like /metrics (counts and latencies, no images or keys); `hndsr registry rollout status --server`
    reads it."""
    settings = state.settings
    versions = {}
    for role, loaded in (("production", state.model), ("candidate", state.canary)):
        if loaded is not None:
            version = str(loaded.info["version"])
            versions[version] = {"role": role, "alias": loaded.info.get("alias"), **state.monitor.numbers(version)}
    for version in state.backed_out:
        versions.setdefault(version, {"role": "backed out", "alias": None, **state.monitor.numbers(version)})
    return {"weight": state.canary_weight, "configured_weight": settings.canary_weight,
            "alias": settings.canary_alias, "window_s": settings.canary_window_s, "versions": versions,
            "backed_out": state.backed_out,
            "thresholds": {"min_requests": settings.canary_min_requests,
                           "max_error_ratio": settings.canary_max_error_ratio,
                           "max_latency_ratio": settings.canary_max_latency_ratio,
                           "max_consistency_drop_db": settings.canary_max_consistency_drop_db}}
