"""Request and answer shapes of OpenAI's images API (`/v1`), as the openai SDK sends and reads
them (docs/api-contracts.md), plus craftserve's extensions under VisionCraft's names."""

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
    Int,
    Loras,
    Number,
)

DEFAULT_STEPS = 30
DEFAULT_REFINER_SWITCH = 0.8  # A1111's UI default (its API's absent value, 0, is refiner-only)


class OpenAIImageRequest(BaseModel):
    """Body of POST /v1/images/generations: OpenAI's fields plus craftserve extensions. Unknown
    fields and nulls are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, examples=["a lighthouse at dusk, oil painting"])
    model: str | None = Field(
        None, max_length=MAX_NAME_LENGTH,
        description="a served model (GET /v1/models) or a name mapped by the setting "
        "CRAFTSERVE_OPENAI_MODEL_ALIASES (e.g. dall-e-3); absent: the first model of models.yaml",
        examples=["sdxl-base"],
    )
    n: Int | None = Field(None, description="images, 1 to CRAFTSERVE_OPENAI_MAX_IMAGES (4); "
                          "seeds seed, seed+1, ...; absent: 1")
    size: str | None = Field(None, description="WIDTHxHEIGHT, each side 64 to "
                             "CRAFTSERVE_A1111_MAX_SIZE (2048), or `auto` (absent): the model's "
                             "native size, 1024x1024 SDXL, 512x512 SD 1.x", examples=["1024x1024"])
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="absent: url (b64_json when the requested model is named gpt-image-*)")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="absent: png")
    output_compression: Int | None = Field(
        None, ge=0, le=100, description="jpeg and webp quality 0-100; absent: 100")
    stream: bool | None = Field(None, description="false or absent; streaming is not offered")
    quality: Any = Field(None, description="accepted and ignored")
    style: Any = Field(None, description="accepted and ignored")
    user: Any = Field(None, description="accepted and ignored")
    background: Any = Field(None, description="accepted and ignored")
    moderation: Any = Field(None, description="accepted and ignored")
    partial_images: Any = Field(None, description="accepted and ignored")
    # craftserve extensions (VisionCraft's names)
    negative_prompt: str | None = Field(None, description="extension")
    steps: Int | None = Field(None, description=f"extension: 1 to CRAFTSERVE_A1111_MAX_STEPS (150); "
                              f"absent: {DEFAULT_STEPS}")
    cfg_scale: Number | None = Field(None, ge=MIN_CFG, le=MAX_CFG, allow_inf_nan=False,
                                     description=f"extension; absent: {DEFAULT_CFG:g}")
    sampler: str | None = Field(None, max_length=MAX_NAME_LENGTH,
                                description="extension: a sampler name; absent: the model's default")
    scheduler: str | None = Field(None, max_length=MAX_NAME_LENGTH,
                                  description="extension: a ComfyUI schedule name")
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="extension: absent or -1: random")
    loras: Loras | None = Field(None, description="extension: {lora name: weight}")
    clip_skip: Int | None = Field(None, ge=1, le=MAX_CLIP_SKIP,
                                  description="extension: A1111's CLIP_stop_at_last_layers, 1 to 12 "
                                  "(SD 1.x models; SDXL ignores it as A1111 does)")
    refiner: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="extension: SDXL's "
                                "refiner, a served SDXL model that takes over at `refiner_switch_at`")
    refiner_switch_at: Number | None = Field(
        None, allow_inf_nan=False, description="extension: the fraction of the schedule (0 to 1, by "
        f"timestep) after which the refiner takes over; absent: {DEFAULT_REFINER_SWITCH:g}")
    controlnet: list[UnitBody] | None = Field(
        None, description="extension: ControlNet units, the fields of sd-webui-controlnet's unit "
        "(`model`, `module`, `image` as base64 or a data: URL, `weight`, `guidance_start`, "
        "`guidance_end`, `control_mode`, `resize_mode`, `pixel_perfect`, ...), at most "
        "CRAFTSERVE_CONTROLNET_MAX_UNITS (3); the detected maps are not answered "
        "(POST /controlnet/detect gives them). Edits take it as JSON text or as "
        "`controlnet[][field]` parts (the openai SDK's extra_body)")


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="the image, base64 without a data: prefix "
                                 "(response_format b64_json)")
    url: str | None = Field(None, description="where to fetch the image (response_format url); "
                            "kept in memory up to CRAFTSERVE_IMAGE_STORE_MB")
    revised_prompt: None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage] = Field(description="one item per image, with `b64_json` or `url`")
    output_format: Literal["png", "jpeg", "webp"]
    size: str = Field(examples=["1024x1024"])


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # craftserve's extensions (clients ignore them): the model's weights are not here (it
    # answers 503 until they are, where the Hub cannot be reached); the model of requests
    # that name none or one of OpenAI's own names
    waiting_for_weights: bool = False
    default: bool = False


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(examples=["size"])
    code: str | None = Field(examples=["invalid_value"])


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def error_doc(description: str) -> dict:
    return {"model": OpenAIErrorBody, "description": description}


AUTH_ERRORS = {401: error_doc("missing or wrong API key (`code`: invalid_api_key)")}
GENERATION_ERRORS = {
    400: error_doc("a field out of range or of the wrong type, malformed JSON, an unknown sampler or "
                "LoRA; `param` names the field"),
    **AUTH_ERRORS,
    404: error_doc("`code` model_not_found: the model is neither served nor an alias; the message "
                "names the served ones"),
    429: error_doc("the key is past its rate limit (keys file or CRAFTSERVE_RATE_LIMIT; `code` "
                "rate_limit_exceeded), or has its whole share of the queue waiting (keys file or "
                "CRAFTSERVE_MAX_QUEUE_PER_KEY; `code` key_queue_full); with `Retry-After`"),
    500: error_doc("a bug (the server log has it); `x-should-retry: false`"),
    503: error_doc("the queue is full, a job outlived its queue deadline or the server is shutting "
                "down (with `Retry-After`); the model cannot be served now or there is not enough "
                "memory (`x-should-retry: false`)"),
}




# ---- edits and variations (multipart/form-data) -------------------------------------------------
DEFAULT_EDIT_STRENGTH = 0.75  # no mask: image to image of the whole picture (A1111's default)
DEFAULT_INPAINT_STRENGTH = 1.0  # a mask: its area generated anew from the prompt, the rest kept
DEFAULT_VARIATION_STRENGTH = 0.6  # a variation: the picture's layout and colours, details anew
EDIT_MASK_BLUR = 4  # A1111's default: the seam is blended over 4 pixels or so
MAX_EDIT_IMAGES = 16  # OpenAI's limit for gpt-image edits


class OpenAIEditRequest(OpenAIImageRequest):
    """The text fields of POST /v1/images/edits (its files, `image`/`image[]` and `mask`, are
    read apart). Every field of /v1/images/generations, plus OpenAI's edit-only ones and
    craftserve's image-to-image extensions. Multipart sends text: numbers are parsed."""

    input_fidelity: Any = Field(None, description="accepted and ignored")
    safety_identifier: Any = Field(None, description="accepted and ignored")
    strength: Number | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description=f"extension: how much of the picture is generated anew (A1111's denoising "
        f"strength; int(steps x strength) steps run); absent: {DEFAULT_INPAINT_STRENGTH:g} with a "
        f"mask (its area regenerated), {DEFAULT_EDIT_STRENGTH:g} without")
    resize_mode: Int | None = Field(
        None, ge=0, le=3, description="extension: A1111's resize mode when `size` differs from the "
        "picture's: 0 just resize, 1 crop and resize (absent), 2 resize and fill, 3 latent upscale")


