"""The multipart/form-data bodies of /v1/images/edits and /variations, read into checked
pictures and a validated model of their text fields.

- Pictures: `image` (one), repeated `image[]` parts (the openai SDK's `image=[a, b]`) or
  `image[0]`, `image[1]`, ... in the order they come; `mask` (edits). A part may be a file (what
  clients send) or text: base64, a data: URL, or an http(s) URL where the settings allow it
  (app.image_inputs, the one door for pictures, which also checks byte and pixel caps, off the
  event loop). Masks are read by OpenAI's convention: alpha 0 = edit.
- Text fields: validated by the route's pydantic model (multipart sends text: "2" is 2); errors
  are FastAPI's validation errors, so they answer as every /v1 validation error does (400,
  `param` naming the field). `loras` comes as JSON text (`{"name": 0.8}`) or as `loras[name]`
  parts (how the openai SDK's `extra_body` flattens a dict); `controlnet` likewise, as JSON
  text (a list of units), as `controlnet[N][field]` parts, or as `controlnet[][field]` parts:
  the openai SDK's flattening of a list of objects, which sends each field's values together,
  so the i-th value of a field is unit i's (units that differ in their fields are sent as JSON
  text or with indices).
- What is refused, naming the field: a body that is not multipart, no picture, a file where
  text is expected, a damaged multipart body, more than MAX_EDIT_IMAGES pictures.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.api.openai_images.models import MAX_EDIT_IMAGES
from app.config import Settings
from app.errors import InvalidParameter
from app.image_inputs import base64_chars, read_image, read_mask

_IMAGE_KEY = re.compile(r"image(\[[0-9]{0,4}\])?")
_LORA_KEY = re.compile(r"loras\[(.{1,200})\]", re.DOTALL)
_UNIT_KEY = re.compile(r"controlnet\[([0-9]{0,2})\]\[([A-Za-z_]{1,40})\]")
MAX_FIELDS = 200  # text parts; OpenAI's edits have about 20


@dataclass(frozen=True)
class EditForm:
    fields: Any  # the route's pydantic model
    images: tuple[Image.Image, ...]  # RGB
    mask: Image.Image | None  # "L", 255 = edit, at its own size


def _multipart_rule(request: Request) -> str:
    sent = request.headers.get("content-type", "").partition(";")[0].strip() or "no Content-Type"
    return (f"this route takes multipart/form-data (it came as {sent}): the picture as a file part "
            "`image` (several: repeated `image[]` parts) and the other fields as text parts")


async def _part_bytes(upload: UploadFile, settings: Settings) -> bytes:
    """An uploaded file's bytes, at most one past the byte cap (read_image then refuses it
    naming the cap without the rest being read)."""
    return await upload.read(settings.max_image_bytes + 1)


async def _picture(field: str, value: UploadFile | str, settings: Settings, *, mask: bool) -> Image.Image:
    data: bytes | str = await _part_bytes(value, settings) if isinstance(value, UploadFile) else value
    if mask:
        return await read_mask(field, data, settings, convention="openai")
    return await read_image(field, data, settings)


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _loras(text_fields: dict[str, Any], lora_parts: dict[str, str]) -> None:
    """`loras` as a dict from its JSON text or its `loras[name]` parts, for the model."""
    text = text_fields.get("loras")
    if isinstance(text, str):
        try:
            text_fields["loras"] = json.loads(text)
        except ValueError:
            raise InvalidParameter("loras", text[:40], 'send a JSON object of LoRA names and weights, '
                                   'e.g. {"my-style": 0.8}, or one `loras[name]` part per LoRA') from None
    elif lora_parts:
        text_fields["loras"] = lora_parts


def _units(text_fields: dict[str, Any], unit_parts: list[tuple[str, str, Any]]) -> None:
    """`controlnet` as a list of units from its JSON text or its `controlnet[..][field]` parts."""
    text = text_fields.get("controlnet")
    if isinstance(text, str):
        try:
            text_fields["controlnet"] = json.loads(text)
        except ValueError:
            raise InvalidParameter("controlnet", text[:40], 'send a JSON list of ControlNet units, e.g. '
                                   '[{"model": "control_canny", "module": "canny", "image": "<base64>"}], '
                                   "or `controlnet[][field]` parts") from None
        return
    if not unit_parts:
        return
    by_field: dict[str, list[Any]] = {}  # `controlnet[][field]`: the i-th value is unit i's
    indexed: dict[int, dict[str, Any]] = {}
    for index, name, value in unit_parts:
        if isinstance(value, UploadFile):
            where = f"controlnet[{index}][{name}]"
            raise InvalidParameter(where, f"<file {value.filename or ''}>"[:60],
                                   "send it as a text part (a picture as base64 or a data: URL)")
        if index:
            indexed.setdefault(int(index), {})[name] = value
        else:
            by_field.setdefault(name, []).append(value)
    count = max((len(values) for values in by_field.values()), default=0)
    units = [{name: values[i] for name, values in by_field.items() if i < len(values)} for i in range(count)]
    text_fields["controlnet"] = units + [indexed[i] for i in sorted(indexed)]


async def read_form(request: Request, model: type[BaseModel], settings: Settings, *,
                    takes_mask: bool, several: bool,
                    check: Callable[[Any], None] | None = None) -> EditForm:
    """The pictures and validated text fields of a multipart request (the module's docstring).
    Text fields are validated, and `check`ed (the route's own cheap checks: model, size, n),
    before any picture is decoded."""
    try:
        # a text part may hold a picture as base64: as long as the byte cap allows (the body's
        # own cap, CRAFTSERVE_MAX_IMAGE_BODY_BYTES, bounds the whole at the edge)
        form = await request.form(max_files=MAX_EDIT_IMAGES + 2, max_fields=MAX_FIELDS,
                                  max_part_size=base64_chars(settings.max_image_bytes))
    except HTTPException as exc:  # Starlette's answer for a damaged multipart body
        raise InvalidParameter("body", "<multipart body>", f"it cannot be read as multipart/form-data: "
                               f"{exc.detail}") from None
    try:
        pictures: list[tuple[str, UploadFile | str]] = []
        masks: list[UploadFile | str] = []
        text_fields: dict[str, Any] = {}
        lora_parts: dict[str, str] = {}
        unit_parts: list[tuple[str, str, Any]] = []
        for key, value in form.multi_items():
            if _IMAGE_KEY.fullmatch(key):
                pictures.append((key, value))
            elif key == "mask" and takes_mask:
                masks.append(value)
            elif (part := _UNIT_KEY.fullmatch(key)) is not None:
                unit_parts.append((part[1], part[2], value))
            elif isinstance(value, UploadFile):
                if key in model.model_fields:
                    raise InvalidParameter(key, f"<file {value.filename or ''}>"[:60],
                                           "send it as a text part, not a file")
                continue  # a file this route does not read (e.g. gpt-image's `markup`)
            elif (lora := _LORA_KEY.fullmatch(key)) is not None:
                lora_parts[lora[1]] = value
            else:
                text_fields.setdefault(key, value)  # a repeated text part: the first
        if not pictures and not form and "multipart/" not in request.headers.get("content-type", ""):
            raise InvalidParameter("image", "<none>", _multipart_rule(request))
        _loras(text_fields, lora_parts)
        _units(text_fields, unit_parts)
        fields = _validated(model, text_fields)
        if check is not None:
            check(fields)
        if not pictures:
            raise InvalidParameter("image", "<none>", "send the picture as a file part `image` (several: "
                                   "repeated `image[]` parts)")
        if not several and len(pictures) > 1:
            raise InvalidParameter("image", f"<{len(pictures)} images>", "this route takes one picture")
        if len(pictures) > MAX_EDIT_IMAGES:
            raise InvalidParameter("image", f"<{len(pictures)} images>",
                                   f"at most {MAX_EDIT_IMAGES} pictures a request")
        names = ["image"] if len(pictures) == 1 else [f"image[{i}]" for i in range(len(pictures))]
        reads = [_picture(name, value, settings, mask=False)
                 for name, (_, value) in zip(names, pictures, strict=True)]
        if masks:
            reads.append(_picture("mask", masks[0], settings, mask=True))
        decoded = await asyncio.gather(*reads)
    finally:
        await form.close()
    images = tuple(decoded[:len(pictures)])
    return EditForm(fields=fields, images=images, mask=decoded[len(pictures)] if masks else None)
