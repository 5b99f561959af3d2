"""An images request as the shared core's `ImageRequest`: the model it means, its size, its
count, checked against the shared rules (app.api.rules)."""

from __future__ import annotations

import difflib
import re

from app.api.generation import ImageRequest
from app.api.openai_images.models import DEFAULT_STEPS, OpenAIImageRequest
from app.api.rules import DEFAULT_CFG, MIN_SIDE, check_range, check_side, check_steps, shown
from app.config import Settings
from app.errors import InvalidParameter, ModelNotFound
from app.registry import Registry

NATIVE_SIZE = {"sdxl": 1024, "sd15": 512}  # the family's training resolution, for size "auto"
_SIZE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})")


def model_named(requested: str | None, registry: Registry, settings: Settings) -> str:
    """The served model a request names: absent, the first model of models.yaml; a served name;
    an alias of CRAFTSERVE_OPENAI_MODEL_ALIASES; else 404 model_not_found naming the served."""
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
    request = ImageRequest(
        model=model, prompt=body.prompt, negative_prompt=body.negative_prompt or "",
        sampler=body.sampler, scheduler=body.scheduler, steps=steps, width=width, height=height,
        cfg_scale=DEFAULT_CFG if body.cfg_scale is None else float(body.cfg_scale),
        loras=body.loras or {}, seed=body.seed, clip_skip=body.clip_skip,
    )
    return request, count
