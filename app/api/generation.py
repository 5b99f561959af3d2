"""From a validated request to PNG bytes: the shared core of every generation route."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

from fastapi import Request
from fastapi.responses import Response

from app.auth import Authenticator, bearer_token
from app.config import Settings
from app.engine.engine import Engine
from app.engine.jobs import GenParams, Job, JobResult
from app.engine.loras import LoraError
from app.errors import InvalidParameter, NotServed, Unavailable
from app.families import family_label
from app.imaging import encode_png, parameters_text
from app.registry import Registry
from app.samplers import resolve_sampler
from app.schemas import MAX_SEED, GenerateRequest

DEFAULT_SAMPLER = "DPM++ 2M Karras"


def to_params(body: GenerateRequest, registry: Registry, settings: Settings) -> GenParams:
    """Check the request against the registry and the settings; resolve every name."""
    spec = registry.models.get(body.model)
    if spec is None:
        raise NotServed("model", body.model, registry.models)
    for field in ("prompt", "negative_prompt"):
        text = getattr(body, field)
        if len(text) > settings.max_prompt_length:
            raise InvalidParameter(
                field,
                f"<{len(text)} characters>",
                f"at most {settings.max_prompt_length} characters "
                "(setting CRAFTSERVE_MAX_PROMPT_LENGTH)",
            )
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
        if lora.error:
            raise LoraError(name, lora.error)
        if lora.family and lora.family != spec.family:
            raise LoraError(
                name,
                f"it is a {family_label(lora.family)} LoRA and model '{spec.name}' is "
                f"{family_label(spec.family)}; pick a LoRA made for {family_label(spec.family)}",
            )
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
    )


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_jobs(engine: Engine, jobs: list[Job], request: Request) -> list[JobResult]:
    """Await the jobs of one request. If the client leaves or a job fails (the queue answers
    a job that outlives its deadline), the request fails and its other jobs are taken back."""
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        while not all(job.future.done() for job in jobs):
            waiting = {job.future for job in jobs if not job.future.done()}
            done, _ = await asyncio.wait(waiting | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise Unavailable("the client disconnected", kind="disconnected")
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


def _client_label(body: GenerateRequest, request: Request, auth: Authenticator) -> str:
    token = body.token or bearer_token(request.headers.get("authorization"))
    return auth.authenticate(token, request.client.host if request.client else None)


async def _encode(params: GenParams, result: JobResult) -> bytes:
    text = parameters_text(params, result.seed, result.sampler_label)
    return await asyncio.to_thread(encode_png, result.image, text)


async def generate_png(
    body: GenerateRequest,
    request: Request,
    *,
    engine: Engine,
    registry: Registry,
    settings: Settings,
    auth: Authenticator,
) -> Response:
    client = _client_label(body, request, auth)
    params = to_params(body, registry, settings)
    job = engine.submit(params, client)
    (result,) = await run_jobs(engine, [job], request)
    png = await _encode(params, result)
    headers = {
        "X-Job-Id": job.id,
        "X-Seed": str(result.seed),
        "X-Model": params.model,
        "X-Sampler": result.sampler_label,
        "X-Queue-Wait-Ms": f"{result.queue_wait_s * 1000:.1f}",
        "X-Generation-Ms": f"{result.generation_s * 1000:.1f}",
        "X-Batch-Size": str(result.batch_size),
        "X-Worker": result.worker,
    }
    return Response(png, media_type="image/png", headers=headers)


async def generate_many(
    body: GenerateRequest,
    count: int,
    request: Request,
    *,
    engine: Engine,
    registry: Registry,
    settings: Settings,
    auth: Authenticator,
) -> list[bytes]:
    """`count` images of one request, seeds seed, seed+1, ... (A1111's convention); they are
    compatible jobs, so the engine batches them. Any failure fails the request."""
    client = _client_label(body, request, auth)
    first = to_params(body, registry, settings)
    all_params = [replace(first, seed=(first.seed + i) % (MAX_SEED + 1)) for i in range(count)]
    jobs: list[Job] = []
    try:
        for params in all_params:
            jobs.append(engine.submit(params, client))
    except BaseException:  # e.g. the queue filled up half-way: take back what went in
        for job in jobs:
            engine.cancel(job)
        raise
    results = await run_jobs(engine, jobs, request)
    return list(await asyncio.gather(*(_encode(p, r) for p, r in zip(all_params, results,
                                                                        strict=True))))
