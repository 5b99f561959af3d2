"""Operations routes: liveness, readiness and Prometheus metrics (no token).

/ready answers everyone, 200 or 503, for load balancers. Its details (failures with their
exception text and file paths, the last reload's error with lines of the models file, the
workers and their devices) go to a request with a valid key only; without one it says ready or
not, each model's state word and reasons in fixed words (app.engine.readiness.public_readiness).
The log has the details either way."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.credentials import OptionalCallerDep
from app.api.deps import EngineDep
from app.engine.readiness import public_readiness

router = APIRouter(tags=["operations"])


@router.get("/health", summary="The process is alive")
def health() -> dict[str, str]:
    return {"status": "ok"}


_READINESS = {"description": "ready, reasons (empty when ready), models; with a valid key also "
                             "each failure's text, workers, queue_depth, last_reload",
              "content": {"application/json": {}}}


@router.get("/ready", summary="200 once every preload model is loaded; 503 with the reasons",
            responses={200: _READINESS, 503: {**_READINESS, "description": "not ready: see reasons"},
                       403: {"content": {"application/json": {}},
                             "description": "a key was sent and it is wrong (send none, or a valid one)"}})
def ready(engine: EngineDep, client: OptionalCallerDep) -> JSONResponse:
    ok, body = engine.readiness()
    return JSONResponse(body if client is not None else public_readiness(body),
                        status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}})
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
