"""The /v1 routes: images/generations, edits and variations, the image files answered by URL, and
models."""

from __future__ import annotations

import base64
import time
from dataclasses import replace

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from app.api.bodies import ImageRoute
from app.api.controlnet_units import read_unit_list
from app.api.credentials import CallerDep, GeneratingCallerDep, QueueShareDep
from app.api.deps import EngineDep, ImagesDep, RegistryDep, SettingsDep
from app.api.generation import ImageRequest, generate_images
from app.api.openai_images.forms import read_form
from app.api.openai_images.models import (
    AUTH_ERRORS,
    DEFAULT_EDIT_STRENGTH,
    DEFAULT_VARIATION_STRENGTH,
    EDIT_ERRORS,
    GENERATION_ERRORS,
    OpenAIEditRequest,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
    OpenAIVariationRequest,
    error_doc,
    multipart_schema,
)
from app.api.openai_images.translate import edit_input, edit_size, image_request, model_named, size_of
from app.api.urls import public_url_for
from app.config import Settings
from app.engine.hub import default_model, weights_here
from app.engine.protocol import EngineAPI
from app.imaging import MEDIA_TYPES, ImageStore
from app.registry import Registry

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ImageRoute)


@router.post("/images/generations", response_model=OpenAIImagesResponse, responses=GENERATION_ERRORS,
             summary="Create images (OpenAI images API)")
async def create_images(
    body: OpenAIImageRequest,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    images: ImagesDep,
) -> JSONResponse:
    model = model_named(body.model, registry, settings)
    width, height = size_of(body.size, registry.models[model].family, settings)
    core_request, count = image_request(body, model, (width, height), settings)
    core_request = await _with_units(core_request, body, settings)
    return await _answer(body, core_request, count, request, client=client, share=share, engine=engine,
                         registry=registry, settings=settings, images=images)


async def _with_units(core_request: ImageRequest, body: OpenAIImageRequest,
                      settings: Settings) -> ImageRequest:
    """The request with the `controlnet` extension's units, their pictures decoded and checked
    (a unit without a picture uses the edit's own)."""
    if not body.controlnet:
        return core_request
    units = await read_unit_list("controlnet", body.controlnet, settings, listed_means_enabled=True)
    return replace(core_request, controlnet=units)


async def _answer(body: OpenAIImageRequest, core_request: ImageRequest, count: int, request: Request, *,
                  client: str, share: int, engine: EngineAPI, registry: Registry, settings: Settings,
                  images: ImageStore) -> JSONResponse:
    """Generate and answer as OpenAI does: `{"created", "data": [...], "output_format", "size"}`."""
    if body.response_format is not None:
        response_format = body.response_format
    else:
        response_format = "b64_json" if (body.model or "").startswith("gpt-image") else "url"
    output_format = body.output_format or "png"
    quality = 100 if body.output_compression is None else body.output_compression
    generated = await generate_images(core_request, count, request, client=client, share=share,
                                      engine=engine, registry=registry, settings=settings,
                                      output_format=output_format, quality=quality)
    encoded = [image.data for image in generated]
    data: list[dict] = []
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(blob).decode("ascii"), "revised_prompt": None}
                for blob in encoded]
    else:
        keys = images.put_many(encoded, MEDIA_TYPES[output_format], owner=client)  # all of them kept
        data = [{"url": public_url_for(request, "openai_image_file", key=key, ext=output_format),
                 "revised_prompt": None} for key in keys]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": output_format,
                         "size": f"{core_request.width}x{core_request.height}"})


async def _edit(request: Request, form_model: type[OpenAIEditRequest], *, takes_mask: bool, several: bool,
                default_strength: float, client: str, share: int, engine: EngineAPI, registry: Registry,
                settings: Settings, images: ImageStore) -> JSONResponse:
    """An edit or a variation: the multipart form read (forms.py), the pictures as the core's
    image input (translate.edit_input), then answered as a generation."""
    def check(fields: OpenAIEditRequest) -> None:  # before any picture is decoded
        model = model_named(fields.model, registry, settings)
        edit_size(fields.size, (1024, 1024), registry.models[model].family, settings)
        image_request(fields, model, (1024, 1024), settings)  # n, steps, stream

    form = await read_form(request, form_model, settings, takes_mask=takes_mask, several=several,
                           check=check)
    body = form.fields
    model = model_named(body.model, registry, settings)
    size = edit_size(body.size, form.images[0].size, registry.models[model].family, settings)
    core_request, count = image_request(body, model, size, settings)
    core_request = replace(core_request, image=edit_input(body, form.images, form.mask,
                                                          default_strength=default_strength))
    core_request = await _with_units(core_request, body, settings)
    return await _answer(body, core_request, count, request, client=client, share=share, engine=engine,
                         registry=registry, settings=settings, images=images)


