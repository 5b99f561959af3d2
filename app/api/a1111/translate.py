"""A txt2img body as the shared core's `ImageRequest` (`plan`), and the core's images as
A1111's answer (`answer`)."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app import __version__
from app.api.a1111.hashes import InfoHashes
from app.api.a1111.models import (
    DEFAULT_SAMPLER,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    A1111Img2ImgRequest,
    A1111Txt2ImgRequest,
)
from app.api.a1111.state import A1111State, checkpoint_field, vae_choice
from app.api.generation import Generated, HiresRequest, ImageInput, ImageRequest, RefinerRequest
from app.api.rules import (
    DEFAULT_CFG,
    MAX_CFG,
    MAX_LORA_WEIGHT,
    MAX_SEED,
    MIN_CFG,
    check_clip_skip,
    check_name,
    check_prompt_length,
    check_range,
    check_side,
    check_steps,
    shown,
)
from app.config import Settings
from app.errors import CraftError, ErrorKind, InvalidParameter, NotServed
from app.imaging import controlnet_entries, parameters_text
from app.registry import Registry
from app.samplers import SCHEDULES
from app.styles import PromptStyle, apply_styles

_LORA_TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>", re.IGNORECASE)


def split_loras(prompt: str, apply: bool = True) -> tuple[str, dict[str, float]]:
    """Take every `<lora:NAME:WEIGHT>` (and `<lyco:...>`) tag out of the prompt: the text without
    them, and {name: weight} (a name tagged twice gets the sum, as A1111 applies both)."""
    loras: dict[str, float] = {}
    for match in _LORA_TAG.finditer(prompt):
        tag = match.group(0)
        name, *weights = (part.strip() for part in match.group(1).split(":"))
        example = f"<lora:{shown(name, 40)}:0.8>"  # (a name is quoted short: the prompt may be long)
        if not name:
            raise InvalidParameter("prompt", tag, "a LoRA tag is <lora:NAME:WEIGHT>, e.g. "
                                   "<lora:my-style:0.8>, with NAME as GET /sdapi/v1/loras lists it")
        if not weights or not weights[0]:
            raise InvalidParameter("prompt", tag, f"the tag has no weight; write <lora:NAME:WEIGHT>, "
                                   f"e.g. {example}")
        if len(weights) > 1:
            raise InvalidParameter("prompt", tag, "separate text-encoder and UNet weights are not "
                                   f"supported; give one weight, e.g. {example}")
        try:
            weight = float(weights[0])
        except ValueError:
            raise InvalidParameter("prompt", tag, f"the weight {shown(weights[0])!r} is not a number; "
                                   f"write e.g. {example}") from None
        if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
            raise InvalidParameter("prompt", tag, f"a LoRA weight is a number from "
                                   f"-{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}")
        if apply:
            loras[name] = loras.get(name, 0.0) + weight
    return _LORA_TAG.sub("", prompt).strip(), loras


@dataclass(frozen=True)
class Plan:
    """A txt2img body as understood: the core's request and what the answer reports."""

    request: ImageRequest
    prompt: str  # as sent with its styles applied, tags included (A1111 reports it so)
    batch_size: int
    n_iter: int
    sd_vae: str
    clip_skip: int
    not_applied: dict[str, Any]
    send_images: bool
    # what `parameters` and `info` report beyond txt2img's (img2img's fields, the hires fix's)
    parameters: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    styles: tuple[str, ...] = ()  # applied, in order
    sent_prompt: str = ""  # the prompts as sent, before the styles (`parameters` echoes them)
    sent_negative_prompt: str = ""


def _not_applied(body: A1111Txt2ImgRequest) -> dict[str, Any]:
    """The fields sent with a value that would change the image in A1111 and changes nothing here."""
    found: dict[str, Any] = {}
    for name in ("restore_faces", "tiling"):
        if getattr(body, name):
            found[name] = True
    same = ("", "use same checkpoint")
    if body.enable_hr and body.hr_checkpoint_name and body.hr_checkpoint_name.lower() not in same:
        found["hr_checkpoint_name"] = shown(body.hr_checkpoint_name)
    if body.subseed_strength:
        found["subseed_strength"] = body.subseed_strength
    if (body.seed_resize_from_w or 0) > 0 or (body.seed_resize_from_h or 0) > 0:
        found["seed_resize_from"] = [body.seed_resize_from_w, body.seed_resize_from_h]
    if body.script_name:
        found["script_name"] = shown(body.script_name)
    scripts = [name for name in (body.alwayson_scripts or {}) if name.lower() != "controlnet"]
    if scripts:  # ControlNet's units are applied (app.api.a1111.controlnet)
        found["alwayson_scripts"] = [shown(name) for name in scripts[:20]]
    return found


