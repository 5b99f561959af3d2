"""Request and response models of the VisionCraft API (docs/api-contracts.md).

Every range and default of the VisionCraft contract lives here; the rules shared with the
other dialects (seeds, LoRA weights, clip skip, sides, cfg) come from app.api.rules. Fields
that clients of other API versions send (`image_count`, `upscale`, ...) are accepted and
ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.controlnet_units import UnitBody
from app.api.rules import (
    DEFAULT_CFG,
    MAX_CFG,
    MAX_CLIP_SKIP,
    MAX_NAME_LENGTH,
    MAX_SEED,
    MIN_CFG,
    MIN_SIDE,
    Int,
    Loras,
    Number,
)

# The contract's ranges (September 2024 routes allow 35 steps; the rest, 30).
MAX_STEPS = 30
MAX_STEPS_V2 = 35
MAX_SIDE = 1024
MAX_IMAGES = 5  # image_count of /generate and /generate-xl


class GenerateRequest(BaseModel):
    """Body of POST /sd: the seed page's fields plus craftserve extensions."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    token: str | None = Field(None, description="API key (or send `Authorization: Bearer <key>`)")
    model: str = Field(..., max_length=MAX_NAME_LENGTH, description="one of the served model names",
                       examples=["sdxl-base"])
    prompt: str = Field(..., examples=["Beautiful landscape"])
    negative_prompt: str = ""
    sampler: str | None = Field(None, max_length=MAX_NAME_LENGTH,
                                description="sampler name; default: the model's default")
    scheduler: str | None = Field(
        None, max_length=MAX_NAME_LENGTH,
        description="ComfyUI-style schedule (normal, karras, exponential, ...)"
    )
    steps: Int = Field(MAX_STEPS, ge=1, le=MAX_STEPS)
    width: Int = Field(MAX_SIDE, ge=MIN_SIDE, le=MAX_SIDE)
    height: Int = Field(MAX_SIDE, ge=MIN_SIDE, le=MAX_SIDE)
    cfg_scale: Number = Field(DEFAULT_CFG, ge=MIN_CFG, le=MAX_CFG, allow_inf_nan=False)
    loras: Loras = Field(default_factory=dict, description="{lora name: weight}")
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="absent or -1: random")
    clip_skip: Int | None = Field(
        None, ge=1, le=MAX_CLIP_SKIP, description="extension: A1111's CLIP_stop_at_last_layers "
        "(1: the last layer); SD 1.x models only, SDXL ignores it as A1111 does")


MAX_MASK_BLUR = 64
MAX_PADDING = 1024
MAX_HR_SCALE = 8.0


