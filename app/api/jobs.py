"""The job API: POST /jobs queues any /sd body and answers at once; GET /jobs/{id} (state),
/jobs/{id}/events (Server-Sent Events), /jobs/{id}/image and DELETE /jobs/{id} follow it.

A thin translator onto the shared core (app.api.generation.submit_job): the job is queued
like every other (fairness, queue bound and 503 + Retry-After, deadlines). The worker thread
is never involved in HTTP: it only writes `job.step` and `job.started_at`, which a watcher
task on the event loop reads every 100 ms and turns into events. Each SSE subscriber has a
bounded asyncio queue; a slow reader loses progress events (never the final one) and the
number of subscribers per job is capped, so memory stays bounded whatever the clients do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from sse_starlette.sse import EventSourceResponse

from app.api.deps import AuthDep, EngineDep, ImagesDep, RegistryDep, SettingsDep
from app.api.generation import encode_result, submit_job
from app.api.visioncraft import _client, _image_request
from app.auth import Authenticator, bearer_token
from app.config import Settings
from app.engine.engine import Engine
from app.engine.jobs import Job
from app.errors import CraftError, JobConflict, JobNotFound, Unavailable
from app.imaging import ImageStore
from app.schemas import ErrorBody, JobRequest

router = APIRouter(tags=["jobs"])

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
        return self.job.params.steps

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
            "image_url": str(request.url_for("job_image", job_id=self.id))
            if self.status == "done" else None,
        }


class JobTracker:
    """The jobs made through POST /jobs, by id; finished ones are forgotten after the TTL
    (their ids remembered, bounded, so a late GET says they expired)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: OrderedDict[str, TrackedJob] = OrderedDict()
        self.expired: OrderedDict[str, str] = OrderedDict()  # id → client

    def add(self, tracked: TrackedJob) -> None:
        self.purge()
        self.jobs[tracked.id] = tracked

    def purge(self) -> None:
        now = time.monotonic()
        ttl = self.settings.job_ttl_s
        for job_id, tracked in list(self.jobs.items()):
            old = tracked.finished_at is not None and now - tracked.finished_at > ttl
            if old or (len(self.jobs) > self.settings.max_tracked_jobs
                       and tracked.finished_at is not None):
                del self.jobs[job_id]
                self.expired[job_id] = tracked.client
        while len(self.expired) > 4 * self.settings.max_tracked_jobs:
            self.expired.popitem(last=False)

    def get(self, job_id: str, client: str) -> TrackedJob:
        self.purge()
        tracked = self.jobs.get(job_id)
        if tracked is not None and tracked.client == client:
            return tracked
        if self.expired.get(job_id) == client:
            raise JobNotFound(
                f"job {job_id!r} expired: finished jobs and their images are kept "
                f"{self.settings.job_ttl_s:g} s (setting CRAFTSERVE_JOB_TTL_S)")
        raise JobNotFound(f"no job with id {job_id!r} for this API key")


def tracker_of(request: Request) -> JobTracker:
    state = request.app.state
    if getattr(state, "jobs", None) is None:
        state.jobs = JobTracker(state.settings)
    return state.jobs


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


def _position(engine: Engine, job: Job) -> int | None:
    return engine.queue_position(job)


def _preview_png(rgb) -> str:  # noqa: ANN001 - (h, w, 3) uint8 tensor
    buffer = io.BytesIO()
    Image.fromarray(rgb.numpy()).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_body(error: BaseException) -> dict:
    if isinstance(error, CraftError):
        return {"status": error.status, "kind": error.kind, "message": error.message}
    return {"status": 500, "kind": "internal", "message": "internal error"}


