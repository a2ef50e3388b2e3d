"""Liveness and readiness, for load balancers and orchestrators (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving.state import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is alive")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", summary="ready to serve: model loaded and warm, not draining",
            responses={503: {"description": "not ready"}})
async def readyz(state: StateDep) -> JSONResponse:
    if state.ready and not state.draining and state.model is not None:
        return JSONResponse({"status": "ready", "version": state.model.info["version"]})
    return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)