def _refiner(body: A1111Txt2ImgRequest, registry: Registry) -> RefinerRequest | None:
    """A1111's refiner fields: null, "" or "None" is no refiner; else a checkpoint name or title
    (the core checks its family and the switch). An absent switch is A1111's None: the refiner
    from the first step."""
    name = body.refiner_checkpoint
    if name is None or name.strip().lower() in ("", "none"):
        return None
    try:
        model = checkpoint_field("refiner_checkpoint", name, registry)
    except NotServed:  # naming the models a refiner may be
        raise NotServed("refiner_checkpoint", name, [n for n, spec in registry.models.items()
                                                     if spec.family == "sdxl"]) from None
    switch = 0.0 if body.refiner_switch_at is None else float(body.refiner_switch_at)
    return RefinerRequest(model=model, switch_at=switch, field="refiner_checkpoint")


def plan(body: A1111Txt2ImgRequest, state: A1111State, client: str, registry: Registry,
         settings: Settings) -> Plan:
    """The core's request for a txt2img body of `client` (its own options apply), checked
    against the shared rules."""
    own = state.of(client)
    overrides = body.override_settings or {}
    checkpoint = overrides.get("sd_model_checkpoint")
    model = state.checkpoint(client) if checkpoint is None else checkpoint_field(
        "override_settings.sd_model_checkpoint", checkpoint, registry)
    sd_vae = overrides.get("sd_vae")
    sd_vae = own.sd_vae if sd_vae is None else vae_choice("override_settings.sd_vae", sd_vae)
    clip_skip = own.clip_skip
    if body.clip_skip is not None:
        clip_skip = check_clip_skip("clip_skip", body.clip_skip)
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        clip_skip = check_clip_skip("override_settings.CLIP_stop_at_last_layers",
                               overrides["CLIP_stop_at_last_layers"])

    prompt = body.prompt or ""
    check_prompt_length("prompt", prompt, settings)  # before the tags are read (and echoed)
    styles = tuple(body.styles or ())
    prompt, negative_prompt = apply_styles(prompt, body.negative_prompt or "", styles, registry.styles)
    check_prompt_length("prompt", prompt, settings)  # with its styles (a style may add tags)
    text, loras = split_loras(prompt, apply=not body.disable_extra_networks)

    sampler = body.sampler_name or body.sampler_index or DEFAULT_SAMPLER
    sampler = check_name("sampler_name" if body.sampler_name else "sampler_index", sampler)
    scheduler = None if body.scheduler is None else check_name("scheduler", body.scheduler)

    batch_size = 1 if body.batch_size is None else body.batch_size
    n_iter = 1 if body.n_iter is None else body.n_iter
    limit = settings.a1111_max_images
    for name, count in (("batch_size", batch_size), ("n_iter", n_iter)):
        check_range(name, count, 1, limit, setting="A1111_MAX_IMAGES",
                    note="; batch_size x n_iter images a request")
    if batch_size * n_iter > limit:
        raise InvalidParameter("batch_size", batch_size, f"batch_size x n_iter = {batch_size * n_iter} "
                               f"images; at most {limit} a request (setting CRAFTSERVE_A1111_MAX_IMAGES)")
    steps = DEFAULT_STEPS if body.steps is None else body.steps
    check_steps("steps", steps, settings)
    width = DEFAULT_SIZE if body.width is None else body.width
    height = DEFAULT_SIZE if body.height is None else body.height
    for name, side in (("width", width), ("height", height)):
        check_side(name, side, settings)
    cfg_scale = DEFAULT_CFG if body.cfg_scale is None else float(body.cfg_scale)
    check_range("cfg_scale", cfg_scale, MIN_CFG, MAX_CFG)
    seed = -1 if body.seed is None else body.seed
    check_range("seed", seed, -1, MAX_SEED, note=" (-1: random)")

    request = ImageRequest(
        model=model, prompt=text, negative_prompt=negative_prompt, sampler=sampler,
        scheduler=scheduler, steps=steps, width=width, height=height, cfg_scale=cfg_scale,
        loras=loras, seed=seed, clip_skip=clip_skip, refiner=_refiner(body, registry),
    )
    parameters: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if body.enable_hr and not isinstance(body, A1111Img2ImgRequest):
        hires = _hires(body, apply_loras=not body.disable_extra_networks,
                       styles=(styles, registry.styles))
        request = replace(request, hires=hires)
        strength = hires.strength
        parameters = {
            "enable_hr": True, "denoising_strength": strength, "hr_scale": hires.scale,
            "hr_upscaler": hires.upscaler, "hr_second_pass_steps": body.hr_second_pass_steps or 0,
            "hr_resize_x": hires.resize_x, "hr_resize_y": hires.resize_y,
            "hr_sampler_name": body.hr_sampler_name, "hr_scheduler": body.hr_scheduler,
            "hr_prompt": body.hr_prompt or "", "hr_negative_prompt": body.hr_negative_prompt or "",
        }
        info = {"denoising_strength": strength}
    return Plan(request=request, prompt=prompt, batch_size=batch_size, n_iter=n_iter, sd_vae=sd_vae,
                clip_skip=clip_skip, not_applied=_not_applied(body),
                send_images=body.send_images is not False, parameters=parameters, info=info,
                styles=styles, sent_prompt=body.prompt or "",
                sent_negative_prompt=body.negative_prompt or "")


