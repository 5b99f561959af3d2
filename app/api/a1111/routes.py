"""The /sdapi/v1 routes: txt2img, progress and stopping, options, discovery, refresh."""

from __future__ import annotations

import asyncio
import base64
import html
import time
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from app.api.a1111.controlnet import png_base64, read_units
from app.api.a1111.errors import ADMIN_ERRORS, AUTH_ERRORS, GENERATION_ERRORS, INPUT_ERRORS, REFRESH_FAILED
from app.api.a1111.hashes import lora_file_metadata, short
from app.api.a1111.models import (
    A1111Embeddings,
    A1111ExtraBatchRequest,
    A1111ExtraSingleRequest,
    A1111Img2ImgRequest,
    A1111LatentUpscaleMode,
    A1111Lora,
    A1111Options,
    A1111Progress,
    A1111ProgressState,
    A1111Sampler,
    A1111Scheduler,
    A1111ScriptsList,
    A1111SdModel,
    A1111SdVae,
    A1111Txt2ImgRequest,
    A1111Txt2ImgResponse,
    A1111Upscaler,
)
from app.api.a1111.state import A1111State
from app.api.a1111.translate import Plan, answer, plan, plan_img2img
from app.api.admin import ReloadsDep, reload_models
from app.api.bodies import ImageRoute
from app.api.credentials import AdminDep, CallerDep, GeneratingCallerDep, QueueShareDep
from app.api.deps import EngineDep, RegistryDep, SettingsDep, TrackerDep
from app.api.generation import extras_size, generate_images, upscale_image
from app.api.job_tracker import JobTracker
from app.api.rules import check_range
from app.engine.jobs import Job
from app.engine.protocol import EngineAPI
from app.engine.upscalers import LATENT_MODES, PIXEL_BUILTINS
from app.errors import CraftError, Interrupted, InvalidParameter
from app.samplers import SAMPLERS, SCHEDULES, a1111_sampler_names, resolve_sampler

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=ImageRoute)


def _state(request: Request) -> A1111State:
    return request.app.state.a1111


StateDep = Annotated[A1111State, Depends(_state)]


# ---- routes: generation ----------------------------------------------------------------------
@router.post("/txt2img", response_model=A1111Txt2ImgResponse, responses=GENERATION_ERRORS,
             summary="Text to image (A1111)")
