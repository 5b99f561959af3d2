"""The shared core of every generation route, whatever its dialect.

A dialect (VisionCraft, A1111, OpenAI) checks its own body against its own ranges, turns it
into an `ImageRequest` and calls `generate_images`; it only formats the answer. So the same
request gives the same pixels through any route, and compatible jobs of different dialects
batch together.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fastapi import Request

from app.api.rules import (
    MAX_SEED,
    check_clip_skip,
    check_prompt_chunks,
    check_prompt_length,
    check_prompt_syntax,
)
from app.config import Settings
from app.engine.jobs import GenParams, Job, JobResult
from app.engine.protocol import EngineAPI
from app.errors import (
    ErrorKind,
    InternalError,
    InvalidParameter,
    KeyQueueFull,
    LoraError,
    NotServed,
    Unavailable,
)
from app.families import Family
from app.imaging import encode_image, parameters_text
from app.registry import Registry
from app.samplers import resolve_sampler

DEFAULT_SAMPLER = "DPM++ 2M Karras"
# A key past its share of the queue is told to retry after this many seconds for each job
# ahead of its first waiting one (an estimate: EngineAPI has no throughput), at most the cap.
RETRY_S_PER_PLACE = 2.0
MAX_SHARE_RETRY_S = 60.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRequest:
    """One request for images, in no dialect's terms. Ranges were checked by the dialect with
    the shared rules (app.api.rules); names (model, sampler, LoRAs) and server-wide limits are
    checked by `to_params`."""

    model: str
    prompt: str
    negative_prompt: str = ""
    sampler: str | None = None  # None: the model's default sampler
    scheduler: str | None = None
    steps: int = 30
    width: int = 1024
    height: int = 1024
    cfg_scale: float = 7.0
    loras: Mapping[str, float] = field(default_factory=dict)
    seed: int | None = None  # None or negative: random
    clip_skip: int | None = None  # A1111's CLIP_stop_at_last_layers; None: 1 (the last layer)


@dataclass(frozen=True)
class Generated:
    """One image as generated: its encoded bytes (PNG unless the dialect asked for another
    format; the A1111 `parameters` text always inside) and facts."""

    data: bytes
    params: GenParams
    result: JobResult
    job_id: str

    def headers(self) -> dict[str, str]:
        """The X-* facts craftserve adds to every answer with one image."""
        result = self.result
        return {
            "X-Job-Id": self.job_id,
            "X-Seed": str(result.seed),
            "X-Model": self.params.model,
            "X-Sampler": result.sampler_label,
            "X-Queue-Wait-Ms": f"{result.queue_wait_s * 1000:.1f}",
            "X-Generation-Ms": f"{result.generation_s * 1000:.1f}",
            "X-Batch-Size": str(result.batch_size),
            "X-Worker": result.worker,
        }


def _embeddings_used(registry: Registry, family: Family, texts: tuple[str, ...]) -> tuple:
    """The family's embeddings whose name occurs in the prompts (case and runs of spaces
    aside, as the tokenizer sees them); the worker matches them on tokens."""
    available = registry.embeddings_for(family)
    if not available:
        return ()
    seen = " ".join(" ".join(t.lower().split()) for t in texts)
    return tuple(sorted((name, spec.path) for name, spec in available.items()
                        if " ".join(name.lower().split()) in seen))


def to_params(body: ImageRequest, registry: Registry, settings: Settings) -> GenParams:
    """Check the request against the registry and the settings; resolve every name."""
    spec = registry.models.get(body.model)
    if spec is None:
        raise NotServed("model", body.model, registry.models)
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        check_prompt_length(name, text, settings)
        check_prompt_syntax(name, text)
        check_prompt_chunks(name, text, settings)
    clip_skip = 1 if body.clip_skip is None else check_clip_skip("clip_skip", body.clip_skip)
    sampler = resolve_sampler(body.sampler or spec.default_sampler or DEFAULT_SAMPLER, body.scheduler)
    if len(body.loras) > settings.max_loras:
        raise InvalidParameter(
            "loras", f"<{len(body.loras)} entries>",
            f"at most {settings.max_loras} LoRAs a request (setting CRAFTSERVE_MAX_LORAS)",
        )
    for name in body.loras:
        lora = registry.loras.get(name)
        if lora is None:
            raise NotServed("lora", name, registry.lora_names(spec.family))
        reason = lora.misfit(spec)
        if reason:
            raise LoraError(name, reason)
    seed = body.seed if body.seed is not None and body.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
    return GenParams(
        model=spec.name,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        sampler=sampler,
        steps=body.steps,
        width=body.width,
        height=body.height,
        cfg_scale=float(body.cfg_scale),
        loras=tuple(sorted((name, registry.loras[name].path, float(weight))
                           for name, weight in body.loras.items())),
        seed=seed,
        clip_skip=clip_skip,
        embeddings=_embeddings_used(registry, spec.family, (body.prompt, body.negative_prompt)),
    )


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_jobs(engine: EngineAPI, jobs: list[Job], request: Request) -> list[JobResult]:
    """Await the jobs of one request. If the client leaves or a job fails (the queue answers
    a job that outlives its deadline), the request fails and its other jobs are taken back."""
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        while not all(job.future.done() for job in jobs):
            waiting = {job.future for job in jobs if not job.future.done()}
            done, _ = await asyncio.wait(waiting | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise Unavailable("the client disconnected", kind=ErrorKind.DISCONNECTED)
            for future in done:
                future.result()  # raises the job's error
        return [job.future.result() for job in jobs]
    except BaseException:
        for job in jobs:
            if not job.future.done():
                engine.cancel(job)
        raise
    finally:
        watcher.cancel()


async def _encode(params: GenParams, result: JobResult, output_format: str, quality: int,
                  job_id: str) -> bytes:
    """The image encoded off the event loop. An encoder failure is a bug: logged with its
    traceback under the job id and answered 500 naming the job, like a failed generation."""
    text = parameters_text(params, result.seed, result.sampler_label)
    try:
        return await asyncio.to_thread(encode_image, result.image, output_format, text, quality)
    except Exception:
        logger.exception("job %s: encoding the image as %s failed", job_id, output_format)
        raise InternalError(
            f"internal error while encoding the image (job {job_id}); the server log has the "
            "details and the server goes on serving"
        ) from None


def check_queue_share(engine: EngineAPI, client: str, count: int, share: int) -> None:
    """429 (`KeyQueueFull`, Retry-After) when `count` more jobs would take `client` past its
    share of the queue, so one key cannot fill the queue that every key shares (MAX_QUEUE).

    A key's waiting jobs count, each image of a request one job; its running jobs do not (they
    hold a worker, not room in the queue, and the fair queue gives workers to keys in turn).
    A request is never split: one bigger than the whole share goes in when the key has nothing
    waiting, so a key can always be served, at most one request past its share. Checked on
    the event loop right before the jobs are submitted (nothing awaits in between), through
    EngineAPI.waiting, so it holds for this machine's Engine and the Ray ingress alike."""
    waiting = engine.waiting(client)
    if not waiting or len(waiting) + count <= share:
        return
    place = engine.queue_position(waiting[0]) or 1
    raise KeyQueueFull(
        f"this caller already has {len(waiting)} jobs waiting and its share of the queue is {share} "
        f"jobs (setting CRAFTSERVE_MAX_QUEUE_PER_KEY, or queue=N on the key's line of the keys "
        f"file); this request would add {count}. Retry once some of them have started; other keys' "
        "jobs are not in the way",
        retry_after=min(MAX_SHARE_RETRY_S, place * RETRY_S_PER_PLACE),
    )