def _strength(body: A1111Txt2ImgRequest) -> float:
    strength = 0.75 if body.denoising_strength is None else float(body.denoising_strength)
    check_range("denoising_strength", strength, 0.0, 1.0)
    return strength


def _hires(body: A1111Txt2ImgRequest, *, apply_loras: bool,
           styles: tuple[Sequence[str], Mapping[str, PromptStyle]] = ((), {})) -> HiresRequest:
    """A1111's hires fix fields (the core checks sizes, steps, names and prompts). The request's
    `styles` apply to the hires prompts it gives, as A1111 applies them (empty ones mean the first
    pass's, styled already)."""
    scale = 2.0 if body.hr_scale is None else float(body.hr_scale)
    check_range("hr_scale", scale, 1.0, 8.0)
    steps = body.hr_second_pass_steps or 0
    check_range("hr_second_pass_steps", steps, 0, 10_000, note=" (0: steps)")
    hr_sampler = None if body.hr_sampler_name is None else check_name("hr_sampler_name", body.hr_sampler_name)
    hr_scheduler = None if body.hr_scheduler is None else check_name("hr_scheduler", body.hr_scheduler)
    upscaler = None if body.hr_upscaler is None else check_name("hr_upscaler", body.hr_upscaler)
    cfg = None if body.hr_cfg is None else float(body.hr_cfg)
    if cfg is not None:
        check_range("hr_cfg", cfg, MIN_CFG, MAX_CFG)
    # hr prompts may carry LoRA tags too: the first pass's LoRAs stay active, the tags are text
    hr_prompt, hr_negative = body.hr_prompt or "", body.hr_negative_prompt or ""
    styled_prompt, styled_negative = apply_styles(hr_prompt, hr_negative, *styles)
    hr_prompt = split_loras(styled_prompt if hr_prompt else "", apply=apply_loras)[0]
    hr_negative = styled_negative if hr_negative else ""
    return HiresRequest(
        scale=scale, resize_x=body.hr_resize_x or 0, resize_y=body.hr_resize_y or 0,
        upscaler=upscaler, steps=steps, strength=_strength(body), sampler=hr_sampler,
        scheduler=hr_scheduler, prompt=hr_prompt, negative_prompt=hr_negative, cfg_scale=cfg,
    )


_RESIZE_MODES = (0, 1, 2, 3)


async def plan_img2img(body: A1111Img2ImgRequest, state: A1111State, client: str, registry: Registry,
                       settings: Settings) -> Plan:
    """The core's request for an img2img body: txt2img's plan, the pictures decoded and
    checked, and A1111's img2img fields with its API's defaults."""
    from app.image_inputs import read_image, read_mask

    base = plan(body, state, client, registry, settings)
    if not body.init_images:
        raise InitImageMissing()
    limit = settings.a1111_max_images
    if len(body.init_images) > limit:
        raise InvalidParameter("init_images", f"<{len(body.init_images)} images>",
                               f"at most {limit} pictures a request (setting CRAFTSERVE_A1111_MAX_IMAGES)")
    resize_mode = 0 if body.resize_mode is None else body.resize_mode
    check_range("resize_mode", resize_mode, 0, 3, note=" (0 just resize, 1 crop and resize, 2 resize "
                "and fill, 3 latent upscale)")
    fill = 0 if body.inpainting_fill is None else body.inpainting_fill
    check_range("inpainting_fill", fill, 0, 3, note=" (0 fill, 1 original, 2 latent noise, 3 latent "
                "nothing)")
    blur = body.mask_blur_x if body.mask_blur_x is not None else body.mask_blur
    blur = 4 if blur is None else blur
    check_range("mask_blur", blur, 0, 64)
    padding = body.inpaint_full_res_padding or 0
    check_range("inpaint_full_res_padding", padding, 0, 1024)
    invert = body.inpainting_mask_invert or 0
    check_range("inpainting_mask_invert", invert, 0, 1)
    strength = _strength(body)
    images = tuple([await read_image(f"init_images[{i}]", value, settings)
                    for i, value in enumerate(body.init_images)])
    mask = None if not body.mask else await read_mask("mask", body.mask, settings, convention="a1111")
    full_res = True if body.inpaint_full_res is None else bool(body.inpaint_full_res)
    picture = ImageInput(images=images, mask=mask, strength=strength, resize_mode=resize_mode,
                         mask_blur=blur, fill=fill, full_res=full_res, padding=padding,
                         invert=bool(invert))
    include = bool(body.include_init_images)
    parameters = {
        "init_images": body.init_images if include else None, "mask": body.mask if include else None,
        "resize_mode": resize_mode, "denoising_strength": strength, "image_cfg_scale": body.image_cfg_scale,
        "mask_blur": blur, "mask_blur_x": blur, "mask_blur_y": blur, "inpainting_fill": fill,
        "inpaint_full_res": full_res, "inpaint_full_res_padding": padding,
        "inpainting_mask_invert": invert, "initial_noise_multiplier": None, "latent_mask": None,
        "include_init_images": include, "mask_round": True,
    }
    return replace(base, request=replace(base.request, image=picture), parameters=parameters,
                   info={"denoising_strength": strength})


