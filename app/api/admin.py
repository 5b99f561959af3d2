"""Operator routes: POST /admin/reload rescans models.yaml and its folders (as SIGHUP does)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import AuthDep, EngineDep
from app.errors import RefreshFailed

router = APIRouter(prefix="/admin", tags=["operations"])
_bearer = HTTPBearer(auto_error=False, description="a craftserve API key")


def _client(
    request: Request,
    auth: AuthDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's key label from `Authorization: Bearer <key>`; 403 otherwise."""
    host = request.client.host if request.client else None
    return auth.authenticate(credentials.credentials if credentials else None, host)


_ERROR = {"content": {"application/json": {}}}


@router.post(
    "/reload",
    summary="Read models.yaml, model_dirs and lora_dirs again; serve what they say now",
    responses={403: {**_ERROR, "description": "no valid API key (`Authorization: Bearer`)"},
               500: {**_ERROR, "description": "the models file is no longer valid; nothing changed"}},
)
async def reload(client: Annotated[str, Depends(_client)], engine: EngineDep) -> dict[str, Any]:
    """Models added are served at once; removed ones finish their running jobs and are
    unloaded (their waiting jobs get 503); a model whose entry or files changed is loaded
    afresh on its next use. The answer (also in `/ready` as `last_reload`) lists the changes."""
    report = await asyncio.to_thread(engine.reload)
    if report.error:
        raise RefreshFailed(report.summary())
    return report.as_dict()
