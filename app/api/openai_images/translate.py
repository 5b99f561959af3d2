"""An images request as the shared core's `ImageRequest`: the model it means, its size, its
count, checked against the shared rules (app.api.rules)."""

from __future__ import annotations

import difflib
import math
import re

from PIL import Image

from app.api.generation import ImageInput, ImageRequest, RefinerRequest
from app.api.openai_images.models import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_REFINER_SWITCH,
    DEFAULT_STEPS,
    EDIT_MASK_BLUR,
    OpenAIEditRequest,
    OpenAIImageRequest,
)
from app.api.rules import DEFAULT_CFG, MIN_SIDE, check_range, check_side, check_steps, shown
from app.config import Settings
from app.engine.hub import default_model
from app.errors import InvalidParameter, ModelNotFound
from app.registry import Registry

NATIVE_SIZE = {"sdxl": 1024, "sd15": 512}  # the family's training resolution, for size "auto"
_SIZE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})")


# OpenAI's own image model names: clients send them when nothing else is set (Open WebUI sends
# dall-e-2, LibreChat dall-e-3 and gpt-image-1). Unless CRAFTSERVE_OPENAI_MODEL_ALIASES maps
# one elsewhere, they mean the default model.
OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")


def model_named(requested: str | None, registry: Registry, settings: Settings) -> str:
    """The served model a request names: absent, the default model (app.engine.hub.
    default_model); a served name; an alias of CRAFTSERVE_OPENAI_MODEL_ALIASES; one of OpenAI's
    own names (the default model); else 404 model_not_found naming the served."""
    if not requested:
        return default_model(registry.models)
    if requested in registry.models:
        return requested
    aliases = settings.openai_model_aliases
    served = ", ".join(registry.models)
    target = aliases.get(requested)
    if target is None and requested in OPENAI_MODEL_NAMES:
        return default_model(registry.models)
    if target is not None:
        if target in registry.models:
            return target
        raise ModelNotFound(
            f"The model '{requested}' is mapped to '{target}' by the setting "
            f"CRAFTSERVE_OPENAI_MODEL_ALIASES, and this server does not serve '{target}'. "
            f"Served models: {served}"
        )
    names = list(registry.models) + list(aliases)
    close = difflib.get_close_matches(requested, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    other = (f"; other names (setting CRAFTSERVE_OPENAI_MODEL_ALIASES): "
             f"{', '.join(f'{a} = {t}' for a, t in aliases.items())}" if aliases else "")
    raise ModelNotFound(
        f"The model '{shown(requested)}' does not exist on this server.{hint} "
        f"Served models: {served}{other}"
    )


def size_of(value: str | None, family: str, settings: Settings) -> tuple[int, int]:
    """`WIDTHxHEIGHT`, each side within the shared limits, or `auto`/absent: the family's
    native size."""
    if value is None or value.strip().lower() == "auto":
        side = NATIVE_SIZE.get(family, 1024)
        return side, side
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise InvalidParameter("size", shown(value), f"use WIDTHxHEIGHT with each side {MIN_SIDE} to "
                               f"{settings.a1111_max_size} pixels (setting CRAFTSERVE_A1111_MAX_SIZE), "
                               "e.g. 1024x1024, or auto for the model's native size")
    width, height = int(match[1]), int(match[2])
    check_side("size", width, settings)
    check_side("size", height, settings)
    return width, height


def image_request(body: OpenAIImageRequest, model: str, size: tuple[int, int],
                  settings: Settings) -> tuple[ImageRequest, int]:
    """The core's request, and how many images of it."""
    count = 1 if body.n is None else body.n
    check_range("n", count, 1, settings.openai_max_images, setting="OPENAI_MAX_IMAGES")
    steps = DEFAULT_STEPS if body.steps is None else body.steps
    check_steps("steps", steps, settings)
    if body.stream:
        raise InvalidParameter("stream", True, "streaming is not offered; send false or leave it out")
    width, height = size
    switch = DEFAULT_REFINER_SWITCH if body.refiner_switch_at is None else float(body.refiner_switch_at)
    request = ImageRequest(
        model=model, prompt=body.prompt, negative_prompt=body.negative_prompt or "",
        sampler=body.sampler, scheduler=body.scheduler, steps=steps, width=width, height=height,
        cfg_scale=DEFAULT_CFG if body.cfg_scale is None else float(body.cfg_scale),
        loras=body.loras or {}, seed=body.seed, clip_skip=body.clip_skip,
        refiner=None if not body.refiner else RefinerRequest(body.refiner, switch),
    )
    return request, count


def edit_size(value: str | None, picture: tuple[int, int], family: str,
              settings: Settings) -> tuple[int, int]:
    """The answer's size for an edit or variation: `WIDTHxHEIGHT` as for generations, or `auto`
    (absent): the first picture's size, scaled down (aspect kept, never up) to at most the
    model's trained area (1024² SDXL, 512² SD 1.x) and to the side limit, each side then
    rounded down to a multiple of 8 and kept within MIN_SIDE..CRAFTSERVE_A1111_MAX_SIZE. A
    picture already within those limits and a multiple of 8 keeps its exact size (so the
    pixels a mask keeps come back unchanged)."""
    if value is not None and value.strip().lower() != "auto":
        return size_of(value, family, settings)
    width, height = picture
    native = NATIVE_SIZE.get(family, 1024)
    limit = settings.a1111_max_size
    scale = min(1.0, math.sqrt(native * native / (width * height)), limit / width, limit / height)
    sides = (max(MIN_SIDE, min(limit, int(side * scale) // 8 * 8)) for side in (width, height))
    return next(sides), next(sides)


def edit_input(body: OpenAIEditRequest, pictures: tuple[Image.Image, ...], mask: Image.Image | None, *,
               default_strength: float) -> ImageInput:
    """The core's image input of an edit or a variation. A mask of another size than the first
    picture is refused (400 `param: mask`, as OpenAI). With a mask: inpainting where it is
    transparent at strength 1.0 (the area generated anew from the prompt), A1111's "original"
    fill (the picture under the noise; at strength 1.0 the noise covers it), over the whole
    picture (not "only masked": the answer is the size asked), the seam blurred by EDIT_MASK_BLUR
    pixels and every pixel outside the blurred mask the picture's own. Without one: image to
    image of each picture at `default_strength`. `strength` and `resize_mode` (extensions)
    override; a `size` of another aspect than the picture's is filled by "crop and resize"."""
    if mask is not None and mask.size != pictures[0].size:
        raise InvalidParameter("mask", f"{mask.width}x{mask.height}",
                               f"the mask must be the size of the (first) image, "
                               f"{pictures[0].width}x{pictures[0].height}")
    if body.strength is not None:
        strength = float(body.strength)
    else:
        strength = DEFAULT_INPAINT_STRENGTH if mask is not None else default_strength
    return ImageInput(images=pictures, mask=mask, strength=strength,
                      resize_mode=1 if body.resize_mode is None else body.resize_mode,
                      mask_blur=EDIT_MASK_BLUR, fill=1, full_res=False, padding=0, invert=False)
