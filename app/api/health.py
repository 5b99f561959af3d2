"""Operations routes: liveness, readiness and Prometheus metrics (no token)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import EngineDep

router = APIRouter(tags=["operations"])


@router.get("/health", summary="The process is alive")
def health() -> dict[str, str]:
    return {"status": "ok"}


_READINESS = {"description": "ready, reasons (empty when ready), models, workers, queue_depth",
              "content": {"application/json": {}}}


@router.get("/ready", summary="200 once every preload model is loaded; 503 with the reasons",
            responses={200: _READINESS, 503: {**_READINESS, "description": "not ready: see reasons"}})
def ready(engine: EngineDep) -> JSONResponse:
    ok, body = engine.readiness()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}})
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
