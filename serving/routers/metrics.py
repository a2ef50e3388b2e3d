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
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