class InitImageMissing(CraftError):
    """A1111's answer to img2img without a picture: 404 "Init image not found"."""

    status = 404
    kind = ErrorKind.INVALID_PARAMETER

    def __init__(self) -> None:
        super().__init__("Init image not found")


_SCHEDULE_BY_SUFFIX = {s.suffix: s for s in SCHEDULES}


def _schedule_ran(image: Generated) -> tuple[str, str]:
    """(A1111 label, name) of the schedule that ran, read from the label of what ran."""
    sampler, label = image.params.sampler.sampler, image.result.sampler_label
    suffix = label[len(sampler) + 1:] if label.startswith(sampler + " ") else "Normal"
    schedule = _SCHEDULE_BY_SUFFIX.get(suffix)
    return (suffix, schedule.name) if schedule else (suffix, suffix.lower())


def answer(plan: Plan, generated: list[Generated], registry: Registry,
           restore_afterwards: bool, *, hashes: InfoHashes) -> dict[str, Any]:
    """A1111's txt2img answer: `images` (base64 PNGs), `parameters` and `info` (a JSON string).
    `hashes`: the model's, its VAE's and the LoRAs' (ModelHashes.for_info, off the loop)."""
    first = generated[0]
    params = first.params
    count = len(generated)
    seeds = [image.params.seed for image in generated]
    schedule_label, schedule_name = _schedule_ran(first)
    negative = params.negative_prompt
    vae = registry.models[params.model].vae
    info = {
        "prompt": plan.prompt, "all_prompts": [plan.prompt] * count,
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        "seed": seeds[0], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": params.width, "height": params.height,
        "sampler_name": params.sampler.sampler, "scheduler": schedule_label,
        "cfg_scale": params.cfg_scale, "steps": params.steps, "batch_size": plan.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": params.model, "sd_model_hash": hashes.model,
        "sd_vae_name": vae, "sd_vae_hash": hashes.vae,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        **plan.info,
        "extra_generation_params": {"Schedule type": schedule_label, **hashes.extra_params(),
                                    **controlnet_entries(params.controlnet)},
        "index_of_first_image": 0,
        "infotexts": [parameters_text(g.params, g.result.seed, g.result.sampler_label) for g in generated],
        "styles": list(plan.styles), "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": plan.clip_skip, "is_using_inpainting_conditioning": False,
        "version": f"craftserve {__version__}",
        "craftserve_not_applied": plan.not_applied,
        "craftserve_job_ids": [g.job_id for g in generated],
    }
    parameters = {
        **_A1111_DEFAULTS,
        "prompt": plan.sent_prompt, "negative_prompt": plan.sent_negative_prompt, "seed": seeds[0],
        "sampler_name": params.sampler.sampler, "sampler_index": params.sampler.sampler,
        "scheduler": schedule_name, "batch_size": plan.batch_size, "n_iter": plan.n_iter,
        "styles": list(plan.styles),
        "steps": params.steps, "cfg_scale": params.cfg_scale, "width": params.width,
        "height": params.height,
        "override_settings": {"sd_model_checkpoint": params.model, "sd_vae": plan.sd_vae,
                              "CLIP_stop_at_last_layers": plan.clip_skip},
        "override_settings_restore_afterwards": restore_afterwards,
        "send_images": plan.send_images,
        **plan.parameters,
    }
    if params.refiner is not None:
        parameters.update(refiner_checkpoint=params.refiner.model, refiner_switch_at=params.refiner.switch_at)
    images = [base64.b64encode(g.data).decode("ascii") for g in generated] if plan.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


# A1111's defaults of the fields craftserve does not apply: what `parameters` reports for them.
_A1111_DEFAULTS: dict[str, Any] = {
    "styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
    "seed_resize_from_w": -1, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "eta": None, "denoising_strength": None, "s_min_uncond": None,
    "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": None, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None,
    "script_name": None, "script_args": [], "save_images": False, "alwayson_scripts": {},
    "infotext": None,
}


