"""The job API: POST /jobs queues any /sd body (plus image inputs, the hires fix and ControlNet
units) and answers at once; GET /jobs/{id} (state), /jobs/{id}/events (Server-Sent Events),
/jobs/{id}/image and DELETE /jobs/{id} follow it.

A thin translator onto the shared core (app.api.generation.submit_job): the job is queued
like every other (fairness, queue bound and 503 + Retry-After, deadlines). Its state and
events live in the app's JobTracker (app.api.job_tracker); the number of event subscribers
per job is capped. The key comes as every route's does (app.api.credentials), never in the URL.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse

from app.api.bodies import ImageRoute
from app.api.controlnet_units import read_unit_list
from app.api.credentials import CallerDep, GeneratingCallerDep, QueueShareDep
from app.api.deps import EngineDep, ImagesDep, RegistryDep, SettingsDep, TrackerDep
from app.api.generation import HiresRequest, ImageInput, ImageRequest, RefinerRequest, submit_job
from app.api.job_tracker import TERMINAL, TrackedJob, end, position_of, publish
from app.api.urls import public_url_for
from app.api.visioncraft import to_image_request
from app.api.visioncraft.models import ErrorBody, JobRequest
from app.api.visioncraft.routes import img2img_size
from app.config import Settings
from app.errors import ErrorKind, InvalidParameter, JobConflict, JobNotFound, Unavailable

router = APIRouter(tags=["jobs"], route_class=ImageRoute)


_WHEN = {
    403: "API key missing or wrong",
    404: "no such job for this key: unknown, another key's, or expired (the message says which "
         "setting expires it)",
    409: "the job's state does not allow it: its image before it is done, cancelling a finished job",
    422: "a field out of range, of the wrong type, or a name this server does not have",
    429: "the key is past its rate limit, or has its whole share of the queue waiting "
         "(`CRAFTSERVE_MAX_QUEUE_PER_KEY`); `Retry-After`",
    503: "the queue is full, the model cannot be served now, or too many event subscribers "
         "(`Retry-After`)",
}


def _errors(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


async def job_request(body: JobRequest, settings: Settings) -> ImageRequest:
    """The core's request for a job body: its /sd fields, the picture and mask decoded and
    checked (app.image_inputs, off the event loop) with their A1111 knobs, the hires fix, and
    the ControlNet units (app.api.controlnet_units)."""
    from app.image_inputs import read_image, read_mask

    request = to_image_request(body)
    if body.init_image is None:
        for name in ("mask", "strength"):
            if getattr(body, name) is not None:
                raise InvalidParameter(name, getattr(body, name), "it applies to image to image; "
                                       "send `init_image` with it")
    else:
        picture = await read_image("init_image", body.init_image, settings)
        mask = None if not body.mask else await read_mask("mask", body.mask, settings, convention="a1111")
        sent = body.model_fields_set
        if "width" not in sent and "height" not in sent:
            width, height = img2img_size(*picture.size)
            request = replace(request, width=width, height=height)
        strength = 0.75 if body.strength is None else float(body.strength)
        request = replace(request, image=ImageInput(
            images=(picture,), mask=mask, strength=strength, resize_mode=body.resize_mode,
            mask_blur=body.mask_blur, fill=body.inpainting_fill, full_res=body.inpaint_full_res,
            padding=body.inpaint_full_res_padding, invert=body.inpainting_mask_invert))
    if body.enable_hr:
        request = replace(request, hires=HiresRequest(
            scale=float(body.hr_scale), upscaler=body.hr_upscaler, steps=body.hr_second_pass_steps,
            strength=float(body.denoising_strength)))
    if body.refiner:
        request = replace(request, refiner=RefinerRequest(body.refiner, float(body.refiner_switch_at)))
    if body.controlnet:
        units = await read_unit_list("controlnet", body.controlnet, settings, listed_means_enabled=True)
        request = replace(request, controlnet=units)
    return request


@router.post("/jobs", status_code=202, responses=_errors(403, 422, 429, 503),
             summary="Queue an image job (any /sd body); follow it by id")
async def create_job(body: JobRequest, request: Request, client: GeneratingCallerDep,
                     share: QueueShareDep, engine: EngineDep, registry: RegistryDep,
                     settings: SettingsDep, images: ImagesDep, tracker: TrackerDep) -> dict:
    job = await submit_job(await job_request(body, settings), client=client, share=share, engine=engine,
                     registry=registry, settings=settings)
    job.watched = True  # its progress events are read every 100 ms
    if body.previews:
        job.preview_every = settings.preview_every
    tracked = TrackedJob(id=job.id, client=client, job=job)
    tracked.queue_position = position_of(engine, job)
    publish(tracked, "queued", {"position": tracked.queue_position})
    image_url = public_url_for(request, "job_image", job_id=job.id)
    tracker.follow(tracked, engine, images, image_url)
    return {
        "id": job.id,
        "status_url": public_url_for(request, "job_status", job_id=job.id),
        "events_url": public_url_for(request, "job_events", job_id=job.id),
        "image_url": image_url,
    }


@router.get("/jobs/{job_id}", name="job_status", summary="A job's state",
            responses=_errors(403, 404))
def job_status(job_id: str, request: Request, client: CallerDep, tracker: TrackerDep) -> dict:
    tracked = tracker.get(job_id, client)
    return tracked.state(request)


@router.delete("/jobs/{job_id}", responses=_errors(403, 404, 409),
               summary="Cancel a job: a queued one at once, a running one at its next step")
def cancel_job(job_id: str, request: Request, client: CallerDep, engine: EngineDep,
               tracker: TrackerDep) -> dict:
    tracked = tracker.get(job_id, client)
    if tracked.status in ("done", "failed"):
        raise JobConflict(f"job {job_id!r} is already {tracked.status}; there is nothing to "
                          "cancel (DELETE applies to queued and running jobs)")
    if tracked.status != "cancelled":  # DELETE twice: the same answer
        engine.cancel(tracked.job, Unavailable("the job was cancelled by DELETE /jobs/{id}",
                                               kind=ErrorKind.CANCELLED))
        end(tracked, "cancelled", {"step": tracked.job.step, "steps": tracked.steps})
    return tracked.state(request)


@router.get("/jobs/{job_id}/image", name="job_image", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the PNG"},
                       **_errors(403, 404, 409)},
            summary="A finished job's image")
def job_image(job_id: str, client: CallerDep, images: ImagesDep, tracker: TrackerDep) -> Response:
    tracked = tracker.get(job_id, client)
    if tracked.status in ("failed", "cancelled"):
        raise JobConflict(f"job {job_id!r} is {tracked.status}: it has no image and never will")
    if tracked.status != "done":
        raise JobConflict(f"job {job_id!r} is {tracked.status}; its image exists once it is done")
    data = images.get(tracked.image_key or "")
    if data is None:
        raise JobNotFound(f"the image of job {job_id!r} expired from the image store (it keeps "
                          "each key's newest images up to CRAFTSERVE_IMAGE_STORE_MB_PER_KEY, and "
                          "CRAFTSERVE_IMAGE_STORE_MB in all)")
    return Response(data, media_type="image/png")


@router.get("/jobs/{job_id}/events", name="job_events", responses={
                200: {"content": {"text/event-stream": {}}, "description": "the events"},
                **_errors(403, 404, 503)},
            summary="Server-Sent Events: queued, started, progress, done, failed, cancelled")
async def job_events(job_id: str, request: Request, client: CallerDep, settings: SettingsDep,
                     tracker: TrackerDep) -> EventSourceResponse:
    tracked = tracker.get(job_id, client)
    if len(tracked.subscribers) >= settings.job_max_subscribers:
        raise Unavailable(
            f"job {job_id!r} has {len(tracked.subscribers)} event subscribers, the limit is "
            f"{settings.job_max_subscribers} (setting CRAFTSERVE_JOB_MAX_SUBSCRIBERS)",
            retry_after=5, kind=ErrorKind.SUBSCRIBERS)
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