class OpenAIVariationRequest(OpenAIEditRequest):
    """The text fields of POST /v1/images/variations: no prompt (an extension may give one)."""

    prompt: str = Field("", description=f"extension; absent: empty (a variation of the picture "
                        f"at strength {DEFAULT_VARIATION_STRENGTH:g})")


def multipart_schema(fields: type[BaseModel], *, several: bool, mask: bool) -> dict:
    """The OpenAPI request body of a multipart route: the files and the model's text fields."""
    properties: dict[str, Any] = {}
    binary = {"type": "string", "format": "binary"}
    if several:
        properties["image"] = {"description": "the picture(s) (PNG, JPEG, WebP, GIF, BMP, TIFF); "
                               "several as repeated `image[]` parts: answer image i starts from "
                               "picture i modulo their count", **binary}
    else:
        properties["image"] = {"description": "the picture", **binary}
    if mask:
        properties["mask"] = {"description": "a PNG with alpha, the size of the first picture: its "
                              "fully transparent pixels are regenerated, the others kept", **binary}
    schema = fields.model_json_schema()
    for name, prop in schema.get("properties", {}).items():
        if name not in ("loras", "controlnet"):  # JSON as text, or flattened parts
            properties[name] = prop
    properties["controlnet"] = {"type": "string", "description": "extension: ControlNet units as JSON "
                                "text (a list of unit objects, as /v1/images/generations takes them), "
                                "or `controlnet[][field]` parts; a unit without `image` uses the picture"}
    required = ["image"] + [n for n in schema.get("required", []) if n in properties]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}}


EDIT_ERRORS = {
    **GENERATION_ERRORS,
    400: error_doc("a field out of range or of the wrong type, a missing prompt or image, an image "
                   "or mask that is not an image or is past the byte or pixel caps "
                   "(CRAFTSERVE_MAX_IMAGE_BYTES, CRAFTSERVE_MAX_IMAGE_PIXELS), a mask without alpha "
                   "or of another size than the first image; `param` names the field"),
    413: error_doc("the body is past CRAFTSERVE_MAX_IMAGE_BODY_BYTES"),
    415: error_doc("not multipart/form-data with an `Authorization: Bearer` key (app/api/guards.py)"),
}
