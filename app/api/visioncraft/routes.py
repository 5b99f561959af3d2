"""The VisionCraft API routes of every documented version (docs/api-contracts.md): a thin
translator onto the shared generation core (app.api.generation)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from app.api.bodies import ImageRoute
from app.api.credentials import GeneratingCallerDep, QueueShareDep
from app.api.deps import EngineDep, ImagesDep, RegistryDep, SettingsDep
from app.api.generation import (
    Generated,
    ImageInput,
    ImageRequest,
    extras_size,
    generate_images,
    served_upscalers,
    upscale_image,
)
from app.api.rules import MIN_SIDE
from app.api.urls import public_url_for
from app.api.visioncraft.models import (
    MAX_SIDE,
    ErrorBody,
    GenerateRequest,
    GenerateRequestV0,
    GenerateRequestV2,
    ImageUrls,
    Img2ImgRequest,
    UpscaleRequest,
)
from app.engine.hub import default_model, weights_here
from app.engine.readiness import state_word
from app.engine.upscalers import LATENT_MODES
from app.errors import NotServed
from app.samplers import a1111_sampler_names, comfy_sampler_ids, comfy_scheduler_names

router = APIRouter(tags=["visioncraft"], route_class=ImageRoute)


def _errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries of the error answers a route gives, all in the ErrorBody shape."""
    return {status: {"model": ErrorBody, "description": _ERROR_WHEN[status]} for status in statuses}


_ERROR_WHEN = {
    403: "API key missing or wrong",
    404: "no such image (expired from the store), or no such route",
    422: "a field out of range or of the wrong type, or a name (model, sampler, LoRA, category) "
         "this server does not have; the message says `doesn't have <field>`",
    429: "the key is past its rate limit (the message says `users can make N requests per P "
         "seconds`), or has its whole share of the queue waiting (`CRAFTSERVE_MAX_QUEUE_PER_KEY`); "
         "`Retry-After`",
    503: "the queue is full, the model cannot be served now, out of memory, or shutting down "
         "(`Retry-After`)",
}
_GENERATION_ERRORS = _errors(403, 422, 429, 503)
_PNG = {200: {"content": {"image/png": {}}, "description": "the image, PNG bytes"},
        **_GENERATION_ERRORS}
_URLS = {200: {"description": "the images' URLs (GET them, no key needed)"}, **_GENERATION_ERRORS}
# September 2024 categories; those of families craftserve does not serve list nothing.
_CATEGORIES = {"SD-1.5": "sd15", "SDXL-1.0": "sdxl", "SD-3.0": None, "Pony": None, "FLUX.1": None}


def to_image_request(body: GenerateRequest) -> ImageRequest:
    """A VisionCraft body (also the job API's) as the core's request."""
    return ImageRequest(
        model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt,
        sampler=body.sampler, scheduler=body.scheduler, steps=body.steps, width=body.width,
        height=body.height, cfg_scale=float(body.cfg_scale), loras=body.loras, seed=body.seed,
        clip_skip=body.clip_skip,
    )


async def _generate(body: GenerateRequest, count: int, request: Request, client: str, share: int,
                    engine: EngineDep, registry: RegistryDep, settings: SettingsDep) -> list[Generated]:
    return await generate_images(to_image_request(body), count, request, client=client, share=share,
                                 engine=engine, registry=registry, settings=settings)


