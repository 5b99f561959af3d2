"""OpenAI's images API (`/v1/images/generations`, `/v1/models`): a translator onto the shared
generation core.

What the openai SDK, Open WebUI (OpenAI mode) and LibreChat send is mapped onto an
`ImageRequest`; the answer is OpenAI's `{"created", "data": [...], ...}` and every error under
`/v1/` is OpenAI's `{"error": {"message", "type", "param", "code"}}` (`render_error`).

Choices (documented in README.md and docs/clients.md):
- `model` absent or null: the first model of models.yaml. A name that is not served is looked
  up in the setting CRAFTSERVE_OPENAI_MODEL_ALIASES (e.g. dall-e-3=sdxl-base); else 404
  `model_not_found` naming the served models.
- `size` absent or `auto`: the model family's native size (1024x1024 SDXL, 512x512 SD 1.x).
  Sides and steps have the limits of the A1111 dialect (settings CRAFTSERVE_A1111_MAX_SIZE,
  CRAFTSERVE_A1111_MAX_STEPS): OpenAI clients ask for sizes such as 1792x1024.
- `response_format` absent: `url`, except for a requested model named `gpt-image-*`, which at
  OpenAI only ever answers base64 (clients written for it read `b64_json` without asking).
- URLs point into the in-memory image store (`/v1/images/files/<key>.<png|jpeg|webp>`): the
  random key is the credential, as for `/generate`; the Bearer header clients such as Open
  WebUI send along is accepted and not needed.
"""

from __future__ import annotations

import base64
import difflib
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AuthDep, EngineDep, ImagesDep, RegistryDep, SettingsDep
from app.api.errors import ErrorInfo
from app.api.generation import ImageRequest, generate_images
from app.config import Settings
from app.errors import ErrorKind, Forbidden, InvalidParameter, ModelNotFound, Unauthorized
from app.imaging import MEDIA_TYPES
from app.registry import Registry
from app.schemas import MAX_CLIP_SKIP, MAX_SEED, Int, Loras, Number

router = APIRouter(prefix="/v1", tags=["openai"])

DEFAULT_STEPS = 30
DEFAULT_CFG = 7.0
NATIVE_SIZE = {"sdxl": 1024, "sd15": 512}  # the family's training resolution, for size "auto"
MIN_SIDE = 64
MAX_NAME_LENGTH = 200  # LoRA names: longer ones are refused before any lookup echoes them
_SIZE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})")


