"""AUTOMATIC1111's web UI API (`/sdapi/v1/...`): a translator onto the shared generation core.

What webuiapi, Open WebUI (A1111 mode) and SillyTavern send is mapped onto an `ImageRequest`
(app.api.generation); the answer is A1111's `{"images", "parameters", "info"}` and every error
under `/sdapi/` is A1111's `{"error", "detail", "body", "errors"}` (`render_error`).

Choices (documented in README.md and docs/clients.md):
- Auth: HTTP Basic with the API key as the password (any user name; a credential without a
  password is read as the key) or `Authorization: Bearer <key>`, on every route (A1111 with
  `--api-auth` does the same); missing or wrong: 401 with `WWW-Authenticate: Basic`. With
  --allow-anonymous, a header that is not a valid key (clients send `Basic ` with nothing after
  it) is ignored and the caller is anonymous; a valid key still names its caller.
- Options (`GET/POST options`) are one dict per server, in `app.state.a1111` (`A1111State`),
  shared by every key and lost on restart, as in A1111. `sd_model_checkpoint` (first model of
  models.yaml until changed) is the model of requests whose override_settings name none.
- `CLIP_stop_at_last_layers` / `clip_skip` (1-12) is applied as A1111 does: on SD 1.x models the
  n-th layer from the end, then the final norm; SDXL always uses the penultimate layer (A1111's
  default, its `sdxl_clip_l_skip` off), so there it changes nothing, as in A1111.
- Every A1111 feature craftserve does not run (hires fix, face restoration, tiling, styles,
  scripts, subseeds, refiner) is accepted and named in `info.craftserve_not_applied`.
- `interrupt` stops every job of the caller (running and waiting, whatever route submitted them),
  `skip` only its running ones; never another key's. A running job that shares its batch with
  another key's job finishes (stopping the batch would stop that job too). An interrupted request
  answers 409 `Interrupted`: craftserve has no half-done image to return.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.openapi.models import HTTPBase
from fastapi.responses import JSONResponse, Response
from fastapi.security.base import SecurityBase

from app import __version__
from app.api.a1111_schemas import (
    DEFAULT_CFG,
    DEFAULT_SAMPLER,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    MAX_CFG,
    MIN_CFG,
    MIN_SIDE,
    A1111Embeddings,
    A1111Error,
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
from app.api.deps import AuthDep, EngineDep, RegistryDep, SettingsDep
from app.api.errors import ErrorInfo
from app.api.generation import Generated, ImageRequest, check_clip_skip, generate_images
from app.config import Settings
from app.engine.engine import Engine
from app.engine.jobs import Job
from app.errors import (
    CraftError,
    Forbidden,
    Interrupted,
    InvalidParameter,
    NotServed,
    RefreshFailed,
    Unauthorized,
)
from app.imaging import parameters_text
from app.registry import Registry
from app.samplers import SAMPLERS, SCHEDULES, a1111_sampler_names, resolve_sampler
from app.schemas import MAX_LORA_WEIGHT, MAX_SEED

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

MAX_NAME_LENGTH = 200  # sampler, scheduler, checkpoint, VAE names: longer ones are refused unread
MAX_OPTIONS_BYTES = 1 << 20  # the kept, unapplied options keys of a server, as JSON
_VAE_CHOICES = {"automatic": "Automatic", "none": "None", "": "Automatic"}
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>", re.IGNORECASE)
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]*\]\s*$")  # A1111 titles end with " [hash]"


# ---- errors ----------------------------------------------------------------------------------
_NAMES = {Interrupted.kind: "Interrupted"}


def _class_name(kind: str) -> str:
    return _NAMES.get(kind) or "".join(part.capitalize() for part in kind.split("_")) or "Error"


def render_error(request: Request, info: ErrorInfo) -> Response:
    """Every error under /sdapi/ in A1111's shape: `error` (the class), `detail` (the message),
    `body`, and `errors` (the message, or the validation details). A 401 carries the Basic
    challenge clients answer with their configured user and password."""
    validation = info.errors is not None
    body = {
        "error": "RequestValidationError" if validation else _class_name(info.kind),
        "detail": info.message,
        "body": "",
        "errors": info.errors if validation else info.message,
    }
    headers = dict(info.headers)
    if info.status == 401:
        headers.setdefault("WWW-Authenticate", "Basic")
    return JSONResponse(body, status_code=info.status, headers=headers)


def _error(description: str) -> dict:
    return {"model": A1111Error, "description": description}


_AUTH_ERRORS = {401: _error("missing or wrong API key (`WWW-Authenticate: Basic`)")}
_INPUT_ERRORS = {
    **_AUTH_ERRORS,
    422: _error("a field out of range or of the wrong type, malformed JSON, an unknown model, "
                "sampler, scheduler or LoRA, a `<lora:...>` tag without a numeric weight; the "
                "message names the field and the value"),
}
_GENERATION_ERRORS = {
    **_INPUT_ERRORS,
    409: _error("`Interrupted`: POST /sdapi/v1/interrupt or skip with the same key stopped it"),
    500: _error("a bug; the server log has it under the job id"),
    429: _error("the key is past its rate limit (with `Retry-After`)"),
    503: _error("the queue is full, a job outlived its queue deadline, the model cannot be served "
                "now, out of memory, or the server is shutting down (with `Retry-After`)"),
}


def _shown(value: str, limit: int = 60) -> str:
    """A value for a message, cut short (a client may send a base64 blob anywhere)."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


