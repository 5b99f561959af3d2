"""The rest of A1111's surface: the routes clients call while connecting and filling their menus.

Under /sdapi/v1 (`router`, behind a key like every A1111 route):
- real data: `prompt-styles` (models.yaml `styles_file:`), `cmd-flags` (A1111's flags that
  craftserve has a counterpart for, from its settings), `memory` (app.api.a1111.memory),
  `png-info` (app.api.a1111.infotext);
- `realesrgan-models`: the model upscalers whose file name says Real-ESRGAN;
- empty lists where craftserve has none: `hypernetworks`, `face-restorers`, `sd-modules`
  (Forge's VAE / text encoder list: each model runs with its own), `extensions`, `script-info`;
- `refresh-vae` and `refresh-embeddings` reload models.yaml and its folders, as the other
  refreshes (admin key);
- `unload-checkpoint` / `reload-checkpoint` release and load again the device memory of the
  caller's checkpoint (its `sd_model_checkpoint`) on every device, through the engine
  (EngineAPI.unload_model / load_model; 501 `NotSupported` under Ray Serve, whose replicas
  manage their own models); they change the server for every user, so they take an admin key;
- `interrogate`: 422 naming the model: no captioning model is served.

Outside it (`gradio_router`), what A1111's gradio server answers a client that checks it is
reachable and logged in: `GET /internal/ping` (`{}`, no key, like /health), `GET /queue/status`
(gradio 3.41's queue estimation) and `GET /login_check` (null), the last two with a key.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from PIL import Image

from app import __version__
from app.api.a1111.errors import ADMIN_ERRORS, AUTH_ERRORS, INPUT_ERRORS, REFRESH_FAILED
from app.api.a1111.extra_models import (
    A1111Extension,
    A1111FaceRestorer,
    A1111Hypernetwork,
    A1111InterrogateRequest,
    A1111Memory,
    A1111PngInfoRequest,
    A1111PngInfoResponse,
    A1111PromptStyle,
    A1111Realesrgan,
    A1111ScriptInfo,
    A1111SdModule,
    GradioEstimation,
)
from app.api.a1111.infotext import parse_generation_parameters, read_info_from_image
from app.api.a1111.memory import cuda, ram
from app.api.a1111.models import A1111Error
from app.api.a1111.routes import StateDep
from app.api.admin import ReloadsDep, reload_models
from app.api.credentials import AdminDep, CallerDep
from app.api.deps import EngineDep, RegistryDep, SettingsDep
from app.config import Settings
from app.errors import InvalidParameter, shown
from app.image_inputs import FORMATS, decode_base64, fetch_image_url, is_url
from app.registry import Registry
from app.upscaler_files import UpscalerSpec

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
gradio_router = APIRouter(tags=["a1111"])

# How long unload-checkpoint / reload-checkpoint wait for the workers before answering.
DEVICE_WAIT_S = 300.0
_ENGINE_ERRORS = {
    501: {"model": A1111Error,
          "description": "`NotSupported`: under Ray Serve each replica manages its own models"},
    503: {"model": A1111Error,
          "description": "the model cannot be loaded now (the answer says why)"},
}


# ---- discovery ---------------------------------------------------------------------------------
@router.get("/prompt-styles", response_model=list[A1111PromptStyle], responses=AUTH_ERRORS,
            summary="The prompt styles txt2img's `styles` applies (models.yaml styles_file)")
async def prompt_styles(client: CallerDep, registry: RegistryDep) -> list[A1111PromptStyle]:
    return [A1111PromptStyle(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
            for s in registry.styles.values()]


def _empty(path: str, item: type, what: str) -> None:
    async def route(client: CallerDep) -> list:
        return []

    route.__name__ = path.replace("-", "_")
    router.add_api_route(f"/{path}", route, methods=["GET"], response_model=list[item],
                         responses=AUTH_ERRORS, summary=f"Always empty: {what}")


_empty("hypernetworks", A1111Hypernetwork, "no hypernetworks are served")
_empty("face-restorers", A1111FaceRestorer, "no face restoration")
_empty("sd-modules", A1111SdModule, "each model runs with its own VAE and text encoders")
_empty("extensions", A1111Extension, "no A1111 extensions run here")
_empty("script-info", A1111ScriptInfo, "no scripts run")


_REAL_ESRGAN = re.compile(r"real[-_ ]?esr", re.IGNORECASE)  # RealESRGAN_x4plus, realesr-general-x4v3


def realesrgan_models(upscalers: Mapping[str, UpscalerSpec]) -> list[A1111Realesrgan]:
    """The model upscalers (models.yaml upscaler_dirs) whose file name says Real-ESRGAN, as
    A1111 lists its Real-ESRGAN models: name, path, scale (from the name; 4 when it says none)."""
    return [A1111Realesrgan(name=name, path=str(spec.path), scale=spec.scale or 4)
            for name, spec in sorted(upscalers.items()) if _REAL_ESRGAN.search(name)]


@router.get("/realesrgan-models", response_model=list[A1111Realesrgan], responses=AUTH_ERRORS,
            summary="The model upscalers of upscaler_dirs whose file name says Real-ESRGAN")
async def get_realesrgan_models(client: CallerDep, registry: RegistryDep) -> list[A1111Realesrgan]:
    return realesrgan_models(registry.upscalers)

def _first_folder(paths: list[Path]) -> str | None:
    return str(paths[0].parent) if paths else None


def cmd_flags(settings: Settings, registry: Registry) -> dict[str, Any]:
    """A1111's command-line flags that have a counterpart here, with what applies (never a
    key; paths are those the other A1111 routes show)."""
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    devices = settings.devices.strip().lower()
    single_files = [spec.source for spec in registry.models.values() if spec.kind == "single_file"]
    return {
        "api": True, "nowebui": True, "api_only": True, "listen": not loopback,
        "server_name": settings.host, "port": settings.port,
        "api_auth": None, "gradio_auth": None,  # keys are never shown
        "api_log": False, "api_server_stop": False,
        "ckpt_dir": _first_folder([Path(p) for p in single_files]),
        "lora_dir": _first_folder([lora.path for lora in registry.loras.values()]),
        "embeddings_dir": _first_folder([e.path for e in registry.embeddings]),
        "hypernetwork_dir": None,
        "styles_file": [str(registry.styles_file)] if registry.styles_file else [],
        "data_dir": str(registry.path.resolve().parent),
        "use_cpu": ["all"] if devices == "cpu" else [],
        "skip_torch_cuda_test": devices == "cpu",
        "device_id": None, "lowvram": False, "medvram": False, "medvram_sdxl": False,
        "no_half": False, "no_half_vae": False, "precision": "autocast",
        "xformers": False, "opt_sdp_attention": True, "no_hashing": False,
        "disable_safe_unpickle": False, "allow_code": False, "enable_insecure_extension_access": False,
        "timeout_keep_alive": int(settings.keep_alive_s), "skip_version_check": True,
        "craftserve": __version__,
    }


@router.get("/cmd-flags", response_model=dict[str, Any], responses=AUTH_ERRORS,
            summary="A1111's command-line flags that apply here")
async def get_cmd_flags(client: CallerDep, settings: SettingsDep, registry: RegistryDep) -> dict[str, Any]:
    return cmd_flags(settings, registry)


@router.get("/memory", response_model=A1111Memory, responses=AUTH_ERRORS,
            summary="RAM of this process and, on CUDA, each device's memory (A1111's shape)")
async def get_memory(client: CallerDep) -> A1111Memory:
    numbers = await asyncio.to_thread(lambda: {"ram": ram(), "cuda": cuda()})
    return A1111Memory(**numbers)


# ---- png-info, interrogate ---------------------------------------------------------------------
async def open_image(field: str, value: str, settings: Settings) -> Image.Image:
    """An image as clients send one to the image routes (base64, a data: URL, an http(s) URL
    where the settings allow fetching; app.image_inputs' rules and byte cap), opened without
    decoding its pixels: its metadata is all png-info reads. 422 naming the field otherwise."""
    if is_url(value):
        data = await fetch_image_url(field, value, settings)
    else:
        data = await asyncio.to_thread(decode_base64, field, value, settings)
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception:  # noqa: BLE001 - whatever the parser refuses: not an image it reads
        raise InvalidParameter(field, shown(value), "is not an image this server reads; send a PNG, "
                               "JPEG or WebP, base64-encoded") from None


@router.post("/png-info", response_model=A1111PngInfoResponse, responses=INPUT_ERRORS,
             summary="The generation parameters an image carries (A1111 infotext), parsed")
async def png_info(body: A1111PngInfoRequest, client: CallerDep, registry: RegistryDep,
                   settings: SettingsDep) -> A1111PngInfoResponse:
    image = await open_image("image", body.image, settings)
    text, items = read_info_from_image(image)
    text = text or ""
    parameters = parse_generation_parameters(text, registry.styles)
    return A1111PngInfoResponse(info=text, items=items, parameters=parameters)


@router.post("/interrogate", response_model=None, responses=INPUT_ERRORS,
             summary="Always 422: no captioning (CLIP, DeepDanbooru) model is served")
async def interrogate(body: A1111InterrogateRequest, client: CallerDep) -> None:
    raise InvalidParameter("model", body.model or "clip",
                           "no captioning model (clip, deepdanbooru) is served by this server, so "
                           "POST /sdapi/v1/interrogate cannot describe images here")


# ---- refreshes, device memory ------------------------------------------------------------------
@router.post("/refresh-vae", response_model=None, responses={**ADMIN_ERRORS, 500: REFRESH_FAILED},
             summary="Read models.yaml and its folders again (as POST /admin/reload does; admin key)")
async def refresh_vae(client: AdminDep, reloads: ReloadsDep) -> None:
    await reload_models(reloads)


@router.post("/refresh-embeddings", response_model=None,
             responses={**ADMIN_ERRORS, 500: REFRESH_FAILED},
             summary="Read models.yaml and its folders again (as POST /admin/reload does; admin key)")
async def refresh_embeddings(client: AdminDep, reloads: ReloadsDep) -> None:
    await reload_models(reloads)


@router.post("/unload-checkpoint", response_model=dict[str, Any],
             responses={**ADMIN_ERRORS, **_ENGINE_ERRORS, 422: INPUT_ERRORS[422]},
             summary="Release the caller's checkpoint from device memory on every device (admin key)")
async def unload_checkpoint(client: AdminDep, state: StateDep, engine: EngineDep) -> dict[str, Any]:
    await asyncio.to_thread(engine.unload_model, state.checkpoint(client), DEVICE_WAIT_S)
    return {}


@router.post("/reload-checkpoint", response_model=dict[str, Any],
             responses={**ADMIN_ERRORS, **_ENGINE_ERRORS, 422: INPUT_ERRORS[422]},
             summary="Load the caller's checkpoint into device memory on every device (admin key)")
async def reload_checkpoint(client: AdminDep, state: StateDep, engine: EngineDep) -> dict[str, Any]:
    await asyncio.to_thread(engine.load_model, state.checkpoint(client), DEVICE_WAIT_S)
    return {}


# ---- gradio's routes clients use to check the server ---------------------------------------------
@gradio_router.get("/internal/ping", summary="A1111's liveness check (no key)")
async def internal_ping() -> dict[str, Any]:
    return {}


@gradio_router.get("/queue/status", response_model=GradioEstimation, responses=AUTH_ERRORS,
                   summary="gradio's queue estimation: jobs waiting (every key's)")
async def queue_status(client: CallerDep, engine: EngineDep) -> GradioEstimation:
    _, body = engine.readiness()
    return GradioEstimation(queue_size=int(body.get("queue_depth", 0)))


@gradio_router.get("/login_check", response_model=None, responses=AUTH_ERRORS,
                   summary="null with a valid key (gradio's login check)")
async def login_check(client: CallerDep) -> None:
    return None