# ---- request and answer shapes ---------------------------------------------------------------
class OpenAIImageRequest(BaseModel):
    """Body of POST /v1/images/generations: OpenAI's fields plus craftserve extensions. Unknown
    fields and nulls are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, examples=["a lighthouse at dusk, oil painting"])
    model: str | None = Field(
        None, description="a served model (GET /v1/models) or a name mapped by the setting "
        "CRAFTSERVE_OPENAI_MODEL_ALIASES (e.g. dall-e-3); absent: the first model of models.yaml",
        examples=["sdxl-base"],
    )
    n: Int | None = Field(None, description="images, 1 to CRAFTSERVE_OPENAI_MAX_IMAGES (4); "
                          "seeds seed, seed+1, ...; absent: 1")
    size: str | None = Field(None, description="WIDTHxHEIGHT, each side 64 to "
                             "CRAFTSERVE_A1111_MAX_SIZE (2048), or `auto` (absent): the model's "
                             "native size, 1024x1024 SDXL, 512x512 SD 1.x", examples=["1024x1024"])
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="absent: url (b64_json when the requested model is named gpt-image-*)")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="absent: png")
    output_compression: Int | None = Field(
        None, ge=0, le=100, description="jpeg and webp quality 0-100; absent: 100")
    stream: bool | None = Field(None, description="false or absent; streaming is not offered")
    quality: Any = Field(None, description="accepted and ignored")
    style: Any = Field(None, description="accepted and ignored")
    user: Any = Field(None, description="accepted and ignored")
    background: Any = Field(None, description="accepted and ignored")
    moderation: Any = Field(None, description="accepted and ignored")
    partial_images: Any = Field(None, description="accepted and ignored")
    # craftserve extensions (VisionCraft's names)
    negative_prompt: str | None = Field(None, description="extension")
    steps: Int | None = Field(None, description=f"extension: 1 to CRAFTSERVE_A1111_MAX_STEPS (150); "
                              f"absent: {DEFAULT_STEPS}")
    cfg_scale: Number | None = Field(None, ge=1, le=30, allow_inf_nan=False,
                                     description=f"extension; absent: {DEFAULT_CFG:g}")
    sampler: str | None = Field(None, max_length=64,
                                description="extension: a sampler name; absent: the model's default")
    scheduler: str | None = Field(None, max_length=64, description="extension: a ComfyUI schedule name")
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="extension: absent or -1: random")
    loras: Loras | None = Field(None, description="extension: {lora name: weight}")
    clip_skip: Int | None = Field(None, ge=1, le=MAX_CLIP_SKIP,
                                  description="extension: A1111's CLIP_stop_at_last_layers, 1 to 12 "
                                  "(SD 1.x models; SDXL ignores it as A1111 does)")


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="the image, base64 without a data: prefix "
                                 "(response_format b64_json)")
    url: str | None = Field(None, description="where to fetch the image (response_format url); "
                            "kept in memory up to CRAFTSERVE_IMAGE_STORE_MB")
    revised_prompt: None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage] = Field(description="one item per image, with `b64_json` or `url`")
    output_format: Literal["png", "jpeg", "webp"]
    size: str = Field(examples=["1024x1024"])


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(examples=["size"])
    code: str | None = Field(examples=["invalid_value"])


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def _error(description: str) -> dict:
    return {"model": OpenAIErrorBody, "description": description}


_AUTH_ERRORS = {401: _error("missing or wrong API key (`code`: invalid_api_key)")}
_GENERATION_ERRORS = {
    400: _error("a field out of range or of the wrong type, malformed JSON, an unknown sampler or "
                "LoRA; `param` names the field"),
    **_AUTH_ERRORS,
    404: _error("`code` model_not_found: the model is neither served nor an alias; the message "
                "names the served ones"),
    429: _error("the key is past its rate limit (keys file or CRAFTSERVE_RATE_LIMIT), with "
                "`Retry-After`; `code` rate_limit_exceeded"),
    500: _error("a bug (the server log has it); `x-should-retry: false`"),
    503: _error("the queue is full, a job outlived its queue deadline or the server is shutting "
                "down (with `Retry-After`); the model cannot be served now or there is not enough "
                "memory (`x-should-retry: false`)"),
}


# ---- errors ----------------------------------------------------------------------------------
_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {
    ErrorKind.MODEL_NOT_FOUND: "model_not_found",
    ErrorKind.UNAUTHORIZED: "invalid_api_key",
    ErrorKind.FORBIDDEN: "invalid_api_key",
    ErrorKind.RATE_LIMITED: "rate_limit_exceeded",
    ErrorKind.INVALID_PARAMETER: "invalid_value",
    ErrorKind.NOT_SERVED: "invalid_value",
    ErrorKind.INVALID_LORA: "invalid_value",
}
# 5xx a retry of the same request cannot fix: a bug, a model that failed to load (retried by the
# server after CRAFTSERVE_LOAD_RETRY_S), memory exhausted after the server's own retries.
_NO_RETRY_KINDS = {ErrorKind.INTERNAL, ErrorKind.MODEL_UNAVAILABLE, ErrorKind.OUT_OF_MEMORY}
_PARAMS = {"lora": "loras", "body": None}


def _code(info: ErrorInfo) -> str | None:
    if info.errors:
        first = info.errors[0].get("type")
        if first == "missing":
            return "missing_required_parameter"
        if first == "json_invalid":
            return "invalid_json"
    return _CODES.get(info.kind, info.kind)


def render_error(request: Request, info: ErrorInfo) -> Response:
    """Every error under /v1/ in OpenAI's shape. Validation errors answer 400 as OpenAI does
    (the SDK raises BadRequestError); answers a retry cannot fix carry `x-should-retry: false`
    (the SDK otherwise retries every 5xx twice)."""
    status = 400 if info.status == 422 else info.status
    kind = "server_error" if status >= 500 else _TYPES.get(status, "invalid_request_error")
    param = _PARAMS.get(info.field, info.field) if info.field else None
    body = {"error": {"message": info.message, "type": kind, "param": param, "code": _code(info)}}
    headers = dict(info.headers)
    retryable = status in (408, 409, 429) or (status >= 500 and info.kind not in _NO_RETRY_KINDS)
    if not retryable:
        headers["x-should-retry"] = "false"
    return JSONResponse(body, status_code=status, headers=headers)


def _shown(value: str, limit: int = 60) -> str:
    """A value for a message, cut short (a client may send a base64 blob anywhere)."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