def _name(field: str, value: Any) -> str:
    """A name field (sampler, checkpoint, ...): a string short enough to look up and echo."""
    if not isinstance(value, str):
        raise InvalidParameter(field, value, f"{field} must be a string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidParameter(field, _shown(value), f"{field} is a name of at most {MAX_NAME_LENGTH} "
                               "characters")
    return value


# ---- authentication --------------------------------------------------------------------------
class _Header(SecurityBase):
    """One way to send the key, for the OpenAPI document; the header is read by `_client`."""

    def __init__(self, scheme: str, description: str) -> None:
        self.model = HTTPBase(scheme=scheme, description=description)
        self.scheme_name = f"a1111_{scheme}"

    async def __call__(self, request: Request) -> str | None:
        return request.headers.get("authorization")


_basic = _Header("basic", "any user name, the craftserve API key as the password")
_bearer = _Header("bearer", "a craftserve API key")
_BAD = object()  # a header that is not a credential at all


def _token(header: str | None) -> str | object | None:
    """The key in an Authorization header: None when there is none, _BAD when unreadable."""
    if not header or not header.strip():
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() != "basic":
        return _BAD
    if not value:
        return None  # `Basic ` with nothing after it: what clients send with no user configured
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return _BAD
    user, colon, password = decoded.partition(":")
    return (password or user if colon else decoded) or None


def _client(
    request: Request,
    auth: AuthDep,
    basic: Annotated[str | None, Depends(_basic)],
    bearer: Annotated[str | None, Depends(_bearer)],
) -> str:
    """The caller's key label; 401 otherwise. A dependency, so the key is checked before the
    body is validated."""
    token = _token(basic)
    host = request.client.host if request.client else None
    if token is _BAD:
        if not auth.allow_anonymous:
            raise Unauthorized("Invalid API key: the Authorization header is neither HTTP Basic nor "
                               "Bearer", headers={"WWW-Authenticate": "Basic"})
        token = None  # anonymous access: a header that is not a key is ignored
    try:
        return auth.authenticate(token, host)  # type: ignore[arg-type]
    except Forbidden:
        message = ("Invalid API key" if token else
                   "Missing API key: send HTTP Basic auth with the craftserve API key as the password "
                   "(any user name), or `Authorization: Bearer <key>`")
        raise Unauthorized(message, headers={"WWW-Authenticate": "Basic"}) from None


def _generating_client(request: Request, auth: AuthDep, client: Annotated[str, Depends(_client)]) -> str:
    """`_client`, and the request counts against the caller's rate limit (429 past it), as every
    generation request of every dialect does; discovery and status routes do not count."""
    auth.admit(client)
    return client


ClientDep = Annotated[str, Depends(_client)]
GeneratingClientDep = Annotated[str, Depends(_generating_client)]


