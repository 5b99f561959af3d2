"""A generation replica: craftserve's own Engine on the one device Ray gave this process.

Everything a single box does per device happens here unchanged: the fair queue, batching of
compatible jobs (across every caller that Ray routed here), the LoRA cache, OOM recovery,
previews. The ingress chooses the replica for each job (app.cluster.dispatch). Each replica
keeps a model LRU (Serve's model multiplexing, at most MAX_MODELS_PER_DEVICE, the same bound
as its worker's) and posts it on the board (`held`); evicting a model from that LRU unloads
it from the worker between batches. The preload models enter it at start on every replica.

`run` takes the ingress's JobCall (the job keeps the id its client was given) and yields the
job's events (app.cluster.wire) until its answer; a cancelled call (the client left, DELETE
/jobs, A1111 interrupt) takes the job back from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from app.cluster.board import REPORT_EVERY_S, get_board
from app.cluster.wire import DONE, ERROR, PREVIEW, PROGRESS, STARTED, JobCall, error_to_wire
from app.config import Settings
from app.engine.controlnet_fit import match_controlnets
from app.engine.engine import Engine
from app.engine.lora_fit import match_loras
from app.errors import CraftError, InternalError
from app.metrics import Metrics
from app.registry import load_registry

logger = logging.getLogger(__name__)

# How often a running job's step and preview are looked at and sent: every 0.1 s for a job
# someone watches (the job API), else every 0.5 s (A1111's progress route still sees it move);
# each message costs both processes CPU, ~3 % of a 350 ms job on a 2-core host at 0.1 s.
TICK_WATCHED_S, TICK_S = 0.1, 0.5


class _Held:
    """One model in the replica's Ray model LRU. Ray calls the instance's `__del__`
    attribute when it evicts the model (an attribute, not a method: the garbage collector
    never calls it, so only Ray's eviction unloads the model)."""

    def __init__(self, engine: Engine, name: str, held: dict[str, None]) -> None:
        self.name = name

        def unload() -> None:
            held.pop(name, None)
            for worker in engine.workers:
                worker.mark_stale([name], recheck=False)
            engine.queue.nudge()  # an idle worker unloads it now

        self.__del__ = unload


def device_for_replica() -> str:
    """The device Ray gave this process: its one visible GPU, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


async def job_events(engine: Engine, call: JobCall, replica: str) -> AsyncIterator[tuple[str, Any]]:
    """One job on this replica's engine, under the ingress's id: its events (app.cluster.wire)
    until its answer. Closed early (the call was cancelled), it takes the job back."""
    try:
        job = call.submit_to(engine)
    except CraftError as exc:
        yield ERROR, error_to_wire(exc)
        return
    watched = call.watched or call.preview_every
    tick = TICK_WATCHED_S if watched else TICK_S
    try:
        started, step, preview = False, 0, None
        while True:
            finished = job.future.done()
            if finished and not watched:
                break  # the answer says it all: no extra messages on the fast path
            if not started and job.started_at is not None:
                started = True
                yield STARTED, replica
            if job.step != step:
                step = job.step
                yield PROGRESS, step
            if job.preview is not None and job.preview is not preview:
                preview = job.preview
                yield PREVIEW, preview
            if finished:
                break
            await asyncio.wait({job.future}, timeout=tick)
        error = job.future.exception()
        if error is None:
            result = job.future.result()
            result.worker = replica
            yield DONE, result
        elif isinstance(error, CraftError):
            yield ERROR, error_to_wire(error)
        else:  # pragma: no cover - the worker answers its jobs with CraftErrors
            logger.error("%s: job %s failed: %r", replica, job.id, error)
            yield ERROR, error_to_wire(InternalError(f"internal error (job {job.id} on {replica})"))
    finally:
        if not job.future.done():  # the call was cancelled: take the job back
            engine.cancel(job)


class GenerationReplica:
    """The generation deployment's class (app.cluster.deploy makes it a Serve deployment)."""

    async def __init__(self, settings: dict[str, Any], app_name: str) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.settings = Settings(**{**settings, "devices": device_for_replica()})
        logging.basicConfig(level=self.settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        registry = load_registry(self.settings.models)
        match_loras(registry)
        match_controlnets(registry)  # and which ControlNet, the same way
        self.engine = Engine(self.settings, registry, Metrics())
        self.engine.start()
        engine = self.engine

        # The LRU's models, least recently used first: posted on the board, so the ingress
        # (app.cluster.dispatch) knows which models this replica holds or is loading.
        self._held: dict[str, None] = {}
        held = self._held

        async def hold(model: str) -> _Held:  # a function: Serve keeps its LRU on it
            return _Held(engine, model, held)  # the worker loads the model with its first job

        self._hold = serve.multiplexed(
            max_num_models_per_replica=self.settings.max_models_per_device)(hold)
        for name in self.engine.preload:  # every replica loads the preload models at start
            await self._hold_model(name)
        self._board = get_board(app_name)
        self._applied_reload: int | None = None
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("%s: engine on %s, pid %d", self.name, self.engine.describe(), os.getpid())

    # ---- the one call the ingress makes ---------------------------------------------
    async def run(self, call: JobCall) -> AsyncIterator[tuple[str, Any]]:
        from ray import serve

        model = serve.get_multiplexed_model_id() or call.params.model
        if model:  # an upscaling job has none: it takes no place in the replica's model LRU
            await self._hold_model(model)
        refiner = getattr(call.params, "refiner", None)
        if refiner is not None:  # SDXL's refiner: a second model this replica holds (and its worker loads)
            await self._hold_model(refiner.model)
        async with contextlib.aclosing(job_events(self.engine, call, self.name)) as events:
            async for event in events:
                yield event

    async def _hold_model(self, model: str) -> None:
        await self._hold(model)  # may evict the least recently used model (its __del__)
        self._held.pop(model, None)
        self._held[model] = None  # the most recently used

    # ---- what the ingress learns through the board -----------------------------------
    def state(self) -> dict[str, Any]:
        ready, body = self.engine.readiness()
        worker = body["workers"][0] if body["workers"] else {}
        return {
            "name": self.name,
            "pid": os.getpid(),
            "device": worker.get("device", ""),
            "alive": all(w["alive"] for w in body["workers"]),
            "preloaded": worker.get("preloaded", False),
            "ready": ready,
            "models": body["models"],
            "loaded": worker.get("models", []),
            "held": list(self._held),
            "queue_depth": body["queue_depth"],
            "running": sum(len(w.running) for w in self.engine.workers),
            "reasons": body["reasons"],
        }

    async def _report_forever(self) -> None:
        while True:
            try:
                epoch = await self._board.report.remote(self.name, self.state())
                if self._applied_reload is None:
                    self._applied_reload = epoch  # this replica read the models file just now
                elif epoch > self._applied_reload:
                    self._applied_reload = epoch
                    await asyncio.to_thread(self.engine.reload)
            except Exception:  # noqa: BLE001 - the board may be restarting; report again
                logger.warning("%s: reporting to the board failed", self.name, exc_info=True)
            await asyncio.sleep(REPORT_EVERY_S)

    def check_health(self) -> None:
        """Serve's health check: a replica whose worker thread died is replaced."""
        if not all(w.alive for w in self.engine.workers):
            raise RuntimeError(f"{self.name}: a worker thread is not running")

    def __del__(self) -> None:
        """Serve calls this once the replica has drained (no request in flight): scale-down
        and shutdown never drop a running job."""
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        with contextlib.suppress(Exception):
            self._board.leave.remote(self.name)
        engine = getattr(self, "engine", None)
        if engine is not None and engine.accepting:
            engine.stop()