# ---- authentication --------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="a craftserve API key")


def _client(
    request: Request,
    auth: AuthDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's key label, from `Authorization: Bearer <key>`; 401 otherwise. A dependency,
    so the key is checked before the body is validated, as OpenAI does."""
    token = credentials.credentials if credentials else None
    try:
        return auth.authenticate(token, request.client.host if request.client else None)
    except Forbidden:
        message = ("Invalid API key" if token else
                   "Missing API key: send `Authorization: Bearer <key>` with a craftserve API key")
        raise Unauthorized(message, headers={"WWW-Authenticate": "Bearer"}) from None


ClientDep = Annotated[str, Depends(_client)]


# ---- translation -----------------------------------------------------------------------------
def _model(requested: str | None, registry: Registry, settings: Settings) -> str:
    """The served model a request names (see the module docstring)."""
    if not requested:
        return next(iter(registry.models))
    if requested in registry.models:
        return requested
    aliases = settings.openai_model_aliases
    served = ", ".join(registry.models)
    target = aliases.get(requested)
    if target is not None:
        if target in registry.models:
            return target
        raise ModelNotFound(
            f"The model '{requested}' is mapped to '{target}' by the setting "
            f"CRAFTSERVE_OPENAI_MODEL_ALIASES, and this server does not serve '{target}'. "
            f"Served models: {served}"
        )
    names = list(registry.models) + list(aliases)
    close = difflib.get_close_matches(requested, names, n=3, cutoff=0.5) if len(requested) < 200 else []
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    other = (f"; other names (setting CRAFTSERVE_OPENAI_MODEL_ALIASES): "
             f"{', '.join(f'{a} = {t}' for a, t in aliases.items())}" if aliases else "")
    raise ModelNotFound(
        f"The model '{_shown(requested)}' does not exist on this server.{hint} "
        f"Served models: {served}{other}"
    )


def _size(value: str | None, family: str, settings: Settings) -> tuple[int, int]:
    if value is None or value.strip().lower() == "auto":
        side = NATIVE_SIZE.get(family, 1024)
        return side, side
    limit = settings.a1111_max_size
    rule = (f"use WIDTHxHEIGHT with each side {MIN_SIDE} to {limit} pixels (setting "
            "CRAFTSERVE_A1111_MAX_SIZE), e.g. 1024x1024, or auto for the model's native size")
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise InvalidParameter("size", _shown(value), rule)
    width, height = int(match[1]), int(match[2])
    if not (MIN_SIDE <= width <= limit and MIN_SIDE <= height <= limit):
        raise InvalidParameter("size", value, rule)
    return width, height


def _image_request(body: OpenAIImageRequest, model: str, size: tuple[int, int],
                   settings: Settings) -> tuple[ImageRequest, int]:
    count = 1 if body.n is None else body.n
    if not 1 <= count <= settings.openai_max_images:
        raise InvalidParameter("n", count, f"between 1 and {settings.openai_max_images} images a "
                               "request (setting CRAFTSERVE_OPENAI_MAX_IMAGES)")
    steps = DEFAULT_STEPS if body.steps is None else body.steps
    if not 1 <= steps <= settings.a1111_max_steps:
        raise InvalidParameter("steps", steps, f"between 1 and {settings.a1111_max_steps} "
                               "(setting CRAFTSERVE_A1111_MAX_STEPS)")
    if body.stream:
        raise InvalidParameter("stream", True, "streaming is not offered; send false or leave it out")
    loras = body.loras or {}
    for name in loras:
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidParameter("loras", _shown(name), f"a LoRA name has at most {MAX_NAME_LENGTH} "
                                   "characters (GET /sd/loras-sdxl, /sd/loras-sd list them)")
    width, height = size
    request = ImageRequest(
        model=model, prompt=body.prompt, negative_prompt=body.negative_prompt or "",
        sampler=body.sampler, scheduler=body.scheduler, steps=steps, width=width, height=height,
        cfg_scale=DEFAULT_CFG if body.cfg_scale is None else float(body.cfg_scale), loras=loras,
        seed=body.seed, clip_skip=body.clip_skip,
    )
    return request, count


# ---- routes ----------------------------------------------------------------------------------
@router.post("/images/generations", response_model=OpenAIImagesResponse, responses=_GENERATION_ERRORS,
             summary="Create images (OpenAI images API)")
async def create_images(
    body: OpenAIImageRequest,
    request: Request,
    client: ClientDep,
    auth: AuthDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    images: ImagesDep,
) -> JSONResponse:
    auth.admit(client)  # the key's rate limit (429 past it): generation requests only
    model = _model(body.model, registry, settings)
    width, height = _size(body.size, registry.models[model].family, settings)
    image_request, count = _image_request(body, model, (width, height), settings)
    if body.response_format is not None:
        response_format = body.response_format
    else:
        response_format = "b64_json" if (body.model or "").startswith("gpt-image") else "url"
    output_format = body.output_format or "png"
    quality = 100 if body.output_compression is None else body.output_compression
    generated = await generate_images(image_request, count, request, client=client, engine=engine,
                                      registry=registry, settings=settings,
                                      output_format=output_format, quality=quality)
    encoded = [image.data for image in generated]
    data: list[dict] = []
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(blob).decode("ascii"), "revised_prompt": None}
                for blob in encoded]
    else:
        keys = images.put_many(encoded, MEDIA_TYPES[output_format])  # all of them kept
        data = [{"url": str(request.url_for("openai_image_file", key=key, ext=output_format)),
                 "revised_prompt": None} for key in keys]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": output_format,
                         "size": f"{width}x{height}"})


@router.get("/images/files/{key}.{ext}", name="openai_image_file", response_class=Response,
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()},
                             "description": "the image"},
                       404: _error("no such image (it may have expired from the store)")},
            summary="An image answered by URL (the key is the credential; a Bearer header is "
                    "accepted and not needed)")
def image_file(key: str, ext: str, images: ImagesDep) -> Response:
    media_type = MEDIA_TYPES.get(ext)
    data = images.get(key, media_type) if media_type else None
    if data is None:
        raise HTTPException(404, "no such image (it may have expired from the store)")
    return Response(data, media_type=media_type)


def _models_file_time(registry: Registry) -> int:
    try:
        return int(registry.path.stat().st_mtime)
    except OSError:
        return 0


def _model_objects(registry: Registry, settings: Settings) -> list[OpenAIModel]:
    """The served models, then the alias names that map to one of them."""
    created = _models_file_time(registry)
    names = list(registry.models)
    names += [a for a, t in settings.openai_model_aliases.items()
              if t in registry.models and a not in registry.models]
    return [OpenAIModel(id=name, created=created, owned_by="craftserve") for name in names]


@router.get("/models", response_model=OpenAIModelList, responses=_AUTH_ERRORS,
            summary="The models /v1/images/generations accepts: served ones, then aliases")
def list_models(client: ClientDep, registry: RegistryDep, settings: SettingsDep) -> OpenAIModelList:
    return OpenAIModelList(data=_model_objects(registry, settings))


@router.get("/models/{model}", response_model=OpenAIModel,
            responses={**_AUTH_ERRORS, 404: _error("`code` model_not_found")},
            summary="One model (the SDK's models.retrieve)")
def retrieve_model(model: str, client: ClientDep, registry: RegistryDep,
                   settings: SettingsDep) -> OpenAIModel:
    for item in _model_objects(registry, settings):
        if item.id == model:
            return item
    _model(model, registry, settings)  # not listed: raises model_not_found, naming the served ones
    raise AssertionError("unreachable")