# ---- per-server state: options and skipped jobs ----------------------------------------------
def _find_model(value: str, registry: Registry) -> str | None:
    """The served model a checkpoint name means: the name itself, or an A1111-style title of it
    (`name.safetensors [hash]`), any case."""
    if value in registry.models:
        return value
    key = _TITLE_HASH.sub("", value).strip()
    for extension in (".safetensors", ".ckpt"):
        key = key.removesuffix(extension)
    return {name.lower(): name for name in registry.models}.get(key.lower())


def _model(field: str, value: Any, registry: Registry) -> str:
    name = _name(field, value)
    model = _find_model(name, registry)
    if model is None:
        raise NotServed(field, name, registry.models)
    return model


def _vae(field: str, value: Any) -> str:
    name = _name(field, value)
    choice = _VAE_CHOICES.get(name.strip().lower())
    if choice is None:
        raise InvalidParameter(
            field, name, "this server does not switch VAEs: each model runs with the VAE models.yaml "
            "gives it; send 'Automatic' or 'None', or leave it out")
    return choice


class A1111State:
    """What A1111 keeps between requests, one per server (app.state.a1111): the options dict and
    the jobs a `skip` stopped (for GET progress). Used from the event loop only."""

    def __init__(self, registry: Registry) -> None:
        self.checkpoint = next(iter(registry.models))  # the first model of models.yaml
        self.sd_vae = "Automatic"
        self.clip_skip = 1
        self.kept: dict[str, Any] = {}  # other keys clients POSTed: kept, not applied
        self.skipped: weakref.WeakSet[Job] = weakref.WeakSet()

    def options(self) -> dict[str, Any]:
        return {**self.kept, "sd_model_checkpoint": self.checkpoint, "sd_checkpoint_hash": None,
                "sd_vae": self.sd_vae, "CLIP_stop_at_last_layers": self.clip_skip}

    def update(self, values: Mapping[str, Any], registry: Registry) -> None:
        """Apply a POSTed options dict: all of it, or (on any error) none of it."""
        checkpoint, sd_vae, clip_skip = self.checkpoint, self.sd_vae, self.clip_skip
        kept = dict(self.kept)
        for key, value in values.items():
            if key == "sd_checkpoint_hash":
                continue  # derived from the checkpoint
            if value is None and key in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"):
                continue
            if key == "sd_model_checkpoint":
                checkpoint = _model(key, value, registry)
            elif key == "sd_vae":
                sd_vae = _vae(key, value)
            elif key == "CLIP_stop_at_last_layers":
                clip_skip = check_clip_skip(key, value)
            else:
                kept[key] = value
        size = len(json.dumps(kept, default=str))
        if size > MAX_OPTIONS_BYTES:
            raise InvalidParameter("options", f"<{size} bytes of other keys>",
                                   f"keys this server does not use are kept up to {MAX_OPTIONS_BYTES} "
                                   "bytes of JSON")
        self.checkpoint, self.sd_vae, self.clip_skip, self.kept = checkpoint, sd_vae, clip_skip, kept


async def _state(request: Request) -> A1111State:  # async: runs on the loop, no race to create it
    state = getattr(request.app.state, "a1111", None)
    if state is None:
        state = request.app.state.a1111 = A1111State(request.app.state.registry)
    return state


StateDep = Annotated[A1111State, Depends(_state)]


# ---- txt2img translation ---------------------------------------------------------------------
def split_loras(prompt: str, apply: bool = True) -> tuple[str, dict[str, float]]:
    """Take every `<lora:NAME:WEIGHT>` (and `<lyco:...>`) tag out of the prompt: the text without
    them, and {name: weight} (a name tagged twice gets the sum, as A1111 applies both)."""
    loras: dict[str, float] = {}
    for match in _LORA_TAG.finditer(prompt):
        tag = match.group(0)
        name, *weights = (part.strip() for part in match.group(1).split(":"))
        if not name:
            raise InvalidParameter("prompt", tag, "a LoRA tag is <lora:NAME:WEIGHT>, e.g. "
                                   "<lora:my-style:0.8>, with NAME as GET /sdapi/v1/loras lists it")
        if not weights or not weights[0]:
            raise InvalidParameter("prompt", tag, f"the tag has no weight; write <lora:{name}:WEIGHT>, "
                                   f"e.g. <lora:{name}:0.8>")
        if len(weights) > 1:
            raise InvalidParameter("prompt", tag, "separate text-encoder and UNet weights are not "
                                   f"supported; give one weight, e.g. <lora:{name}:0.8>")
        try:
            weight = float(weights[0])
        except ValueError:
            raise InvalidParameter("prompt", tag, f"the weight {weights[0]!r} is not a number; write "
                                   f"e.g. <lora:{name}:0.8>") from None
        if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
            raise InvalidParameter("prompt", tag, f"a LoRA weight is a number from "
                                   f"-{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}")
        if apply:
            loras[name] = loras.get(name, 0.0) + weight
    return _LORA_TAG.sub("", prompt).strip(), loras


