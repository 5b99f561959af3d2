"""Operator routes: POST /admin/reload rescans models.yaml and its folders (as SIGHUP does)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from app.api.credentials import CallerDep
from app.api.deps import EngineDep
from app.errors import RefreshFailed

router = APIRouter(prefix="/admin", tags=["operations"])

_ERROR = {"content": {"application/json": {}}}


async def reload_models(engine: EngineDep) -> dict[str, Any]:
    """Rescan the models file off the event loop; 500 (RefreshFailed) when it is no longer
    valid, in which case nothing changed. Every route that reloads (this one, A1111's refresh
    routes) answers through it."""
    report = await asyncio.to_thread(engine.reload)
    if report.error:
        raise RefreshFailed(report.summary())
    return report.as_dict()


@router.post(
    "/reload",
    summary="Read models.yaml, model_dirs and lora_dirs again; serve what they say now",
    responses={403: {**_ERROR, "description": "no valid API key"},
               500: {**_ERROR, "description": "the models file is no longer valid; nothing changed"}},
)
async def reload(client: CallerDep, engine: EngineDep) -> dict[str, Any]:
    """Models added are served at once; removed ones finish their running jobs and are
    unloaded (their waiting jobs get 503); a model whose entry or files changed is loaded
    afresh on its next use. The answer (also in `/ready` as `last_reload`) lists the changes."""
    return await reload_models(engine)