@router.post("/sd", response_class=Response, responses=_PNG, summary="Generate an image")
async def sd(
    body: GenerateRequest,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    (image,) = await _generate(body, 1, request, client, share, engine, registry, settings)
    return Response(image.data, media_type="image/png", headers=image.headers())


@router.post("/image/generate", response_class=Response, responses=_PNG,
             summary="Generate an image (September 2024 route; steps up to 35)")
async def image_generate(
    body: GenerateRequestV2,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    return await sd(body, request, client, share, engine, registry, settings)


@router.post("/generate", response_model=ImageUrls, responses=_URLS,
             summary="Generate up to 5 images, answered as URLs (spring 2024 route)")
@router.post("/generate-xl", response_model=ImageUrls, responses=_URLS,
             summary="Generate up to 5 images, answered as URLs (spring 2024 SDXL route: sampler + "
                     "scheduler)")
async def generate(
    body: GenerateRequestV0,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    images: ImagesDep,
) -> ImageUrls:
    generated = await _generate(body, body.image_count, request, client, share, engine, registry,
                                settings)
    keys = images.put_many([image.data for image in generated], owner=client)
    return ImageUrls(images=[public_url_for(request, "stored_image", key=key) for key in keys])


def img2img_size(width: int, height: int) -> tuple[int, int]:
    """The picture's size, scaled down to fit MAX_SIDE a side and up to MIN_SIDE, in multiples of 8."""
    scale = min(1.0, MAX_SIDE / max(width, height))
    scale = max(scale, MIN_SIDE / min(width, height))
    return (min(MAX_SIDE, max(MIN_SIDE, round(width * scale / 8) * 8)),
            min(MAX_SIDE, max(MIN_SIDE, round(height * scale / 8) * 8)))


@router.post("/img2img", response_class=Response, responses=_PNG,
             summary="Image to image (and inpainting with `mask`): the picture at its own size")
async def img2img(
    body: Img2ImgRequest,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    from app.image_inputs import read_image, read_mask

    model = body.refiner or default_model(registry.models)
    if model not in registry.models:
        raise NotServed("refiner", model, registry.models)
    picture = await read_image("image", body.image, settings)
    mask = await read_mask("mask", body.mask, settings, convention="a1111") if body.mask else None
    width, height = img2img_size(*picture.size)
    request_ = ImageRequest(
        model=model, prompt=body.prompt, negative_prompt=body.negative_prompt, sampler=body.scheduler,
        steps=body.steps, width=width, height=height, cfg_scale=float(body.cfg_scale), seed=body.seed,
        image=ImageInput(images=(picture,), mask=mask, strength=float(body.strength), fill=1,
                         full_res=False),
    )
    (image,) = await generate_images(request_, 1, request, client=client, share=share, engine=engine,
                                     registry=registry, settings=settings)
    return Response(image.data, media_type="image/png", headers=image.headers())


def _pixel_upscalers(registry: RegistryDep) -> list[str]:
    return [name for name in served_upscalers(registry) if name not in LATENT_MODES and name != "None"]


@router.post("/upscale", response_class=Response, responses=_PNG,
             summary="Upscale a picture 2 or 4 times by an upscaler of GET /models-upscale")
async def upscale(
    body: UpscaleRequest,
    request: Request,
    client: GeneratingCallerDep,
    share: QueueShareDep,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    from app.image_inputs import read_image

    if body.model not in _pixel_upscalers(registry):
        raise NotServed("model", body.model, _pixel_upscalers(registry))
    picture = await read_image("image", body.image, settings)
    size, out_size = extras_size(picture.size, scale=body.resize)
    done = await upscale_image(picture, request, upscaler=body.model, size=size, out_size=out_size,
                               client=client, share=share, engine=engine, registry=registry,
                               settings=settings, field="model")
    return Response(done.data, media_type="image/png",
                    headers={"X-Job-Id": done.job_id, "X-Worker": done.result.worker,
                             "X-Generation-Ms": f"{done.result.generation_s * 1000:.1f}"})


@router.get("/images/{key}.png", name="stored_image", response_class=Response,
            responses={200: _PNG[200], **_errors(404)},
            summary="An image generated by POST /generate or /generate-xl")
def stored_image(key: str, images: ImagesDep) -> Response:
    png = images.get(key)
    if png is None:
        raise HTTPException(404, "no such image (it may have expired from the store)")
    return Response(png, media_type="image/png")


# ---- discovery (GET, no token) -----------------------------------------------------
@router.get("/sd/models-sdxl")
@router.get("/models-xl", include_in_schema=False)
def models_sdxl(registry: RegistryDep) -> list[str]:
    return registry.model_names("sdxl")


@router.get("/sd/models-sd")
@router.get("/models", include_in_schema=False)
def models_sd(registry: RegistryDep) -> list[str]:
    return registry.model_names("sd15")


@router.get("/sd/models-status", summary="Every model with its state: which serve now, which "
            "wait for weights, the default (extension; no token)")
def models_status(registry: RegistryDep, engine: EngineDep) -> list[dict]:
    """One object a model, in the models file's order: `name`, `family`, `description` (the
    models file's), `default` (the model of requests that name none), `weights_here` (built
    in, local, or in the Hugging Face cache), `state`: loaded, loading, loads on first
    request, waiting for weights (not here and the Hub cannot be reached: 503 until they
    are), or unavailable (its load failed)."""
    states = engine.readiness()[1].get("models", {})
    default = default_model(registry.models)
    return [{"name": name, "family": spec.family, "description": spec.description,
             "default": name == default, "weights_here": weights_here(spec),
             "state": state_word(str(states.get(name, "loads on first request")))}
            for name, spec in registry.models.items()]


@router.get("/sd/models-sd3")
def models_sd3() -> list[str]:
    return []


@router.get("/sd/loras-sdxl")
@router.get("/loras-xl", include_in_schema=False)
def loras_sdxl(registry: RegistryDep) -> list[str]:
    return registry.lora_names("sdxl")


@router.get("/sd/loras-sd")
@router.get("/loras", include_in_schema=False)
def loras_sd(registry: RegistryDep) -> list[str]:
    return registry.lora_names("sd15")


@router.get("/sd/embeddings", summary="Textual inversion embeddings (models.yaml embedding_dirs)")
def embeddings(registry: RegistryDep) -> list[dict]:
    """Each embedding a prompt of its family can use by name: {name, family, vectors}."""
    return [{"name": e.name, "family": e.family, "vectors": e.vectors}
            for e in sorted(registry.embeddings, key=lambda e: (e.family, e.name.lower()))]


@router.get("/sd/samplers")
@router.get("/image/samplers", include_in_schema=False)
@router.get("/samplers", include_in_schema=False)
def samplers() -> list[str]:
    return a1111_sampler_names()


@router.get("/img2img/schedulers", summary="The names /img2img's `scheduler` takes (samplers)")
def img2img_schedulers() -> list[str]:
    return a1111_sampler_names()


@router.get("/img2img/refiners", summary="The models /img2img's `refiner` takes")
def img2img_refiners(registry: RegistryDep) -> list[str]:
    """The models that run /img2img's pass; an SDXL refiner-only model (serving as A1111's
    refiner_checkpoint) runs none alone."""
    return [name for name, spec in registry.models.items() if not spec.refiner_only]


@router.get("/models-upscale", summary="The upscalers /upscale's `model` takes")
def models_upscale(registry: RegistryDep) -> list[str]:
    return _pixel_upscalers(registry)


@router.get("/samplers-xl", summary="ComfyUI-style sampler ids")
def samplers_xl() -> list[str]:
    return comfy_sampler_ids()


@router.get("/schedulers-xl", summary="ComfyUI-style schedule names")
def schedulers_xl() -> list[str]:
    return comfy_scheduler_names()


def _category_family(category: str) -> str | None:
    if category not in _CATEGORIES:
        raise NotServed("category", category, _CATEGORIES)
    return _CATEGORIES[category]


@router.get("/image/models/{category}", responses=_errors(422))
def image_models(category: str, registry: RegistryDep) -> list[str]:
    family = _category_family(category)
    return registry.model_names(family) if family else []  # type: ignore[arg-type]


@router.get("/image/loras/{category}", responses=_errors(422))
def image_loras(category: str, registry: RegistryDep) -> list[str]:
    family = _category_family(category)
    return registry.lora_names(family) if family else []  # type: ignore[arg-type]
