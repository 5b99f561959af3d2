"""The VisionCraft API routes of every documented version (see shared/api/visioncraft.md)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import AuthDep, EngineDep, RegistryDep, SettingsDep
from app.api.generation import generate_png
from app.engine.samplers import a1111_sampler_names, comfy_sampler_ids, comfy_scheduler_names
from app.errors import NotServed
from app.schemas import GenerateRequest, GenerateRequestV2

router = APIRouter(tags=["visioncraft"])

_PNG = {200: {"content": {"image/png": {}}, "description": "the image, PNG bytes"}}
# September 2024 categories; those of families craftserve does not serve list nothing.
_CATEGORIES = {"SD-1.5": "sd15", "SDXL-1.0": "sdxl", "SD-3.0": None, "Pony": None, "FLUX.1": None}


@router.post("/sd", response_class=Response, responses=_PNG, summary="Generate an image")
@router.post("/generate-xl", response_class=Response, responses=_PNG,
             summary="Generate an image (spring 2024 SDXL route: sampler + scheduler)")
async def sd(
    body: GenerateRequest,
    request: Request,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    auth: AuthDep,
) -> Response:
    return await generate_png(
        body, request, engine=engine, registry=registry, settings=settings, auth=auth
    )


@router.post("/image/generate", response_class=Response, responses=_PNG,
             summary="Generate an image (September 2024 route; steps up to 35)")
async def image_generate(
    body: GenerateRequestV2,
    request: Request,
    engine: EngineDep,
    registry: RegistryDep,
    settings: SettingsDep,
    auth: AuthDep,
) -> Response:
    return await sd(body, request, engine, registry, settings, auth)


# ---- discovery (GET, no token) -----------------------------------------------------
@router.get("/sd/models-sdxl")
@router.get("/models-xl", include_in_schema=False)
def models_sdxl(registry: RegistryDep) -> list[str]:
    return registry.model_names("sdxl")


@router.get("/sd/models-sd")
@router.get("/models", include_in_schema=False)
def models_sd(registry: RegistryDep) -> list[str]:
    return registry.model_names("sd15")


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


@router.get("/sd/samplers")
@router.get("/image/samplers", include_in_schema=False)
@router.get("/samplers", include_in_schema=False)
def samplers() -> list[str]:
    return a1111_sampler_names()


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


@router.get("/image/models/{category}")
def image_models(category: str, registry: RegistryDep) -> list[str]:
    family = _category_family(category)
    return registry.model_names(family) if family else []  # type: ignore[arg-type]


@router.get("/image/loras/{category}")
def image_loras(category: str, registry: RegistryDep) -> list[str]:
    family = _category_family(category)
    return registry.lora_names(family) if family else []  # type: ignore[arg-type]
