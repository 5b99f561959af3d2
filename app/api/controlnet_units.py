"""ControlNet units as clients send them, in any dialect: sd-webui-controlnet's unit objects
read into the core's `UnitRequest`s, their pictures decoded and checked (app.image_inputs).

A1111 sends them in `alwayson_scripts.controlnet.args` (app.api.a1111.controlnet); the OpenAI
dialect and the job API take the same objects as an extension, `controlnet: [units]`. Units
are read as the extension reads them (shared/api/controlnet.md): every field of its unit with
its defaults; enum fields as ints or strings; the legacy aliases (`input_image`, `image` as
`{"image", "mask"}` or `[image, mask]`, `lowvram`, `guidance`, `guessmode`, `mask_image`);
unknown keys ignored; `""` for no image. A unit is used when `enabled` is true; without an
`enabled` key, A1111's units count as enabled when they name a model (serverless A1111
workers send such units and mean them), and the other dialects' units always do (listing a
unit is asking for it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.api.generation import UnitRequest
from app.config import Settings
from app.engine.control_units import CONTROL_MODES, HR_OPTIONS
from app.engine.preprocessors import RESIZE_MODES
from app.errors import InvalidParameter
from app.image_inputs import read_image


class UnitBody(BaseModel):
    """One ControlNet unit of the `controlnet` extension (OpenAI dialect, job API): the fields
    of sd-webui-controlnet's unit, checked when the request is read. Legacy aliases (`input_image`,
    `guidance`, `guessmode`, ...) are accepted as the extension accepts them."""

    model_config = ConfigDict(extra="allow")

    model: Any = Field(None, description="a served ControlNet (GET /controlnet/model_list): its "
                       "title, or its name without the hash, any case", examples=["control_canny"])
    module: Any = Field("none", description="a preprocessor (GET /controlnet/module_list)",
                        examples=["canny"])
    image: Any = Field(None, description="the control picture, base64 or a data: URL; absent with "
                       "a picture to start from (edits, `init_image`): that picture")
    enabled: Any = Field(None, description="false: the unit is left out; absent: used")
    weight: Any = Field(1.0, description="0 to 2")
    guidance_start: Any = Field(0.0, description="0 to 1: the fraction of the steps before the unit "
                                "starts")
    guidance_end: Any = Field(1.0, description="0 to 1: the fraction of the steps after which it stops")
    control_mode: Any = Field(0, description="0 Balanced, 1 My prompt is more important, 2 ControlNet "
                              "is more important (the number or the name)")
    resize_mode: Any = Field(1, description="0 Just Resize, 1 Crop and Resize, 2 Resize and Fill "
                             "(the number or the name)")
    processor_res: Any = Field(-1, description="the preprocessor's resolution; -1: its default")
    threshold_a: Any = Field(-1, description="the preprocessor's first slider; -1: its default")
    threshold_b: Any = Field(-1, description="the preprocessor's second slider; -1: its default")
    pixel_perfect: Any = Field(False, description="the preprocessor's resolution from the output size")
    hr_option: Any = Field("Both", description="with the hires fix (`enable_hr`), the passes the unit "
                           "guides: Both, Low res only (the first), High res only (the second); also "
                           "0 / 1 / 2")


def enum_value(where: str, value: Any, names: tuple[str, ...], default: int,
               extra: Mapping[int, int] | None = None) -> int:
    """An enum field sent as its index (an int, a digit string, a bool) or its name (any case)."""
    if value is None:
        return default
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        value = (extra or {}).get(value, value)
        if 0 <= value < len(names):
            return value
    elif isinstance(value, str):
        for index, name in enumerate(names):
            if value.strip().lower() == name.lower():
                return index
        if value.strip().isdigit():
            return enum_value(where, int(value.strip()), names, default, extra)
    choices = ", ".join(f"{i} {n!r}" for i, n in enumerate(names))
    raise InvalidParameter(where, value, f"one of {choices}")


def number(where: str, value: Any, default: float) -> float:
    """A finite number field: a JSON number or its text; absent: `default`."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidParameter(where, value, "a number")
    try:
        parsed = float(value)
    except ValueError:
        raise InvalidParameter(where, value, "a number") from None
    if not math.isfinite(parsed):
        raise InvalidParameter(where, value, "a finite number")
    return parsed