@router.post("/images/edits", response_model=OpenAIImagesResponse, responses=EDIT_ERRORS,
             openapi_extra=multipart_schema(OpenAIEditRequest, several=True, mask=True),
             summary="Edit pictures (OpenAI images API; multipart/form-data)")
async def edit_images(
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    images: ImagesDep,
) -> JSONResponse:
    """With a `mask`: its fully transparent pixels are generated anew from the prompt (strength
    1.0 there), every other pixel is the picture's own. Without one: image to image of the whole
    picture at strength 0.75. `strength` (extension) overrides either; see docs/clients.md."""
    return await _edit(request, OpenAIEditRequest, takes_mask=True, several=True,
                       default_strength=DEFAULT_EDIT_STRENGTH, client=client, share=share, engine=engine,
                       registry=registry, settings=settings, images=images)


@router.post("/images/variations", response_model=OpenAIImagesResponse, responses=EDIT_ERRORS,
             openapi_extra=multipart_schema(OpenAIVariationRequest, several=False, mask=False),
             summary="A variation of a picture (OpenAI images API; multipart/form-data)")
async def create_variation(
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    images: ImagesDep,
) -> JSONResponse:
    """Image to image of the picture with an empty prompt at strength 0.6 (`strength` and
    `prompt` as extensions)."""
    return await _edit(request, OpenAIVariationRequest, takes_mask=False, several=False,
                       default_strength=DEFAULT_VARIATION_STRENGTH, client=client, share=share,
                       engine=engine, registry=registry, settings=settings, images=images)


@router.get("/images/files/{key}.{ext}", name="openai_image_file", response_class=Response,
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()},
                             "description": "the image"},
                       404: error_doc("no such image (it may have expired from the store)")},
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
    """The served models, then the alias names that map to one of them. Extensions:
    `waiting_for_weights` (the model's weights are not here: it answers 503 until they are,
    or downloads them on its first request where the Hub can be reached) and `default` (the
    model of requests that name none, or one of OpenAI's own names)."""
    created = _models_file_time(registry)
    aliases = settings.openai_model_aliases
    default = default_model(registry.models)
    targets = {name: name for name in registry.models}
    targets |= {a: t for a, t in aliases.items() if t in registry.models and a not in registry.models}
    return [_model_object(name, target, registry, created, default) for name, target in targets.items()]


def _model_object(name: str, target: str, registry: Registry, created: int, default: str) -> OpenAIModel:
    return OpenAIModel(id=name, created=created, owned_by="craftserve",
                       waiting_for_weights=not weights_here(registry.models[target]),
                       default=name == default)


@router.get("/models", response_model=OpenAIModelList, responses=AUTH_ERRORS,
            summary="The models /v1/images/generations accepts: served ones, then aliases")
def list_models(client: CallerDep, registry: RegistryDep, settings: SettingsDep) -> OpenAIModelList:
    return OpenAIModelList(data=_model_objects(registry, settings))


@router.get("/models/{model}", response_model=OpenAIModel,
            responses={**AUTH_ERRORS, 404: error_doc("`code` model_not_found")},
            summary="One model (the SDK's models.retrieve)")
def retrieve_model(model: str, client: CallerDep, registry: RegistryDep,
                   settings: SettingsDep) -> OpenAIModel:
    for item in _model_objects(registry, settings):
        if item.id == model:
            return item
    # one of OpenAI's own names answers as the default model; any other name not listed
    # raises model_not_found, naming the served ones
    target = model_named(model, registry, settings)
    return _model_object(model, target, registry, _models_file_time(registry), default_model(registry.models))

