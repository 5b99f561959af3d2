"""Request and answer shapes of the AUTOMATIC1111 dialect (`/sdapi/v1`), as A1111 v1.10 names
them (docs/api-contracts.md). Every field is optional and `null` means "not sent": the
defaults and the settings-dependent limits are applied by app.api.a1111.translate with the
shared rules (app.api.rules); the types are checked here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.api.rules import DEFAULT_CFG, MAX_CFG, MIN_CFG, MIN_SIDE, Int, Number

# A1111's own defaults where a txt2img body is silent.
DEFAULT_STEPS = 50
DEFAULT_SIZE = 512
DEFAULT_SAMPLER = "Euler"


def _ignored(description: str = "accepted; not applied") -> Any:
    return Field(None, description=description)


class A1111Txt2ImgRequest(BaseModel):
    """Body of POST /sdapi/v1/txt2img: every field of A1111's model. Unknown fields and nulls are
    ignored. Fields marked "not applied" change nothing; when one is set to a value that would
    change the image in A1111 (face restoration, tiling, scripts, subseeds, ...),
    the answer's `info.craftserve_not_applied` names it."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(
        None, description="`<lora:NAME:WEIGHT>` tags are taken out of the text and applied as the "
        "request's LoRAs (names as GET /sdapi/v1/loras lists them)",
        examples=["a lighthouse at dusk <lora:my-style:0.8>"])
    negative_prompt: str | None = None
    styles: list[str] | None = Field(
        None, description="prompt styles (GET /sdapi/v1/prompt-styles), applied in order as A1111 "
        "applies them; an unknown name is a 422")
    seed: Int | None = Field(None, description="-1 or absent: random; image i of the request gets "
                             "seed + i")
    subseed: Int | None = _ignored()
    subseed_strength: Number | None = _ignored()
    seed_resize_from_h: Int | None = _ignored()
    seed_resize_from_w: Int | None = _ignored()
    sampler_name: str | None = Field(None, description=f"absent: `sampler_index`, else "
                                     f"{DEFAULT_SAMPLER!r} (GET /sdapi/v1/samplers)")
    sampler_index: str | None = Field(None, description="A1111's legacy name of `sampler_name`; "
                                      "used only when `sampler_name` is absent")
    scheduler: str | None = Field(None, description="a schedule (GET /sdapi/v1/schedulers); "
                                  "`automatic` or absent: the sampler's own")
    batch_size: Int | None = Field(None, description="absent: 1; batch_size x n_iter images, at "
                                   "most CRAFTSERVE_A1111_MAX_IMAGES (8)")
    n_iter: Int | None = Field(None, description="absent: 1")
    steps: Int | None = Field(None, description=f"absent: {DEFAULT_STEPS}; at most "
                              "CRAFTSERVE_A1111_MAX_STEPS (150)")
    cfg_scale: Number | None = Field(None, allow_inf_nan=False,
                                     description=f"absent: {DEFAULT_CFG:g}; {MIN_CFG:g} to {MAX_CFG:g}")
    width: Int | None = Field(None, description=f"absent: {DEFAULT_SIZE}; {MIN_SIDE} to "
                              "CRAFTSERVE_A1111_MAX_SIZE (2048)")
    height: Int | None = Field(None, description=f"absent: {DEFAULT_SIZE}; as width")
    restore_faces: bool | None = _ignored()
    tiling: bool | None = _ignored()
    do_not_save_samples: bool | None = _ignored()
    do_not_save_grid: bool | None = _ignored()
    eta: Number | None = _ignored()
    denoising_strength: Number | None = Field(None, allow_inf_nan=False, description="the hires "
                                              "fix's (txt2img) or img2img's strength, 0 to 1; absent: 0.75")
    s_min_uncond: Number | None = _ignored()
    s_churn: Number | None = _ignored()
    s_tmax: Number | None = _ignored()
    s_tmin: Number | None = _ignored()
    s_noise: Number | None = _ignored()
    override_settings: dict[str, Any] | None = Field(
        None, description="applied: `sd_model_checkpoint` (a title from GET /sdapi/v1/sd-models), "
        "`sd_vae` (Automatic or None), `CLIP_stop_at_last_layers` (1-12, SD 1.x; SDXL ignores it, as A1111); "
        "other keys are ignored")
    override_settings_restore_afterwards: bool | None = Field(
        None, description="false: the override_settings stay in GET /sdapi/v1/options afterwards")
    refiner_checkpoint: str | None = Field(
        None, description="SDXL's refiner: a served SDXL model (a name or title of GET "
        "/sdapi/v1/sd-models); null, empty or `None`: no refiner. With the hires fix it refines the "
        "second pass (A1111's default)")
    refiner_switch_at: Number | None = Field(
        None, allow_inf_nan=False, description="the fraction of the schedule (0 to 1, by timestep as "
        "A1111) after which the refiner takes over; absent: 0, the refiner from the first step (as "
        "A1111's API); 1: never")
    disable_extra_networks: bool | None = Field(
        None, description="true: `<lora:...>` tags are taken out of the prompt and not applied")
    firstpass_image: str | None = _ignored()
    comments: dict[str, Any] | None = _ignored()
    enable_hr: bool | None = Field(None, description="true: A1111's hires fix: the first pass, "
                                   "upscaled by `hr_upscaler`, then an img2img pass at `denoising_strength`")
    firstphase_width: Int | None = _ignored()
    firstphase_height: Int | None = _ignored()
    hr_scale: Number | None = Field(None, allow_inf_nan=False, description="absent: 2 (1 to 8)")
    hr_upscaler: str | None = Field(None, description="absent: `Latent`; GET /sdapi/v1/upscalers "
                                    "and /sdapi/v1/latent-upscale-modes list the names")
    hr_second_pass_steps: Int | None = Field(None, description="0 or absent: `steps`")
    hr_resize_x: Int | None = Field(None, description="0 or absent: by hr_scale")
    hr_resize_y: Int | None = Field(None, description="0 or absent: by hr_scale")
    hr_checkpoint_name: str | None = _ignored("accepted; the second pass uses the first pass's model")
    hr_sampler_name: str | None = Field(None, description="absent: the first pass's sampler")
    hr_scheduler: str | None = Field(None, description="absent: the first pass's schedule")
    hr_prompt: str | None = Field(None, description="empty or absent: `prompt`")
    hr_negative_prompt: str | None = Field(None, description="empty or absent: `negative_prompt`")
    hr_cfg: Number | None = Field(None, allow_inf_nan=False, description="Forge's: the second pass's "
                                  "CFG; absent: `cfg_scale`")
    force_task_id: str | None = _ignored()
    script_name: str | None = _ignored("accepted; no scripts run (GET /sdapi/v1/scripts)")
    script_args: list[Any] | None = _ignored()
    send_images: bool | None = Field(None, description="false: `images` is empty")
    save_images: bool | None = _ignored("accepted; images are never saved on the server")
    alwayson_scripts: dict[str, Any] | None = _ignored("ControlNet units (`controlnet.args`) run; other "
                                                       "scripts are accepted and not run")
    infotext: str | None = _ignored()
    clip_skip: Int | None = Field(None, description="SillyTavern's copy of "
                                  "`override_settings.CLIP_stop_at_last_layers`")


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    """Body of POST /sdapi/v1/img2img: every txt2img field, the picture(s) and A1111's img2img
    knobs, with A1111's API defaults (not its web UI's)."""

    init_images: list[str] | None = Field(None, description="base64 pictures, with or without a "
                                           "`data:` prefix (http(s) URLs where the server allows "
                                           "them); image i of the request starts from init_images[i "
                                           "% len]")
    mask: str | None = Field(None, description="white repaints; an RGBA mask that is not fully "
                             "opaque is read from its alpha; resized to the picture as A1111 does")
    resize_mode: Int | None = Field(None, description="0 just resize (absent), 1 crop and resize, 2 "
                                    "resize and fill, 3 just resize (latent upscale)")
    image_cfg_scale: Number | None = _ignored("accepted; for instruct-pix2pix models only")
    mask_blur: Int | None = Field(None, description="absent: 4 (pixels, a Gaussian's sigma)")
    mask_blur_x: Int | None = Field(None, description="absent: `mask_blur`")
    mask_blur_y: Int | None = Field(None, description="absent: `mask_blur` (as x: one sigma is used)")
    mask_round: bool | None = _ignored()
    inpainting_fill: Int | None = Field(None, description="masked content: 0 fill (absent), 1 "
                                        "original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool | Int | None = Field(None, description="\"only masked\": absent or true: "
                                                "the mask's box is generated at the full size and "
                                                "pasted back")
    inpaint_full_res_padding: Int | None = Field(None, description="absent: 0 (pixels around the box)")
    inpainting_mask_invert: Int | None = Field(None, description="1: the black area repaints")
    initial_noise_multiplier: Number | None = _ignored()
    latent_mask: str | None = _ignored()
    include_init_images: bool | None = Field(None, description="true: `parameters` echoes "
                                             "init_images and mask")