def _in_range(field: str, value: int | float, low: float, high: float, rule: str = "") -> None:
    if not low <= value <= high:
        raise InvalidParameter(field, value, f"{field} must be between {low:g} and {high:g}{rule}")


@dataclass(frozen=True)
class _Plan:
    """A txt2img body as understood: the core's request and what the answer reports."""

    request: ImageRequest
    prompt: str  # as sent, tags included (A1111 reports it so)
    batch_size: int
    n_iter: int
    sd_vae: str
    clip_skip: int
    not_applied: dict[str, Any]
    send_images: bool


def _not_applied(body: A1111Txt2ImgRequest) -> dict[str, Any]:
    """The fields sent with a value that would change the image in A1111 and changes nothing here."""
    found: dict[str, Any] = {}
    for field in ("enable_hr", "restore_faces", "tiling"):
        if getattr(body, field):
            found[field] = True
    if body.subseed_strength:
        found["subseed_strength"] = body.subseed_strength
    if (body.seed_resize_from_w or 0) > 0 or (body.seed_resize_from_h or 0) > 0:
        found["seed_resize_from"] = [body.seed_resize_from_w, body.seed_resize_from_h]
    if body.styles:
        found["styles"] = [_shown(s) for s in body.styles[:20]]
    if body.script_name:
        found["script_name"] = _shown(body.script_name)
    if body.alwayson_scripts:
        found["alwayson_scripts"] = [_shown(name) for name in list(body.alwayson_scripts)[:20]]
    if body.refiner_checkpoint and body.refiner_checkpoint.lower() != "none":
        found["refiner_checkpoint"] = _shown(body.refiner_checkpoint)
    return found


def _plan(body: A1111Txt2ImgRequest, state: A1111State, registry: Registry, settings: Settings) -> _Plan:
    overrides = body.override_settings or {}
    checkpoint = overrides.get("sd_model_checkpoint")
    model = state.checkpoint if checkpoint is None else _model(
        "override_settings.sd_model_checkpoint", checkpoint, registry)
    sd_vae = overrides.get("sd_vae")
    sd_vae = state.sd_vae if sd_vae is None else _vae("override_settings.sd_vae", sd_vae)
    clip_skip = state.clip_skip
    if body.clip_skip is not None:
        clip_skip = check_clip_skip("clip_skip", body.clip_skip)
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        clip_skip = check_clip_skip("override_settings.CLIP_stop_at_last_layers",
                               overrides["CLIP_stop_at_last_layers"])

    prompt = body.prompt or ""
    if len(prompt) > settings.max_prompt_length:  # before the tags are read (and echoed)
        raise InvalidParameter("prompt", f"<{len(prompt)} characters>",
                               f"at most {settings.max_prompt_length} characters "
                               "(setting CRAFTSERVE_MAX_PROMPT_LENGTH)")
    text, loras = split_loras(prompt, apply=not body.disable_extra_networks)

    sampler = body.sampler_name or body.sampler_index or DEFAULT_SAMPLER
    sampler = _name("sampler_name" if body.sampler_name else "sampler_index", sampler)
    scheduler = None if body.scheduler is None else _name("scheduler", body.scheduler)

    batch_size = 1 if body.batch_size is None else body.batch_size
    n_iter = 1 if body.n_iter is None else body.n_iter
    limit = settings.a1111_max_images
    images_rule = f" (batch_size x n_iter is at most {limit} images a request, setting " \
                  "CRAFTSERVE_A1111_MAX_IMAGES)"
    _in_range("batch_size", batch_size, 1, limit, images_rule)
    _in_range("n_iter", n_iter, 1, limit, images_rule)
    if batch_size * n_iter > limit:
        raise InvalidParameter("batch_size", batch_size, f"batch_size x n_iter = {batch_size * n_iter} "
                               f"images; at most {limit} a request (setting CRAFTSERVE_A1111_MAX_IMAGES)")
    steps = DEFAULT_STEPS if body.steps is None else body.steps
    _in_range("steps", steps, 1, settings.a1111_max_steps, " (setting CRAFTSERVE_A1111_MAX_STEPS)")
    width = DEFAULT_SIZE if body.width is None else body.width
    height = DEFAULT_SIZE if body.height is None else body.height
    for field, side in (("width", width), ("height", height)):
        _in_range(field, side, MIN_SIDE, settings.a1111_max_size, " (setting CRAFTSERVE_A1111_MAX_SIZE)")
    cfg_scale = DEFAULT_CFG if body.cfg_scale is None else float(body.cfg_scale)
    _in_range("cfg_scale", cfg_scale, MIN_CFG, MAX_CFG)
    seed = -1 if body.seed is None else body.seed
    _in_range("seed", seed, -1, MAX_SEED, " (-1: random)")

    request = ImageRequest(
        model=model, prompt=text, negative_prompt=body.negative_prompt or "", sampler=sampler,
        scheduler=scheduler, steps=steps, width=width, height=height, cfg_scale=cfg_scale,
        loras=loras, seed=seed, clip_skip=clip_skip,
    )
    return _Plan(request=request, prompt=prompt, batch_size=batch_size, n_iter=n_iter, sd_vae=sd_vae,
                 clip_skip=clip_skip, not_applied=_not_applied(body),
                 send_images=body.send_images is not False)


