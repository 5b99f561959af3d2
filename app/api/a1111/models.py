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
    change the image in A1111 (hires fix, face restoration, tiling, styles, scripts, subseeds,
    ...), the answer's `info.craftserve_not_applied` names it."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(
        None, description="`<lora:NAME:WEIGHT>` tags are taken out of the text and applied as the "
        "request's LoRAs (names as GET /sdapi/v1/loras lists them)",
        examples=["a lighthouse at dusk <lora:my-style:0.8>"])
    negative_prompt: str | None = None
    styles: list[str] | None = _ignored()
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
    denoising_strength: Number | None = _ignored()
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
    refiner_checkpoint: str | None = _ignored()
    refiner_switch_at: Number | None = _ignored()
    disable_extra_networks: bool | None = Field(
        None, description="true: `<lora:...>` tags are taken out of the prompt and not applied")
    firstpass_image: str | None = _ignored()
    comments: dict[str, Any] | None = _ignored()
    enable_hr: bool | None = _ignored("accepted; the hires fix is not applied")
    firstphase_width: Int | None = _ignored()
    firstphase_height: Int | None = _ignored()
    hr_scale: Number | None = _ignored()
    hr_upscaler: str | None = _ignored()
    hr_second_pass_steps: Int | None = _ignored()
    hr_resize_x: Int | None = _ignored()
    hr_resize_y: Int | None = _ignored()
    hr_checkpoint_name: str | None = _ignored()
    hr_sampler_name: str | None = _ignored()
    hr_scheduler: str | None = _ignored()
    hr_prompt: str | None = _ignored()
    hr_negative_prompt: str | None = _ignored()
    force_task_id: str | None = _ignored()
    script_name: str | None = _ignored("accepted; no scripts run (GET /sdapi/v1/scripts)")
    script_args: list[Any] | None = _ignored()
    send_images: bool | None = Field(None, description="false: `images` is empty")
    save_images: bool | None = _ignored("accepted; images are never saved on the server")
    alwayson_scripts: dict[str, Any] | None = _ignored("accepted; no scripts run")
    infotext: str | None = _ignored()
    clip_skip: Int | None = Field(None, description="SillyTavern's copy of "
                                  "`override_settings.CLIP_stop_at_last_layers`")


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
    hash: str | None = None
    sha256: str | None = None
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
    sd_checkpoint_hash: str | None = None
    sd_vae: str = "Automatic"
    CLIP_stop_at_last_layers: int = 1


class A1111Error(BaseModel):
    error: str = Field(description="the error's class", examples=["NotServed"])
    detail: str = Field(description="one readable sentence naming the field, the value and the rule")
    body: str = ""
    errors: str | list[dict[str, Any]] = Field(
        description="the message again, or for a body that fails validation the list of "
        "{loc, msg, type}")