class A1111ExtraSingleRequest(BaseModel):
    """Body of POST /sdapi/v1/extra-single-image (and the common part of extra-batch-images)."""

    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(None, description="a base64 picture")
    resize_mode: Int | None = Field(None, description="0 by upscaling_resize (absent), 1 to "
                                    "upscaling_resize_w x _h")
    show_extras_results: bool | None = _ignored()
    gfpgan_visibility: Number | None = _ignored("accepted; no face restorer is served")
    codeformer_visibility: Number | None = _ignored("accepted; no face restorer is served")
    codeformer_weight: Number | None = _ignored()
    upscaling_resize: Number | None = Field(None, allow_inf_nan=False, description="absent: 2 (1 to 8)")
    upscaling_resize_w: Int | None = Field(None, description="absent: 512")
    upscaling_resize_h: Int | None = Field(None, description="absent: 512")
    upscaling_crop: bool | None = Field(None, description="absent: true (crop to the exact size)")
    upscaler_1: str | None = Field(None, description="absent: None (GET /sdapi/v1/upscalers)")
    upscaler_2: str | None = Field(None, description="absent: None")
    extras_upscaler_2_visibility: Number | None = Field(None, allow_inf_nan=False,
                                                        description="0 to 1; absent: 0")
    upscale_first: bool | None = _ignored()