_SCHEDULE_BY_SUFFIX = {s.suffix: s for s in SCHEDULES}


def _schedule_ran(image: Generated) -> tuple[str, str]:
    """(A1111 label, name) of the schedule that ran, read from the label of what ran."""
    sampler, label = image.params.sampler.sampler, image.result.sampler_label
    suffix = label[len(sampler) + 1:] if label.startswith(sampler + " ") else "Normal"
    schedule = _SCHEDULE_BY_SUFFIX.get(suffix)
    return (suffix, schedule.name) if schedule else (suffix, suffix.lower())


def _answer(plan: _Plan, generated: list[Generated], registry: Registry,
            restore_afterwards: bool) -> dict[str, Any]:
    first = generated[0]
    params = first.params
    count = len(generated)
    seeds = [image.params.seed for image in generated]
    schedule_label, schedule_name = _schedule_ran(first)
    negative = params.negative_prompt
    vae = registry.models[params.model].vae
    info = {
        "prompt": plan.prompt, "all_prompts": [plan.prompt] * count,
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        "seed": seeds[0], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": params.width, "height": params.height,
        "sampler_name": params.sampler.sampler, "scheduler": schedule_label,
        "cfg_scale": params.cfg_scale, "steps": params.steps, "batch_size": plan.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": params.model, "sd_model_hash": None,
        "sd_vae_name": vae, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {"Schedule type": schedule_label},
        "index_of_first_image": 0,
        "infotexts": [parameters_text(g.params, g.result.seed, g.result.sampler_label)
                      for g in generated],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": plan.clip_skip, "is_using_inpainting_conditioning": False,
        "version": f"craftserve {__version__}",
        "craftserve_not_applied": plan.not_applied,
        "craftserve_job_ids": [g.job_id for g in generated],
    }
    parameters = {
        **_A1111_DEFAULTS,
        "prompt": plan.prompt, "negative_prompt": negative, "seed": seeds[0],
        "sampler_name": params.sampler.sampler, "sampler_index": params.sampler.sampler,
        "scheduler": schedule_name, "batch_size": plan.batch_size, "n_iter": plan.n_iter,
        "steps": params.steps, "cfg_scale": params.cfg_scale, "width": params.width,
        "height": params.height,
        "override_settings": {"sd_model_checkpoint": params.model, "sd_vae": plan.sd_vae,
                              "CLIP_stop_at_last_layers": plan.clip_skip},
        "override_settings_restore_afterwards": restore_afterwards,
        "send_images": plan.send_images,
    }
    images = [base64.b64encode(g.data).decode("ascii") for g in generated] if plan.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


