"""The job API's state: every job made through POST /jobs, by id, with its events.

One `JobTracker` per app, built with it (app.main). The worker thread is never involved in
HTTP: it only writes `job.step` and `job.started_at`, which a watcher task on the event loop
(`watch`) reads every TICK_S and turns into events. Each SSE subscriber has a bounded asyncio
queue; a slow reader loses progress events (never the final one), so memory stays bounded
whatever the clients do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from fastapi import Request
from PIL import Image

from app.api.generation import encode_result
from app.api.urls import public_url_for
from app.config import Settings
from app.engine.jobs import Job
from app.engine.protocol import EngineAPI
from app.errors import CraftError, ErrorKind, JobNotFound
from app.imaging import ImageStore

TICK_S = 0.1  # progress is published at most this often
TERMINAL = ("done", "failed", "cancelled")
EVENT_LOG = 64  # events kept per job for late subscribers and Last-Event-ID


@dataclass(eq=False)
class TrackedJob:
    id: str
    client: str
    job: Job
    status: str = "queued"
    queue_position: int | None = None
    error: dict | None = None
    image_key: str | None = None
    finished_at: float | None = None
    events: deque = field(default_factory=lambda: deque(maxlen=EVENT_LOG))
    next_event: int = 1
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    started_s: float | None = None

    @property
    def steps(self) -> int:
        return self.job.params.total_steps

    def eta_s(self) -> float | None:
        step = self.job.step
        if self.status != "running" or not step or self.job.started_at is None:
            return None
        elapsed = time.monotonic() - self.job.started_at
        return round(elapsed / step * (self.steps - step), 2)

    def state(self, request: Request) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "queue_position": self.queue_position if self.status == "queued" else None,
            "step": self.job.step if self.status != "queued" else 0,
            "steps": self.steps,
            "eta_s": self.eta_s(),
            "seed": self.job.params.seed,
            "error": self.error,
            "image_url": public_url_for(request, "job_image", job_id=self.id)
            if self.status == "done" else None,
        }


class JobTracker:
    """The jobs made through POST /jobs, by id; finished ones are forgotten after the TTL
    (their ids remembered, bounded, so a late GET says they expired).

    Finished jobs are bounded per key and in all, so one key's many jobs never make another
    key's expire early: a key with more than CRAFTSERVE_MAX_TRACKED_JOBS_PER_KEY finished jobs
    forgets its own oldest; past CRAFTSERVE_MAX_TRACKED_JOBS in all, the key holding the most
    jobs forgets its oldest finished one, and a key holding no more than its fair share (the
    whole over the keys holding some) never does. Jobs still queued or running are never
    forgotten: the queue (and each key's share of it) bounds them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: OrderedDict[str, TrackedJob] = OrderedDict()
        self.expired: OrderedDict[str, str] = OrderedDict()  # id → client
        self.watchers: set[asyncio.Task] = set()  # one per job still followed

    def follow(self, tracked: TrackedJob, engine: EngineAPI, images: ImageStore, image_url: str) -> None:
        """Track a new job and follow it from the event loop until it ends."""
        self.add(tracked)
        task = asyncio.ensure_future(watch(tracked, engine, images, image_url))
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)

    def ended_through_api(self, job_id: str) -> bool:
        """Whether the job API has already answered this job (done, failed or cancelled by
        DELETE), though its worker may not have let go of it yet."""
        tracked = self.jobs.get(job_id)
        return tracked is not None and tracked.status in TERMINAL

    async def close(self) -> None:
        """Stop following (the app is shutting down)."""
        for task in list(self.watchers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.watchers, return_exceptions=True)

    def add(self, tracked: TrackedJob) -> None:
        self.purge()
        self.jobs[tracked.id] = tracked

    def purge(self) -> None:
        """Forget finished jobs past the TTL, then past each key's budget (its oldest), then
        past the whole (the oldest finished of the key holding the most, above its fair share)."""
        now = time.monotonic()
        ttl = self.settings.job_ttl_s
        finished: dict[str, deque[str]] = {}  # client → its finished jobs' ids, oldest first
        for job_id, tracked in list(self.jobs.items()):
            if tracked.finished_at is None:
                continue
            if now - tracked.finished_at > ttl:
                self._forget(job_id)
            else:
                finished.setdefault(tracked.client, deque()).append(job_id)
        per_key = self.settings.max_tracked_jobs_per_key or self.settings.max_tracked_jobs
        for ids in finished.values():
            while len(ids) > per_key:
                self._forget(ids.popleft())
        if len(self.jobs) > self.settings.max_tracked_jobs:
            self._bound_whole(finished)
        while len(self.expired) > 4 * self.settings.max_tracked_jobs:
            self.expired.popitem(last=False)

    def _bound_whole(self, finished: dict[str, deque[str]]) -> None:
        """Past the whole, forget the oldest finished job of the key holding the most jobs
        among those above their fair share, until under it or none is left to forget."""
        held = Counter(tracked.client for tracked in self.jobs.values())
        fair = self.settings.max_tracked_jobs / len(held)
        while len(self.jobs) > self.settings.max_tracked_jobs:
            over = [client for client, ids in finished.items() if ids and held[client] > fair]
            if not over:  # the rest are queued or running: the queue bounds those
                return
            most = max(over, key=lambda client: held[client])
            self._forget(finished[most].popleft())
            held[most] -= 1

    def _forget(self, job_id: str) -> None:
        tracked = self.jobs.pop(job_id)
        self.expired[job_id] = tracked.client

    def get(self, job_id: str, client: str) -> TrackedJob:
        self.purge()
        tracked = self.jobs.get(job_id)
        if tracked is not None and tracked.client == client:
            return tracked
        if self.expired.get(job_id) == client:
            raise JobNotFound(
                f"job {job_id!r} expired: finished jobs and their images are kept "
                f"{self.settings.job_ttl_s:g} s (setting CRAFTSERVE_JOB_TTL_S), and a key's newest "
                f"{self.settings.max_tracked_jobs_per_key} finished jobs at most (setting "
                "CRAFTSERVE_MAX_TRACKED_JOBS_PER_KEY)")
        raise JobNotFound(f"no job with id {job_id!r} for this API key")


