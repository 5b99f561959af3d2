"""sd-webui-controlnet's API on craftserve: the units of `alwayson_scripts.controlnet.args`
(txt2img, img2img) as the core's `UnitRequest`s (their `ControlNet N` infotext entries are
app.imaging's, written for every dialect), and the `/controlnet/*` routes (version, model_list,
module_list, control_types, settings, detect).

The script key is found in any case; its units are read by app.api.controlnet_units (shared
with the other dialects' `controlnet` extension), as the extension reads them. One choice
differs from the extension: a unit without any `enabled` key counts as enabled when it names a
model (serverless A1111 workers send such units and mean them); send `"enabled": false` to
switch a unit off.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body

from app.api.a1111.errors import AUTH_ERRORS, INPUT_ERRORS
from app.api.bodies import ImageRoute
from app.api.controlnet_units import number, read_unit_list
from app.api.credentials import CallerDep, GeneratingCallerDep
from app.api.deps import RegistryDep, SettingsDep
from app.api.generation import UnitRequest, check_working_size
from app.config import Settings
from app.engine.preprocessors import (
    CONTROL_TYPES,
    check_preprocessor,
    detect,
    served_preprocessors,
)
from app.errors import InvalidParameter
from app.image_inputs import off_loop, off_loop_preprocessing, read_image


def _script_args(scripts: Mapping[str, Any] | None) -> tuple[str, list[Any]] | None:
    for key, value in (scripts or {}).items():
        if key.lower() == "controlnet":
            args = value.get("args", []) if isinstance(value, Mapping) else value
            where = f"alwayson_scripts.{key}.args"
            if not isinstance(args, list):
                raise InvalidParameter(where, args, "a list of ControlNet units (JSON objects)")
            return where, args
    return None


async def read_units(scripts: Mapping[str, Any] | None, settings: Settings) -> tuple[UnitRequest, ...]:
    """The enabled units of a body's alwayson_scripts, images decoded and checked."""
    found = _script_args(scripts)
    if found is None:
        return ()
    base, args = found
    return await read_unit_list(base, args, settings, listed_means_enabled=False)


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- routes ------------------------------------------------------------------------------

router = APIRouter(prefix="/controlnet", tags=["a1111"], route_class=ImageRoute)


@router.get("/version", responses=AUTH_ERRORS, summary="ControlNet API version (sd-webui-controlnet)")
async def version(client: CallerDep) -> dict[str, int]:
    return {"version": 3}


@router.get("/model_list", responses=AUTH_ERRORS, summary="Served ControlNet models")
async def model_list(client: CallerDep, registry: RegistryDep) -> dict[str, list[str]]:
    served = getattr(registry, "controlnets", {}) or {}
    titles = await asyncio.to_thread(lambda: [spec.title for spec in served.values()])
    return {"model_list": titles}


@router.get("/module_list", responses=AUTH_ERRORS, summary="Served preprocessors")
async def module_list(client: CallerDep, registry: RegistryDep, alias_names: bool = False) -> dict[str, Any]:
    # model_free is the extension's "needs no ControlNet model" (reference_only, ...): none here
    served = served_preprocessors(getattr(registry, "annotators", None))
    return {
        "module_list": list(served),
        "module_detail": {name: {"model_free": False, "sliders": module.sliders()}
                          for name, module in served.items()},
    }


@router.get("/control_types", responses=AUTH_ERRORS, summary="Control types and their modules")
async def control_types(client: CallerDep, registry: RegistryDep) -> dict[str, Any]:
    served = getattr(registry, "controlnets", {}) or {}
    preprocessors = served_preprocessors(getattr(registry, "annotators", None))
    types: dict[str, Any] = {}
    for kind, (default, words) in CONTROL_TYPES.items():
        modules = [n for n, m in preprocessors.items() if kind == "All" or m.control_type == kind]
        if not modules:
            continue  # a type whose modules all wait for their weights
        models = [spec.title for spec in served.values()
                  if kind == "All" or any(word in spec.name.lower() for word in words)]
        types[kind] = {"module_list": modules, "model_list": ["None", *models],
                       "default_option": default if default in modules else modules[0],
                       "default_model": models[0] if models else "None"}
    return {"control_types": types}


@router.get("/settings", responses=AUTH_ERRORS, summary="ControlNet settings")
async def controlnet_settings(client: CallerDep, settings: SettingsDep) -> dict[str, int]:
    return {"control_net_unit_count": settings.controlnet_max_units}


@router.post("/detect", responses=INPUT_ERRORS, summary="Run a preprocessor (sd-webui-controlnet)")
async def detect_route(client: GeneratingCallerDep, settings: SettingsDep, registry: RegistryDep,
                       body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    name = body.get("controlnet_module", "none")
    annotators = getattr(registry, "annotators", None)
    module = check_preprocessor("controlnet_module", name if isinstance(name, str) else str(name), annotators)
    field = "controlnet_input_images"
    images = body.get(field)
    if not images:
        field = "controlnet_images"
        images = body.get(field)
    if not images or not isinstance(images, list):
        raise InvalidParameter("controlnet_input_images", images, "a list of base64 images (webuiapi "
                               "sends controlnet_images)")
    limit = settings.a1111_max_images
    if len(images) > limit:
        raise InvalidParameter(field, f"<{len(images)} images>", f"at most {limit} images a request "
                               "(setting CRAFTSERVE_A1111_MAX_IMAGES)")
    out = []
    for i, value in enumerate(images):
        if not isinstance(value, str):
            raise InvalidParameter(f"{field}[{i}]", value, "an image as base64 text")
        picture = await read_image(f"{field}[{i}]", value, settings)
        res = number("controlnet_processor_res", body.get("controlnet_processor_res"), 512)
        a = number("controlnet_threshold_a", body.get("controlnet_threshold_a"), -1)
        b = number("controlnet_threshold_b", body.get("controlnet_threshold_b"), -1)
        check_working_size("controlnet_processor_res", module, picture.size, res, settings)
        run = functools.partial(detect, files=annotators, field="controlnet_module")
        detected = await off_loop_preprocessing(run, module, picture, res, a, b)
        out.append(await off_loop(png_base64, detected))
    return {"info": "Success", "images": out}