class A1111ImageData(BaseModel):
    data: str
    name: str | None = None


class A1111ExtraBatchRequest(A1111ExtraSingleRequest):
    imageList: list[A1111ImageData] | None = None  # noqa: N815 - A1111's name


class A1111Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, no data: prefix; each carries A1111's "
                              "`parameters` text chunk")
    parameters: dict[str, Any] = Field(description="the request as it ran: A1111's fields, the "
                                       "values used, A1111's defaults for what is not applied")
    info: str = Field(description="a JSON object as a string: seed, all_seeds, prompt, all_prompts, "
                      "negative_prompt, sampler_name, scheduler, steps, cfg_scale, width, height, "
                      "sd_model_name, batch_size, infotexts, clip_skip, ..., and "
                      "craftserve_not_applied (fields sent that did not change the image)")


class A1111SdModel(BaseModel):
    title: str = Field(description="the served model name; what `sd_model_checkpoint` takes")
    model_name: str
    hash: str = Field(description="A1111's short hash: the first 10 hex digits of `sha256`")
    sha256: str = Field(description="sha256 of the model's weights file (docs/clients.md says which "
                        "file for each kind of model)")
    filename: str = Field(description="the models.yaml source: a Hugging Face repo id, a local "
                          "folder or builtin:...")
    config: str | None = None


class A1111Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str] = Field(description="`scheduler`: the schedule the name gets by default")


class A1111Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class A1111Lora(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(description="`models`: the served models whose layers it fits")


class A1111SdVae(BaseModel):
    model_name: str
    filename: str


class A1111Upscaler(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class A1111LatentUpscaleMode(BaseModel):
    name: str


class A1111ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class A1111Embeddings(BaseModel):
    loaded: dict[str, Any] = Field(default_factory=dict)
    skipped: dict[str, Any] = Field(default_factory=dict)


class A1111ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = Field("", description="the current job's id")
    job_count: int = Field(0, description="the caller's jobs running or waiting")
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class A1111Progress(BaseModel):
    progress: float = Field(description="the caller's current job: steps done / steps, 0 to 1")
    eta_relative: float = Field(description="seconds the current job still needs (estimate)")
    state: A1111ProgressState
    current_image: str | None = Field(None, description="always null: no previews")
    textinfo: str | None = None


class A1111Options(BaseModel):
    """GET /sdapi/v1/options: the caller's own view: these keys, plus every other key it has
    POSTed (kept, not applied); another key's choices never show."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str = Field(description="the model this key's A1111 requests use unless "
                                     "their override_settings name another")
    sd_checkpoint_hash: str = Field("", description="sha256 of sd_model_checkpoint's weights (\"\" "
                                    "for a checkpoint a reload removed)")
    sd_vae: str = "Automatic"
    CLIP_stop_at_last_layers: int = 1


class A1111Error(BaseModel):
    error: str = Field(description="the error's class", examples=["NotServed"])
    detail: str = Field(description="one readable sentence naming the field, the value and the rule")
    body: str = ""
    errors: str | list[dict[str, Any]] = Field(
        description="the message again, or for a body that fails validation the list of "
        "{loc, msg, type}")