class JobRequest(GenerateRequest):
    """Body of POST /jobs: any /sd body, plus `previews`, the image inputs of image to image
    and inpainting, the hires fix and ControlNet units, named as A1111 names them."""

    previews: bool = Field(False, description="send `preview` events (small PNGs of the latents "
                                              "every few steps) on the job's event stream")
    init_image: str | None = Field(
        None, description="image to image: the picture to start from, base64 (a `data:` URL "
        "too), or an http(s) URL where the server allows them (CRAFTSERVE_ALLOW_IMAGE_URLS). Without "
        "`width`/`height` the job runs at the picture's size (fitted to 1024 a side, multiples of 8)")
    mask: str | None = Field(None, description="inpainting, with `init_image`: white repaints, black "
                             "is kept (a mask with transparency: its alpha); base64 as `init_image`")
    strength: Number | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="how much "
                                    "of the picture is redrawn; the job runs int(steps x strength) "
                                    "steps; default 0.75 with `init_image`")
    resize_mode: Int = Field(0, ge=0, le=3, description="the picture to width x height: 0 just "
                             "resize, 1 crop and resize, 2 resize and fill, 3 latent upscale")
    mask_blur: Int = Field(4, ge=0, le=MAX_MASK_BLUR, description="the mask's blur, in pixels")
    inpainting_fill: Int = Field(1, ge=0, le=3, description="what the masked area starts from: "
                                 "0 fill, 1 original (default, as A1111's UI), 2 latent noise, "
                                 "3 latent nothing")
    inpaint_full_res: bool = Field(False, description="\"only masked\": generate the mask's box "
                                   "(plus padding) at width x height and paste it back")
    inpaint_full_res_padding: Int = Field(32, ge=0, le=MAX_PADDING,
                                          description="pixels around the mask's box (only masked)")
    inpainting_mask_invert: bool = Field(False, description="repaint the black part instead")
    enable_hr: bool = Field(False, description="text to image with A1111's hires fix: a first "
                            "pass, an upscale, an image-to-image pass at `denoising_strength`")
    hr_scale: Number = Field(2.0, ge=1.0, le=MAX_HR_SCALE, allow_inf_nan=False)
    hr_upscaler: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="a latent mode "
                                    "or an upscaler (GET /sdapi/v1/upscalers); default Latent")
    hr_second_pass_steps: Int = Field(0, ge=0, le=MAX_STEPS, description="0: `steps`")
    denoising_strength: Number = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False,
                                       description="the hires fix's second pass strength")
    refiner: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="SDXL's refiner: a "
                                "served SDXL model that takes over at `refiner_switch_at` (with the "
                                "hires fix, in its second pass)")
    refiner_switch_at: Number = Field(0.8, allow_inf_nan=False, description="the fraction of the "
                                      "schedule (0 to 1, by timestep) after which the refiner takes over")
    controlnet: list[UnitBody] | None = Field(
        None, description="ControlNet units: the fields of sd-webui-controlnet's unit (`model`, "
        "`module`, `image` as base64 or a data: URL, `weight`, `guidance_start`, `guidance_end`, "
        "`control_mode`, `resize_mode`, `pixel_perfect`, ...), at most "
        "CRAFTSERVE_CONTROLNET_MAX_UNITS (3); a unit without `image` uses `init_image`. With "
        "`enable_hr`, `hr_option` says which passes a unit guides: Both (the default), Low res only, "
        "High res only")


class GenerateRequestV2(GenerateRequest):
    """Body of POST /image/generate (September 2024 docs): steps up to 35, default 35."""

    steps: Int = Field(MAX_STEPS_V2, ge=1, le=MAX_STEPS_V2)


class GenerateRequestV0(GenerateRequest):
    """Body of POST /generate and /generate-xl (spring 2024 docs): up to 5 images, answered
    as URLs."""

    image_count: Int = Field(1, ge=1, le=MAX_IMAGES)


MAX_STEPS_IMG2IMG = 50


class Img2ImgRequest(BaseModel):
    """Body of POST /img2img, as the published wrapper sends it (`image2image`)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    token: str | None = Field(None, description="API key (or send `Authorization: Bearer <key>`)")
    image: str = Field(..., description="the picture: base64 (a `data:` URL too), or an http(s) URL "
                       "where the server allows them (CRAFTSERVE_ALLOW_IMAGE_URLS)")
    prompt: str = Field(..., examples=["the same scene at night"])
    negative_prompt: str = ""
    scheduler: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="a sampler name "
                                  "(GET /img2img/schedulers); absent: the model's default")
    refiner: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="the served model "
                                "that runs the pass (GET /img2img/refiners); absent: the first served")
    mask: str = Field("", description="optional: white repaints (as A1111), the rest is kept; "
                      "base64 or URL as `image`")
    steps: Int = Field(MAX_STEPS_IMG2IMG, ge=1, le=MAX_STEPS_IMG2IMG,
                       description="the pass runs int(steps x strength) of them")
    strength: Number = Field(0.8, ge=0.1, le=1.0, allow_inf_nan=False)
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="extension; absent or -1: random")
    cfg_scale: Number = Field(DEFAULT_CFG, ge=MIN_CFG, le=MAX_CFG, allow_inf_nan=False,
                              description="extension")


class UpscaleRequest(BaseModel):
    """Body of POST /upscale, as the published wrapper sends it (`image_upscaling`)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    token: str | None = Field(None, description="API key (or send `Authorization: Bearer <key>`)")
    image: str = Field(..., description="the picture: base64, or an http(s) URL where allowed")
    model: str = Field("Lanczos", max_length=MAX_NAME_LENGTH, description="an upscaler "
                       "(GET /models-upscale)")
    resize: Literal[2, 4] = Field(2, description="2 or 4 times each side")


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