def _image_value(where: str, unit: Mapping[str, Any]) -> tuple[str | None, str]:
    """The unit's image (base64 or URL text) and the field it came from; None: none sent."""
    for key in ("image", "input_image"):
        value = unit.get(key)
        field = f"{where}.{key}"
        if isinstance(value, Mapping):
            value, field = value.get("image"), f"{field}.image"
        elif isinstance(value, list):
            value, field = (value[0] if value else None), f"{field}[0]"
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise InvalidParameter(field, value, "an image as base64 text (a data: URL too)")
        return value, field
    return None, f"{where}.image"


def _enabled(unit: Mapping[str, Any], listed_means_enabled: bool) -> bool:
    if "enabled" in unit and unit["enabled"] is not None:
        enabled = unit["enabled"]
        if isinstance(enabled, str):  # multipart forms send text
            return enabled.strip().lower() not in ("false", "0", "no", "off", "")
        return bool(enabled)
    if listed_means_enabled:
        return True
    model = unit.get("model")
    return isinstance(model, str) and model.strip().lower() not in ("", "none")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


async def _read_unit(where: str, unit: Mapping[str, Any], settings: Settings) -> UnitRequest:
    text, field = _image_value(where, unit)
    image = None if text is None else await read_image(field, text, settings)
    guidance_end = unit.get("guidance_end", unit.get("guidance"))
    mode = unit.get("control_mode")
    if mode is None and _flag(unit.get("guessmode", False)):
        mode = 2
    model = unit.get("model", "None")
    if not isinstance(model, str) or model.strip().lower() in ("", "none"):
        raise InvalidParameter(f"{where}.model", model, "an enabled unit names a ControlNet model "
                               "(GET /controlnet/model_list)")
    module = unit.get("module", "none")
    if module is None:
        module = "none"
    if not isinstance(module, str):
        raise InvalidParameter(f"{where}.module", module, "a preprocessor name "
                               "(GET /controlnet/module_list)")
    hr_option = HR_OPTIONS[enum_value(f"{where}.hr_option", unit.get("hr_option", "Both"), HR_OPTIONS, 0)]
    save_map = unit.get("save_detected_map", True)
    return UnitRequest(
        model=model, module=module,
        weight=number(f"{where}.weight", unit.get("weight"), 1.0),
        guidance_start=number(f"{where}.guidance_start", unit.get("guidance_start"), 0.0),
        guidance_end=number(f"{where}.guidance_end", guidance_end, 1.0),
        control_mode=enum_value(f"{where}.control_mode", mode, CONTROL_MODES, 0),
        resize_mode=enum_value(f"{where}.resize_mode", unit.get("resize_mode"), RESIZE_MODES, 1, {3: 0}),
        processor_res=number(f"{where}.processor_res", unit.get("processor_res"), -1),
        threshold_a=number(f"{where}.threshold_a", unit.get("threshold_a"), -1),
        threshold_b=number(f"{where}.threshold_b", unit.get("threshold_b"), -1),
        pixel_perfect=_flag(unit.get("pixel_perfect", False)),
        image=image, hr_option=hr_option,
        save_detected_map=save_map is not False and not (isinstance(save_map, str) and not _flag(save_map)),
        where=where,
    )


async def read_unit_list(base: str, units: Any, settings: Settings, *,
                         listed_means_enabled: bool) -> tuple[UnitRequest, ...]:
    """The enabled units of a list sent under the field `base` (e.g. `controlnet`), their images
    decoded and checked. More enabled units than CRAFTSERVE_CONTROLNET_MAX_UNITS are refused
    before any picture is decoded."""
    if units is None:
        return ()
    if not isinstance(units, Sequence) or isinstance(units, str | bytes):
        raise InvalidParameter(base, units, "a list of ControlNet units (JSON objects)")
    enabled: list[tuple[str, Mapping[str, Any]]] = []
    for index, unit in enumerate(units):
        where = f"{base}[{index}]"
        if isinstance(unit, BaseModel):
            unit = unit.model_dump(exclude_unset=True)
        if not isinstance(unit, Mapping):
            raise InvalidParameter(where, unit, "a ControlNet unit is a JSON object")
        if _enabled(unit, listed_means_enabled):
            enabled.append((where, unit))
    limit = settings.controlnet_max_units
    if len(enabled) > limit:
        raise InvalidParameter(enabled[limit][0], f"<{len(enabled)} units>", f"at most {limit} ControlNet "
                               "units a request (setting CRAFTSERVE_CONTROLNET_MAX_UNITS)")
    return tuple([await _read_unit(where, unit, settings) for where, unit in enabled])