# A1111's defaults of the fields craftserve does not apply: what `parameters` reports for them.
_A1111_DEFAULTS: dict[str, Any] = {
    "styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
    "seed_resize_from_w": -1, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "eta": None, "denoising_strength": None, "s_min_uncond": None,
    "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": None, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None,
    "script_name": None, "script_args": [], "save_images": False, "alwayson_scripts": {},
    "infotext": None,
}


# ---- routes: generation ----------------------------------------------------------------------
@router.post("/txt2img", response_model=A1111Txt2ImgResponse, responses=_GENERATION_ERRORS,
             summary="Text to image (A1111)")
async def txt2img(
    body: A1111Txt2ImgRequest,
    request: Request,
    client: GeneratingClientDep,
    state: StateDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> JSONResponse:
    plan = _plan(body, state, registry, settings)
    try:
        generated = await generate_images(plan.request, plan.batch_size * plan.n_iter, request,
                                          client=client, engine=engine, registry=registry,
                                          settings=settings)
    except CraftError as exc:
        if exc.kind in ("interrupted", "cancelled"):  # the worker's words for a stopped job
            raise Interrupted() from exc
        raise
    restore = body.override_settings_restore_afterwards is not False
    if not restore and body.override_settings:
        state.update(body.override_settings, registry)  # A1111: the overrides stay
    return JSONResponse(_answer(plan, generated, registry, restore))


def _running(engine: Engine, client: str) -> tuple[list[Job], list[Job]]:
    """The caller's (running, waiting) jobs. A job already answered is neither, even while its
    worker is still letting go of it (its future is settled on this loop before the answer)."""
    waiting = engine.waiting(client)
    running = [job for job in engine.jobs_of(client)
               if not job.future.done() and all(job is not w for w in waiting)]
    return running, waiting


@router.get("/progress", response_model=A1111Progress, responses=_AUTH_ERRORS,
            summary="The caller's current job (A1111's progress; no previews)")
async def progress(client: ClientDep, engine: EngineDep, state: StateDep,
                   skip_current_image: bool = False) -> A1111Progress:
    running, waiting = _running(engine, client)
    jobs = running + waiting
    if not jobs:
        return A1111Progress(progress=0.0, eta_relative=0.0, state=A1111ProgressState())
    job = jobs[0]
    steps = job.params.steps
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


def _stop(engine: Engine, job: Job) -> None:
    engine.cancel(job, Interrupted())


@router.post("/interrupt", response_model=dict[str, Any], responses=_AUTH_ERRORS,
             summary="Stop every job of the caller, running and waiting")
async def interrupt(client: ClientDep, engine: EngineDep) -> dict[str, Any]:
    running, waiting = _running(engine, client)
    for job in running + waiting:
        _stop(engine, job)
    return {}


@router.post("/skip", response_model=None, responses=_AUTH_ERRORS,
             summary="Stop the caller's running jobs; its waiting jobs go on")
async def skip(client: ClientDep, engine: EngineDep, state: StateDep) -> None:
    running, _ = _running(engine, client)
    for job in running:
        state.skipped.add(job)
        _stop(engine, job)


# ---- routes: options -------------------------------------------------------------------------
@router.get("/options", response_model=None, responses={200: {"model": A1111Options}, **_AUTH_ERRORS},
            summary="A1111's options: the server's model for A1111 requests, and kept keys")
async def get_options(client: ClientDep, state: StateDep) -> dict[str, Any]:
    return state.options()


@router.post("/options", response_model=None, responses=_INPUT_ERRORS,
             summary="Set options; unknown keys are kept, not applied; an error changes nothing")
async def set_options(
    client: ClientDep,
    state: StateDep,
    registry: RegistryDep,
    values: Annotated[dict[str, Any], Body(openapi_examples={"switch model": {
        "value": {"sd_model_checkpoint": "sdxl-base"}}})],
) -> None:
    state.update(values, registry)


# ---- routes: discovery -----------------------------------------------------------------------
@router.get("/sd-models", response_model=list[A1111SdModel], responses=_AUTH_ERRORS,
            summary="The served models (their `title` is what sd_model_checkpoint takes)")
async def sd_models(client: ClientDep, registry: RegistryDep) -> list[A1111SdModel]:
    return [A1111SdModel(title=name, model_name=name, filename=spec.source)
            for name, spec in registry.models.items()]


_ALIASES = {s.name: list(s.aliases) for s in SAMPLERS}


@router.get("/samplers", response_model=list[A1111Sampler], responses=_AUTH_ERRORS,
            summary="Sampler names txt2img accepts")
async def samplers(client: ClientDep) -> list[A1111Sampler]:
    return [A1111Sampler(name=name, aliases=_ALIASES.get(name, []),
                    options={"scheduler": resolve_sampler(name).schedule})
            for name in a1111_sampler_names()]


@router.get("/schedulers", response_model=list[A1111Scheduler], responses=_AUTH_ERRORS,
            summary="Schedule names txt2img's `scheduler` accepts")
async def schedulers(client: ClientDep) -> list[A1111Scheduler]:
    automatic = A1111Scheduler(name="automatic", label="Automatic")
    return [automatic] + [A1111Scheduler(name=s.name, label=s.suffix,
                                    default_rho=7.0 if s.name == "karras" else -1)
                          for s in SCHEDULES]


@router.get("/loras", response_model=list[A1111Lora], responses=_AUTH_ERRORS,
            summary="The LoRAs `<lora:NAME:WEIGHT>` tags may name")
async def loras(client: ClientDep, registry: RegistryDep) -> list[A1111Lora]:
    table = registry.loras
    models = registry.models.values()
    return [A1111Lora(name=name, alias=name, path=str(table[name].path),
                      metadata={"models": [m.name for m in models if table[name].misfit(m) is None]})
            for name in registry.lora_names()]


@router.get("/sd-vae", response_model=list[A1111SdVae], responses=_AUTH_ERRORS,
            summary="Always empty: each model runs with its own VAE (models.yaml)")
async def sd_vae(client: ClientDep) -> list[A1111SdVae]:
    return []


@router.get("/upscalers", response_model=list[A1111Upscaler], responses=_AUTH_ERRORS,
            summary="Always empty: no hires fix or upscaling")
async def upscalers(client: ClientDep) -> list[A1111Upscaler]:
    return []


@router.get("/latent-upscale-modes", response_model=list[A1111LatentUpscaleMode], responses=_AUTH_ERRORS,
            summary="Always empty: no hires fix")
async def latent_upscale_modes(client: ClientDep) -> list[A1111LatentUpscaleMode]:
    return []


@router.get("/scripts", response_model=A1111ScriptsList, responses=_AUTH_ERRORS,
            summary="Always empty: no scripts run")
async def scripts(client: ClientDep) -> A1111ScriptsList:
    return A1111ScriptsList()


@router.get("/embeddings", response_model=A1111Embeddings, responses=_AUTH_ERRORS,
            summary="Textual inversion embeddings (models.yaml embedding_dirs): `loaded` those of "
            "sd_model_checkpoint's family, `skipped` the others")
async def embeddings(client: ClientDep, registry: RegistryDep, state: StateDep) -> A1111Embeddings:
    family = registry.models[state.checkpoint].family
    answer = A1111Embeddings()
    for spec in registry.embeddings:
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                 "shape": spec.width, "vectors": spec.vectors}
        (answer.loaded if spec.family == family else answer.skipped)[spec.name] = entry
    return answer


_REFRESH_FAILED = _error("`RefreshFailed`: the models file is no longer valid; nothing changed")


@router.post("/refresh-checkpoints", response_model=None,
             responses={**_AUTH_ERRORS, 500: _REFRESH_FAILED},
             summary="Read models.yaml and its folders again (as POST /admin/reload does)")
async def refresh_checkpoints(client: ClientDep, engine: EngineDep) -> None:
    await _reload(engine)


@router.post("/refresh-loras", response_model=None,
             responses={**_AUTH_ERRORS, 500: _REFRESH_FAILED},
             summary="Read models.yaml and its folders again (as POST /admin/reload does)")
async def refresh_loras(client: ClientDep, engine: EngineDep) -> None:
    await _reload(engine)


async def _reload(engine: Engine) -> None:
    report = await asyncio.to_thread(engine.reload)
    if report.error:
        raise RefreshFailed(report.summary())