async def _watch(tracked: TrackedJob, engine: Engine, images: ImageStore, image_url: str) -> None:
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
                position = _position(engine, job)
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
        _end(tracked, "failed", {"error": _error_body(error)}, error=_error_body(error))
        return
    result = job.future.result()
    try:
        data = await encode_result(job.params, result, job.id)
    except CraftError as exc:  # an encoder failure (logged by the core): the job failed
        _end(tracked, "failed", {"error": _error_body(exc)}, error=_error_body(exc))
        return
    if tracked.status in TERMINAL:
        return
    tracked.image_key = images.put(data)
    tracked.queue_position = None
    _end(tracked, "done", {
        "image_url": image_url, "seed": result.seed, "model": job.params.model,
        "sampler": result.sampler_label, "width": job.params.width, "height": job.params.height,
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


def _end(tracked: TrackedJob, status: str, data: dict, error: dict | None = None) -> None:
    job = tracked.job
    tracked.job = _Finished(job.params, job.step, job.started_at)  # type: ignore[assignment]
    tracked.status = status
    tracked.error = error
    tracked.finished_at = time.monotonic()
    publish(tracked, status, data)


def _key_client(request: Request, auth: Authenticator) -> str:
    token = bearer_token(request.headers.get("authorization")) or request.query_params.get("token")
    return auth.authenticate(token, request.client.host if request.client else None)


_tasks: set[asyncio.Task] = set()

_WHEN = {
    403: "API key missing or wrong",
    404: "no such job for this key: unknown, another key's, or expired (the message says which "
         "setting expires it)",
    409: "the job's state does not allow it: its image before it is done, cancelling a finished job",
    422: "a field out of range, of the wrong type, or a name this server does not have",
    429: "the key is past its rate limit (`Retry-After`)",
    503: "the queue is full, the model cannot be served now, or too many event subscribers "
         "(`Retry-After`)",
}


def _errors(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


@router.post("/jobs", status_code=202, responses=_errors(403, 422, 429, 503),
             summary="Queue an image job (any /sd body); follow it by id")
async def create_job(body: JobRequest, request: Request, engine: EngineDep,
                     registry: RegistryDep, settings: SettingsDep, auth: AuthDep,
                     images: ImagesDep) -> dict:
    client = _client(body, request, auth)
    job = submit_job(_image_request(body), client=client, engine=engine, registry=registry,
                     settings=settings)
    job.watched = True  # its progress events are read every 100 ms
    if body.previews:
        job.preview_every = settings.preview_every
    tracked = TrackedJob(id=job.id, client=client, job=job)
    tracker_of(request).add(tracked)
    tracked.queue_position = _position(engine, job)
    publish(tracked, "queued", {"position": tracked.queue_position})
    image_url = str(request.url_for("job_image", job_id=job.id))
    task = asyncio.ensure_future(_watch(tracked, engine, images, image_url))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return {
        "id": job.id,
        "status_url": str(request.url_for("job_status", job_id=job.id)),
        "events_url": str(request.url_for("job_events", job_id=job.id)),
        "image_url": image_url,
    }


@router.get("/jobs/{job_id}", name="job_status", summary="A job's state",
            responses=_errors(403, 404))
def job_status(job_id: str, request: Request, auth: AuthDep) -> dict:
    tracked = tracker_of(request).get(job_id, _key_client(request, auth))
    return tracked.state(request)


@router.delete("/jobs/{job_id}", responses=_errors(403, 404, 409),
               summary="Cancel a job: a queued one at once, a running one at its next step")
def cancel_job(job_id: str, request: Request, auth: AuthDep, engine: EngineDep) -> dict:
    tracked = tracker_of(request).get(job_id, _key_client(request, auth))
    if tracked.status in ("done", "failed"):
        raise JobConflict(f"job {job_id!r} is already {tracked.status}; there is nothing to "
                          "cancel (DELETE applies to queued and running jobs)")
    if tracked.status != "cancelled":  # DELETE twice: the same answer
        engine.cancel(tracked.job, Unavailable("the job was cancelled by DELETE /jobs/{id}",
                                               kind="cancelled"))
        _end(tracked, "cancelled", {"step": tracked.job.step, "steps": tracked.steps})
    return tracked.state(request)


@router.get("/jobs/{job_id}/image", name="job_image", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the PNG"},
                       **_errors(403, 404, 409)},
            summary="A finished job's image")
def job_image(job_id: str, request: Request, auth: AuthDep, images: ImagesDep) -> Response:
    tracked = tracker_of(request).get(job_id, _key_client(request, auth))
    if tracked.status != "done":
        raise JobConflict(f"job {job_id!r} is {tracked.status}; its image exists once it is done")
    data = images.get(tracked.image_key or "")
    if data is None:
        raise JobNotFound(f"the image of job {job_id!r} expired from the image store (it keeps "
                          "the newest images up to CRAFTSERVE_IMAGE_STORE_MB)")
    return Response(data, media_type="image/png")


@router.get("/jobs/{job_id}/events", name="job_events", responses={
                200: {"content": {"text/event-stream": {}}, "description": "the events"},
                **_errors(403, 404, 503)},
            summary="Server-Sent Events: queued, started, progress, done, failed, cancelled")
async def job_events(job_id: str, request: Request, auth: AuthDep,
                     settings: SettingsDep) -> EventSourceResponse:
    tracked = tracker_of(request).get(job_id, _key_client(request, auth))
    if len(tracked.subscribers) >= settings.job_max_subscribers:
        raise Unavailable(
            f"job {job_id!r} has {len(tracked.subscribers)} event subscribers, the limit is "
            f"{settings.job_max_subscribers} (setting CRAFTSERVE_JOB_MAX_SUBSCRIBERS)",
            retry_after=5, kind="subscribers")
    try:
        last_id = int(request.headers.get("last-event-id", "0"))
    except ValueError:
        last_id = 0
    queue: asyncio.Queue = asyncio.Queue(maxsize=settings.job_subscriber_buffer)
    backlog = [item for item in tracked.events if item[0] > last_id]
    tracked.subscribers.add(queue)

    async def stream():  # noqa: ANN202
        try:
            for item in backlog:
                yield {"id": str(item[0]), "event": item[1], "data": item[2]}
                if item[1] in TERMINAL:
                    return
            if tracked.status in TERMINAL and not backlog:
                return  # resumed after the final event: nothing more will come
            seen = backlog[-1][0] if backlog else last_id
            while True:
                number, event, data = await queue.get()
                if number <= seen:
                    continue
                yield {"id": str(number), "event": event, "data": data}
                if event in TERMINAL:
                    return
        finally:
            tracked.subscribers.discard(queue)

    return EventSourceResponse(stream(), ping=15)