async def txt2img(
    body: A1111Txt2ImgRequest,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    state: StateDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> JSONResponse:
    """A txt2img body as the shared core's request (translate.plan), its images as A1111's
    answer (translate.answer); an interrupt or skip by the same key answers 409."""
    planned = await _with_units(plan(body, state, client, registry, settings), body, settings)
    return await _run(planned, body, request, client, share, state, engine, registry, settings)


@router.post("/img2img", response_model=A1111Txt2ImgResponse,
             responses={**GENERATION_ERRORS, 404: {"description": "no init image (A1111's \"Init "
                                                                  "image not found\")"}},
             summary="Image to image and inpainting (A1111)")
async def img2img(
    body: A1111Img2ImgRequest,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    state: StateDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> JSONResponse:
    """txt2img's fields plus the pictures (`init_images`, `mask`) and A1111's img2img knobs with
    its API's defaults (translate.plan_img2img); answered as txt2img is."""
    planned = await _with_units(await plan_img2img(body, state, client, registry, settings), body,
                                settings)
    return await _run(planned, body, request, client, share, state, engine, registry, settings)


async def _with_units(planned: Plan, body: A1111Txt2ImgRequest, settings: Any) -> Plan:
    """The plan with the body's ControlNet units (alwayson_scripts.controlnet.args)."""
    units = await read_units(body.alwayson_scripts, settings)
    if not units:
        return planned
    return replace(planned, request=replace(planned.request, controlnet=units))


async def _run(planned: Plan, body: A1111Txt2ImgRequest, request: Request, client: str, share: int,
               state: A1111State, engine: EngineAPI, registry: Any, settings: Any) -> JSONResponse:
    detected: list[Any] = []
    try:
        generated = await generate_images(planned.request, planned.batch_size * planned.n_iter, request,
                                          client=client, share=share, engine=engine,
                                          registry=registry, settings=settings, detected=detected)
    except CraftError as exc:
        if exc.kind.stopped:  # the worker's words for a stopped job
            raise Interrupted() from exc
        raise
    restore = body.override_settings_restore_afterwards is not False
    if not restore and body.override_settings:
        state.update(client, body.override_settings)  # A1111: the overrides stay (for this key)
    hashes = await state.hashes.for_info(planned.request.model, list(planned.request.loras))
    answered = answer(planned, generated, registry, restore, hashes=hashes)
    if detected and planned.send_images:  # the extension appends each unit's detected map
        answered["images"] += [await asyncio.to_thread(png_base64, image) for image in detected]
    return JSONResponse(answered)


async def _extras(body: A1111ExtraSingleRequest, value: str | None, field: str, request: Request,
                  client: str, share: int, engine: EngineAPI, registry: Any, settings: Any,
                  ) -> tuple[str, str]:
    """One picture through A1111's extras upscaling: (base64 PNG, html_info)."""
    from app.image_inputs import read_image

    if not value:
        raise InvalidParameter(field, value, "send a base64 picture")
    upscaler = body.upscaler_1 or "None"
    upscaler_2 = body.upscaler_2 if body.upscaler_2 and body.upscaler_2 != "None" else None
    visibility = float(body.extras_upscaler_2_visibility or 0)
    check_range("extras_upscaler_2_visibility", visibility, 0, 1)
    mode = body.resize_mode or 0
    check_range("resize_mode", mode, 0, 1, note=" (0 by upscaling_resize, 1 to upscaling_resize_w x _h)")
    image = await read_image(field, value, settings)
    if upscaler == "None" and upscaler_2 is None:  # A1111's extras: no upscaler, the picture as it is
        size = out_size = image.size
    elif mode == 0:
        scale = 2.0 if body.upscaling_resize is None else float(body.upscaling_resize)
        check_range("upscaling_resize", scale, 1, 8)
        size, out_size = extras_size(image.size, scale=scale)
    else:
        to = (body.upscaling_resize_w or 512, body.upscaling_resize_h or 512)
        for name, side in (("upscaling_resize_w", to[0]), ("upscaling_resize_h", to[1])):
            check_range(name, side, 1, 8192)
        size, out_size = extras_size(image.size, to=to, crop=body.upscaling_crop is not False)
    try:
        done = await upscale_image(image, request, upscaler=upscaler, size=size, out_size=out_size,
                                   client=client, share=share, engine=engine, registry=registry,
                                   settings=settings, upscaler_2=upscaler_2, visibility=visibility)
    except CraftError as exc:
        if exc.kind.stopped:
            raise Interrupted() from exc
        raise
    return base64.b64encode(done.data).decode("ascii"), f"<p>{html.escape(done.info)}</p>"


@router.post("/extra-single-image", response_model=dict[str, Any], responses=GENERATION_ERRORS,
             summary="Upscale one picture (A1111's extras): `upscaler_1` by `upscaling_resize` or to "
                     "`upscaling_resize_w` x `_h`")
async def extra_single_image(body: A1111ExtraSingleRequest, request: Request, client: GeneratingCallerDep,
                             share: QueueShareDep, engine: EngineDep, registry: RegistryDep,
                             settings: SettingsDep) -> dict[str, Any]:
    image, info = await _extras(body, body.image, "image", request, client, share, engine, registry,
                                settings)
    return {"image": image, "html_info": info}


@router.post("/extra-batch-images", response_model=dict[str, Any], responses=GENERATION_ERRORS,
             summary="Upscale several pictures (A1111's extras): `imageList` [{data, name}]")
async def extra_batch_images(body: A1111ExtraBatchRequest, request: Request, client: GeneratingCallerDep,
                             share: QueueShareDep, engine: EngineDep, registry: RegistryDep,
                             settings: SettingsDep) -> dict[str, Any]:
    pictures = body.imageList or []
    if not pictures:
        raise InvalidParameter("imageList", None, "send at least one {\"data\": base64 picture}")
    limit = settings.a1111_max_images
    if len(pictures) > limit:
        raise InvalidParameter("imageList", f"<{len(pictures)} images>", f"at most {limit} pictures a "
                               "request (setting CRAFTSERVE_A1111_MAX_IMAGES)")
    images, info = [], ""
    for index, item in enumerate(pictures):
        image, info = await _extras(body, item.data, f"imageList[{index}].data", request, client, share,
                                    engine, registry, settings)
        images.append(image)
    return {"images": images, "html_info": info}


def _running(engine: EngineAPI, client: str, tracker: JobTracker) -> tuple[list[Job], list[Job]]:
    """The caller's (running, waiting) jobs. A job already answered is neither, even while its
    worker is still letting go of it: its future is settled on this loop before the answer, and
    a job the job API finished or cancelled (DELETE /jobs/{id}) is over for its client."""
    waiting = engine.waiting(client)
    running = [job for job in engine.jobs_of(client)
               if not job.future.done() and all(job is not w for w in waiting)]
    return ([job for job in running if not tracker.ended_through_api(job.id)],
            [job for job in waiting if not tracker.ended_through_api(job.id)])


@router.get("/progress", response_model=A1111Progress, responses=AUTH_ERRORS,
            summary="The caller's current job (A1111's progress; no previews)")
async def progress(client: CallerDep, engine: EngineDep, state: StateDep, tracker: TrackerDep,
                   skip_current_image: bool = False) -> A1111Progress:
    running, waiting = _running(engine, client, tracker)
    jobs = running + waiting
    if not jobs:
        return A1111Progress(progress=0.0, eta_relative=0.0, state=A1111ProgressState())
    job = jobs[0]
    steps = job.params.total_steps
    done = min(job.step, steps) if running else 0
    fraction = done / steps if steps else 0.0
    eta = 0.0
    if running and done and job.started_at is not None:
        elapsed = time.monotonic() - job.started_at
        eta = elapsed * (steps - done) / done
    started = "0" if job.started_at is None else time.strftime(
        "%Y%m%d%H%M%S", time.localtime(time.time() - (time.monotonic() - job.started_at)))
    return A1111Progress(
        progress=fraction, eta_relative=eta,
        state=A1111ProgressState(
            skipped=job in state.skipped, interrupted=job.cancelled.is_set(), job=job.id,
            job_count=len(jobs), job_no=0, sampling_step=done, sampling_steps=steps,
            job_timestamp=started,
        ),
    )


def _stop(engine: EngineAPI, job: Job) -> None:
    engine.cancel(job, Interrupted())


@router.post("/interrupt", response_model=dict[str, Any], responses=AUTH_ERRORS,
             summary="Stop every job of the caller, running and waiting")
async def interrupt(client: CallerDep, engine: EngineDep, tracker: TrackerDep) -> dict[str, Any]:
    running, waiting = _running(engine, client, tracker)
    for job in running + waiting:
        _stop(engine, job)
    return {}


@router.post("/skip", response_model=None, responses=AUTH_ERRORS,
             summary="Stop the caller's running jobs; its waiting jobs go on")
async def skip(client: CallerDep, engine: EngineDep, state: StateDep, tracker: TrackerDep) -> None:
    running, _ = _running(engine, client, tracker)
    for job in running:
        state.skipped.add(job)
        _stop(engine, job)


# ---- routes: options -------------------------------------------------------------------------
@router.get("/options", response_model=None, responses={200: {"model": A1111Options}, **AUTH_ERRORS},
            summary="The caller's A1111 options: its model for A1111 requests, and its kept keys")
async def get_options(client: CallerDep, state: StateDep) -> dict[str, Any]:
    await state.hashes.ensure([state.checkpoint_name(client)])  # sd_checkpoint_hash, off the loop
    return state.options(client)


@router.post("/options", response_model=None, responses=INPUT_ERRORS,
             summary="Set the caller's options (never another key's); unknown keys are kept, not "
                     "applied; an error changes nothing")
async def set_options(
    client: CallerDep,
    state: StateDep,
    values: Annotated[dict[str, Any], Body(openapi_examples={"switch model": {
        "value": {"sd_model_checkpoint": "sdxl-base"}}})],
) -> None:
    state.update(client, values)


# ---- routes: discovery -----------------------------------------------------------------------
@router.get("/sd-models", response_model=list[A1111SdModel], responses=AUTH_ERRORS,
            summary="The served models (their `title` is what sd_model_checkpoint takes)")
async def sd_models(client: CallerDep, registry: RegistryDep, state: StateDep) -> list[A1111SdModel]:
    digests = await state.hashes.ensure(list(registry.models))
    return [A1111SdModel(title=name, model_name=name, hash=short(digests[name]), sha256=digests[name],
                         filename=spec.source)
            for name, spec in registry.models.items() if name in digests]


_ALIASES = {s.name: list(s.aliases) for s in SAMPLERS}


@router.get("/samplers", response_model=list[A1111Sampler], responses=AUTH_ERRORS,
            summary="Sampler names txt2img accepts")
async def samplers(client: CallerDep) -> list[A1111Sampler]:
    return [A1111Sampler(name=name, aliases=_ALIASES.get(name, []),
                    options={"scheduler": resolve_sampler(name).schedule})
            for name in a1111_sampler_names()]


@router.get("/schedulers", response_model=list[A1111Scheduler], responses=AUTH_ERRORS,
            summary="Schedule names txt2img's `scheduler` accepts")
async def schedulers(client: CallerDep) -> list[A1111Scheduler]:
    automatic = A1111Scheduler(name="automatic", label="Automatic")
    return [automatic] + [A1111Scheduler(name=s.name, label=s.suffix,
                                    default_rho=7.0 if s.name == "karras" else -1)
                          for s in SCHEDULES]


@router.get("/loras", response_model=list[A1111Lora], responses=AUTH_ERRORS,
            summary="The LoRAs `<lora:NAME:WEIGHT>` tags may name")
async def loras(client: CallerDep, registry: RegistryDep) -> list[A1111Lora]:
    table = registry.loras
    models = registry.models.values()
    names = registry.lora_names()
    files = await asyncio.to_thread(lambda: {name: lora_file_metadata(table[name].path) for name in names})
    return [A1111Lora(name=name, alias=name, path=str(table[name].path),
                      metadata={**files[name],
                                "models": [m.name for m in models if table[name].misfit(m) is None]})
            for name in names]


@router.get("/sd-vae", response_model=list[A1111SdVae], responses=AUTH_ERRORS,
            summary="Always empty: each model runs with its own VAE (models.yaml)")
async def sd_vae(client: CallerDep) -> list[A1111SdVae]:
    return []


@router.get("/upscalers", response_model=list[A1111Upscaler], responses=AUTH_ERRORS,
            summary="The pixel upscalers hr_upscaler and the extras take: None, Lanczos, Nearest "
                    "and the model upscalers of models.yaml's upscaler_dirs")
async def upscalers(client: CallerDep, registry: RegistryDep) -> list[A1111Upscaler]:
    builtin = [A1111Upscaler(name=name, model_name=None, model_path=None, model_url=None,
                             scale=4 if name != "None" else 1)
               for name in PIXEL_BUILTINS]
    models = getattr(registry, "upscalers", {}) or {}
    return builtin + [A1111Upscaler(name=name, model_name=name, model_path=str(spec.path), model_url=None,
                                    scale=spec.scale or 4)
                      for name, spec in sorted(models.items())]


@router.get("/latent-upscale-modes", response_model=list[A1111LatentUpscaleMode], responses=AUTH_ERRORS,
            summary="The latent modes hr_upscaler takes")
async def latent_upscale_modes(client: CallerDep) -> list[A1111LatentUpscaleMode]:
    return [A1111LatentUpscaleMode(name=name) for name in LATENT_MODES]


@router.get("/scripts", response_model=A1111ScriptsList, responses=AUTH_ERRORS,
            summary="Always empty (ControlNet units in alwayson_scripts run all the same)")
async def scripts(client: CallerDep) -> A1111ScriptsList:
    return A1111ScriptsList()


@router.get("/embeddings", response_model=A1111Embeddings, responses=AUTH_ERRORS,
            summary="Textual inversion embeddings (models.yaml embedding_dirs): `loaded` those of "
            "sd_model_checkpoint's family, `skipped` the others")
async def embeddings(client: CallerDep, registry: RegistryDep, state: StateDep) -> A1111Embeddings:
    family = registry.models[state.checkpoint(client)].family
    listing = A1111Embeddings()
    for spec in registry.embeddings:
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                 "shape": spec.width, "vectors": spec.vectors}
        (listing.loaded if spec.family == family else listing.skipped)[spec.name] = entry
    return listing


@router.post("/refresh-checkpoints", response_model=None,
             responses={**ADMIN_ERRORS, 500: REFRESH_FAILED},
             summary="Read models.yaml and its folders again (as POST /admin/reload does; admin key)")
async def refresh_checkpoints(client: AdminDep, reloads: ReloadsDep) -> None:
    await reload_models(reloads)


@router.post("/refresh-loras", response_model=None,
             responses={**ADMIN_ERRORS, 500: REFRESH_FAILED},
             summary="Read models.yaml and its folders again (as POST /admin/reload does; admin key)")
async def refresh_loras(client: AdminDep, reloads: ReloadsDep) -> None:
    await reload_models(reloads)