def publish(tracked: TrackedJob, event: str, data: dict) -> None:
    """Record an event and hand it to every subscriber, never waiting: a full subscriber queue
    loses this event if it is progress or a preview, else its oldest one."""
    item = (tracked.next_event, event, json.dumps(data))
    tracked.next_event += 1
    tracked.events.append(item)
    for queue in list(tracked.subscribers):
        if queue.full():
            if event in ("progress", "preview"):
                continue
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
        queue.put_nowait(item)


def position_of(engine: EngineAPI, job: Job) -> int | None:
    """The job's place in the queue across all keys (1: next to run); None once it runs."""
    return engine.queue_position(job)


def _preview_png(rgb) -> str:  # noqa: ANN001 - (h, w, 3) uint8 tensor
    buffer = io.BytesIO()
    Image.fromarray(rgb.numpy()).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_body(error: BaseException) -> dict:
    if isinstance(error, CraftError):
        return {"status": error.status, "kind": error.kind, "message": error.message}
    return {"status": 500, "kind": ErrorKind.INTERNAL, "message": "internal error"}


async def watch(tracked: TrackedJob, engine: EngineAPI, images: ImageStore, image_url: str) -> None:
    """Follow one job from the event loop until it ends, publishing its events."""
    job = tracked.job
    last_step = -1

    def observe() -> None:
        nonlocal last_step
        if tracked.status == "queued":
            if job.started_at is not None:
                tracked.status = "running"
                publish(tracked, "started", {"steps": tracked.steps})
            else:
                position = position_of(engine, job)
                if position is not None and position != tracked.queue_position:
                    tracked.queue_position = position
                    publish(tracked, "queued", {"position": position})
        if tracked.status == "running" and job.step != last_step:
            last_step = job.step
            publish(tracked, "progress", {"step": job.step, "steps": tracked.steps,
                                          "eta_s": tracked.eta_s()})

    last_preview = None

    async def show_preview() -> None:
        nonlocal last_preview
        preview = job.preview
        if preview is not None and preview is not last_preview:
            last_preview = preview
            png = await asyncio.to_thread(_preview_png, preview[1])
            publish(tracked, "preview", {"step": preview[0], "steps": tracked.steps,
                                         "png_base64": png})

    while not job.future.done() and tracked.status not in TERMINAL:
        observe()
        await show_preview()
        await asyncio.wait({job.future}, timeout=TICK_S)
    if tracked.status not in TERMINAL:
        observe()  # the last step and the end can fall in one tick
        await show_preview()
    if tracked.status in TERMINAL:  # cancelled meanwhile
        return
    error = job.future.exception() if job.future.done() else None
    if error is not None:
        end(tracked, "failed", {"error": _error_body(error)}, error=_error_body(error))
        return
    result = job.future.result()
    try:
        data = await encode_result(job.params, result, job.id)
    except CraftError as exc:  # an encoder failure (logged by the core): the job failed
        end(tracked, "failed", {"error": _error_body(exc)}, error=_error_body(exc))
        return
    if tracked.status in TERMINAL:
        return
    tracked.image_key = images.put(data, owner=tracked.client)
    tracked.queue_position = None
    end(tracked, "done", {
        "image_url": image_url, "seed": result.seed, "model": job.params.model,
        "sampler": result.sampler_label, "width": job.params.out_size[0], "height": job.params.out_size[1],
        "queue_wait_ms": round(result.queue_wait_s * 1000, 1),
        "generation_ms": round(result.generation_s * 1000, 1),
        "batch_size": result.batch_size, "worker": result.worker,
    })


@dataclass(frozen=True)
class _Finished:
    """What a finished job's state still needs: the engine's Job (and the image its future
    holds) is let go, so tracked jobs kept for JOB_TTL_S cost a few hundred bytes each."""

    params: object
    step: int
    started_at: float | None


def end(tracked: TrackedJob, status: str, data: dict, error: dict | None = None) -> None:
    job = tracked.job
    tracked.job = _Finished(job.params, job.step, job.started_at)  # type: ignore[assignment]
    tracked.status = status
    tracked.error = error
    tracked.finished_at = time.monotonic()
    publish(tracked, status, data)


