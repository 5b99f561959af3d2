"""Request and response models of the VisionCraft API.

Every range and default of the contract (../shared/api/visioncraft.md) lives here.
Fields that clients of other API versions send (`image_count`, `upscale`, ...) are
accepted and ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_SEED = 2**32 - 1
MAX_LORA_WEIGHT = 10.0
MAX_CLIP_SKIP = 12


def _no_bool(value: Any) -> Any:
    # JSON true/false would otherwise pass as 1/0 for numeric fields.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _finite_weights(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping LoRA names to weights, e.g. {\"my-lora\": 0.8}")
    for name, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"weight of LoRA {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weight of LoRA {name!r} must be a finite number, got {weight!r}")
        if abs(weight) > MAX_LORA_WEIGHT:
            raise ValueError(
                f"weight of LoRA {name!r} is {weight!r}; it must lie within "
                f"-{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}"
            )
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool)]
Loras = Annotated[dict[str, float], BeforeValidator(_finite_weights)]


class GenerateRequest(BaseModel):
    """Body of POST /sd: the seed page's fields plus craftserve extensions."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    token: str | None = Field(None, description="API key (or send `Authorization: Bearer <key>`)")
    model: str = Field(..., description="one of the served model names", examples=["sdxl-base"])
    prompt: str = Field(..., examples=["Beautiful landscape"])
    negative_prompt: str = ""
    sampler: str | None = Field(None, description="sampler name; default: the model's default")
    scheduler: str | None = Field(
        None, description="ComfyUI-style schedule (normal, karras, exponential, ...)"
    )
    steps: Int = Field(30, ge=1, le=30)
    width: Int = Field(1024, ge=64, le=1024)
    height: Int = Field(1024, ge=64, le=1024)
    cfg_scale: Number = Field(7.0, ge=1, le=30, allow_inf_nan=False)
    loras: Loras = Field(default_factory=dict, description="{lora name: weight}")
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="absent or -1: random")
    clip_skip: Int | None = Field(
        None, ge=1, le=MAX_CLIP_SKIP, description="extension: A1111's CLIP_stop_at_last_layers "
        "(1: the last layer); SD 1.x models only, SDXL ignores it as A1111 does")


class JobRequest(GenerateRequest):
    """Body of POST /jobs: any /sd body, plus `previews`."""

    previews: bool = Field(False, description="send `preview` events (small PNGs of the latents "
                                              "every few steps) on the job's event stream")


class GenerateRequestV2(GenerateRequest):
    """Body of POST /image/generate (September 2024 docs): steps up to 35, default 35."""

    steps: Int = Field(35, ge=1, le=35)


class GenerateRequestV0(GenerateRequest):
    """Body of POST /generate and /generate-xl (spring 2024 docs): up to 5 images, answered
    as URLs."""

    image_count: Int = Field(1, ge=1, le=5)


class ImageUrls(BaseModel):
    images: list[str]


class ErrorMessage(BaseModel):
    message: str = Field(..., description="the same text as `detail`")


class ErrorBody(BaseModel):
    """Every VisionCraft-route error: `detail` as the service answered, and `error.message`
    with the same text, which the published VisionCraft wrapper reads first."""

    detail: str = Field(..., examples=["This server doesn't have steps 31: steps should be less "
                                       "than or equal to 30"])
    error: ErrorMessage
    errors: list[dict[str, Any]] | None = Field(
        None, description="validation errors only (422): [{loc, msg, type}] of each field at fault"
    )
