"""Operator routes: POST /admin/reload rescans models.yaml and its folders (as SIGHUP does).

Reloading changes the server for every user, so it takes an admin key (`AdminDep`), here and
on A1111's refresh routes. Reloads are also coalesced (`Reloads`), so that even a flood of
them from admin keys costs at most one rescan per CRAFTSERVE_RELOAD_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from app.api.credentials import AdminDep
from app.engine.protocol import EngineAPI
from app.engine.reload import ReloadReport
from app.errors import RefreshFailed

router = APIRouter(prefix="/admin", tags=["operations"])

_ERROR = {"content": {"application/json": {}}}


class Reloads:
    """Reloads of one server, coalesced: every request is answered by a rescan that began
    after it arrived (so it sees the files as they were when it was sent), requests that come
    while one waits share it, and a rescan begins at least `interval_s` after the previous one
    ended. However many reloads are asked for, the engine spends at most
    reload time / (reload time + interval_s) of the time reloading; callers wait instead of
    being refused, so an operator's edit-reload-fix-reload never sees an error for it."""

    def __init__(self, engine: EngineAPI, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.runs = 0  # rescans begun (for tests and metrics)
        self._next: asyncio.Future[ReloadReport] | None = None  # the run new requests join
        self._running: asyncio.Future[ReloadReport] | None = None
        self._ended_at = -math.inf

    async def reload(self) -> ReloadReport:
        if self._next is None:
            self._next = asyncio.ensure_future(self._run(self._running))
        # a caller that goes away does not cancel the run the others wait for
        return await asyncio.shield(self._next)

    async def _run(self, previous: asyncio.Future[ReloadReport] | None) -> ReloadReport:
        if previous is not None:
            await asyncio.wait([previous])  # its outcome is its own callers'
        wait = self._ended_at + self.interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        me, self._next = self._next, None  # requests from now on need a later scan
        self._running = me
        self.runs += 1
        try:
            return await asyncio.to_thread(self.engine.reload)
        finally:
            self._ended_at = time.monotonic()
            if self._running is me:
                self._running = None


def _reloads(request: Request) -> Reloads:
    return request.app.state.reloads


ReloadsDep = Annotated[Reloads, Depends(_reloads)]


async def reload_models(reloads: Reloads) -> dict[str, Any]:
    """Rescan the models file off the event loop; 500 (RefreshFailed) when it is no longer
    valid, in which case nothing changed. Every route that reloads (this one, A1111's refresh
    routes) answers through it, behind `AdminDep`."""
    report = await reloads.reload()
    if report.error:
        raise RefreshFailed(report.summary())
    return report.as_dict()


@router.post(
    "/reload",
    summary="Read models.yaml, model_dirs and lora_dirs again; serve what they say now (admin key)",
    responses={403: {**_ERROR, "description": "no valid API key, or a key without the `admin` role"},
               500: {**_ERROR, "description": "the models file is no longer valid; nothing changed"}},
)
async def reload(client: AdminDep, reloads: ReloadsDep) -> dict[str, Any]:
    """Models added are served at once; removed ones finish their running jobs and are
    unloaded (their waiting jobs get 503); a model whose entry or files changed is loaded
    afresh on its next use. The answer (also in `/ready` as `last_reload`) lists the changes.
    Needs a key with the `admin` role; reloads close together are coalesced (at most one
    rescan per CRAFTSERVE_RELOAD_INTERVAL_S; a request waits for the next one)."""
    return await reload_models(reloads)