def submit_job(body: ImageRequest, *, client: str, share: int, engine: EngineAPI, registry: Registry,
               settings: Settings) -> Job:
    """One job for `body`, queued (the key's share, fairness, bound, deadline) without awaiting
    it: the job API (POST /jobs) follows it by its future and its `step`."""
    params = to_params(body, registry, settings)
    check_queue_share(engine, client, 1, share)
    return engine.submit(params, client)


async def encode_result(params: GenParams, result: JobResult, job_id: str,
                        output_format: str = "png", quality: int = 100) -> bytes:
    """A finished job's image, encoded off the event loop with its `parameters` text."""
    return await _encode(params, result, output_format, quality, job_id)


async def generate_images(
    body: ImageRequest,
    count: int,
    request: Request,
    *,
    client: str,
    share: int,
    engine: EngineAPI,
    registry: Registry,
    settings: Settings,
    output_format: str = "png",
    quality: int = 100,
) -> list[Generated]:
    """`count` images of one request for the authenticated `client` (a key label), seeds
    seed, seed+1, ... (A1111's convention); they are compatible jobs, so the engine batches
    them. `share`: the jobs the client may have waiting (`check_queue_share`). Any failure
    fails the request and takes back its other jobs. Images are encoded as `output_format`
    (png, jpeg, webp; `quality` for the lossy ones), off the event loop."""
    first = to_params(body, registry, settings)
    all_params = [replace(first, seed=(first.seed + i) % (MAX_SEED + 1)) for i in range(count)]
    check_queue_share(engine, client, count, share)
    jobs: list[Job] = []
    try:
        for params in all_params:
            jobs.append(engine.submit(params, client))
    except BaseException:  # e.g. the queue filled up half-way: take back what went in
        for job in jobs:
            engine.cancel(job)
        raise
    results = await run_jobs(engine, jobs, request)
    encoded = await asyncio.gather(*(_encode(p, r, output_format, quality, job.id)
                                     for p, r, job in zip(all_params, results, jobs, strict=True)))
    return [Generated(data, params, result, job.id)
            for data, params, result, job in zip(encoded, all_params, results, jobs, strict=True)]
