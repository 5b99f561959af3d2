"""The shared core of every generation route, whatever its dialect.

A dialect (VisionCraft, A1111, OpenAI) checks its own body against its own ranges, turns it
into an `ImageRequest` and calls `generate_images`; it only formats the answer. So the same
request gives the same pixels through any route, and compatible jobs of different dialects
batch together.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from app.api.rules import (
    MAX_SEED,
    check_clip_skip,
    check_prompt_chunks,
    check_prompt_length,
    check_prompt_syntax,
    check_range,
    check_steps,
)
from app.config import Settings
from app.controlnet_files import find_controlnet
from app.engine.control_units import BOTH, HR_OPTIONS, ControlImages, ControlUnit, hires_mode
from app.engine.image_ops import Source, prepare_source
from app.engine.jobs import GenParams, Hires, Job, JobResult, Refiner, UpscaleParams, round_up8
from app.engine.protocol import EngineAPI
from app.engine.upscalers import LATENT_MODES, PIXEL_BUILTINS
from app.errors import (
    ErrorKind,
    InternalError,
    InvalidParameter,
    KeyQueueFull,
    LoraError,
    NotServed,
    Unavailable,
)
from app.families import REFINER_ONLY_RULE, Family, family_label
from app.image_inputs import off_loop, off_loop_preprocessing
from app.imaging import encode_image, encode_png, parameters_text
from app.registry import Registry
from app.samplers import resolve_sampler

DEFAULT_SAMPLER = "DPM++ 2M Karras"
# A key past its share of the queue is told to retry after this many seconds for each job
# ahead of its first waiting one (an estimate: EngineAPI has no throughput), at most the cap.
RETRY_S_PER_PLACE = 2.0
MAX_SHARE_RETRY_S = 60.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ImageInput:
    """The pictures of an image-to-image request, decoded and checked (app.image_inputs), and
    A1111's knobs for them (its API's defaults; a dialect sets what its clients mean).

    `images` are used in turn: image i of the request starts from images[i % len(images)]."""

    images: tuple[Any, ...]  # PIL images, RGB
    mask: Any = None  # PIL image (any mode; app.engine.image_ops.binary_mask reads it), or None
    strength: float = 0.75
    resize_mode: int = 0
    mask_blur: float = 4
    fill: int = 0
    full_res: bool = True
    padding: int = 0
    invert: bool = False


@dataclass(frozen=True)
class HiresRequest:
    """A1111's hires fix fields as asked (0 / "" / None: A1111's meaning of unset)."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str | None = None  # None: "Latent"
    steps: int = 0  # 0: the first pass's steps
    strength: float = 0.75
    sampler: str | None = None  # None: the first pass's
    scheduler: str | None = None
    prompt: str = ""  # "": the first pass's
    negative_prompt: str = ""
    cfg_scale: float | None = None  # None: the first pass's


@dataclass(frozen=True)
class RefinerRequest:
    """SDXL's refiner as asked: a served model name and the fraction of the schedule after
    which it takes over (A1111's refiner_checkpoint / refiner_switch_at). `field` and
    `switch_field` name them in errors, in the dialect's words."""

    model: str
    switch_at: float
    field: str = "refiner"
    switch_field: str = "refiner_switch_at"


@dataclass(frozen=True, eq=False)
class UnitRequest:
    """One ControlNet unit as asked (the extension's fields; a dialect maps its own onto these).
    `where` names the unit in errors (e.g. "alwayson_scripts.controlnet.args[0]"). `image`: a
    decoded RGB picture, or None to use the request's init picture."""

    model: str
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0  # 0 Balanced, 1 My prompt is more important, 2 ControlNet is more important
    resize_mode: int = 1  # 0 Just Resize, 1 Crop and Resize, 2 Resize and Fill
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False
    image: Any = None
    hr_option: str = "Both"
    save_detected_map: bool = True
    where: str = "controlnet[0]"


@dataclass(frozen=True)
class ImageRequest:
    """One request for images, in no dialect's terms. Ranges were checked by the dialect with
    the shared rules (app.api.rules); names (model, sampler, LoRAs) and server-wide limits are
    checked by `to_params`."""

    model: str
    prompt: str
    negative_prompt: str = ""
    sampler: str | None = None  # None: the model's default sampler
    scheduler: str | None = None
    steps: int = 30
    width: int = 1024
    height: int = 1024
    cfg_scale: float = 7.0
    loras: Mapping[str, float] = field(default_factory=dict)
    seed: int | None = None  # None or negative: random
    clip_skip: int | None = None  # A1111's CLIP_stop_at_last_layers; None: 1 (the last layer)
    image: ImageInput | None = None  # image to image / inpainting
    hires: HiresRequest | None = None  # text to image with A1111's hires fix
    controlnet: tuple[UnitRequest, ...] = ()  # enabled ControlNet units, in order
    refiner: RefinerRequest | None = None  # SDXL's refiner


@dataclass(frozen=True)
class Generated:
    """One image as generated: its encoded bytes (PNG unless the dialect asked for another
    format; the A1111 `parameters` text always inside) and facts."""

    data: bytes
    params: GenParams
    result: JobResult
    job_id: str

    def headers(self) -> dict[str, str]:
        """The X-* facts craftserve adds to every answer with one image."""
        result = self.result
        return {
            "X-Job-Id": self.job_id,
            "X-Seed": str(result.seed),
            "X-Model": self.params.model,
            "X-Sampler": result.sampler_label,
            "X-Queue-Wait-Ms": f"{result.queue_wait_s * 1000:.1f}",
            "X-Generation-Ms": f"{result.generation_s * 1000:.1f}",
            "X-Batch-Size": str(result.batch_size),
            "X-Worker": result.worker,
        }


def _embeddings_used(registry: Registry, family: Family, texts: tuple[str, ...]) -> tuple:
    """The family's embeddings whose name occurs in the prompts (case and runs of spaces
    aside, as the tokenizer sees them); the worker matches them on tokens."""
    available = registry.embeddings_for(family)
    if not available:
        return ()
    seen = " ".join(" ".join(t.lower().split()) for t in texts)
    return tuple(sorted((name, spec.path) for name, spec in available.items()
                        if " ".join(name.lower().split()) in seen))


def to_params(body: ImageRequest, registry: Registry, settings: Settings) -> GenParams:
    """Check the request against the registry and the settings; resolve every name."""
    spec = registry.models.get(body.model)
    if spec is None:
        raise NotServed("model", body.model, registry.models)
    if spec.refiner_only:
        raise InvalidParameter("model", body.model, REFINER_ONLY_RULE)
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        check_prompt_length(name, text, settings)
        check_prompt_syntax(name, text)
        check_prompt_chunks(name, text, settings)
    clip_skip = 1 if body.clip_skip is None else check_clip_skip("clip_skip", body.clip_skip)
    sampler = resolve_sampler(body.sampler or spec.default_sampler or DEFAULT_SAMPLER, body.scheduler)
    if len(body.loras) > settings.max_loras:
        raise InvalidParameter(
            "loras", f"<{len(body.loras)} entries>",
            f"at most {settings.max_loras} LoRAs a request (setting CRAFTSERVE_MAX_LORAS)",
        )
    for name in body.loras:
        lora = registry.loras.get(name)
        if lora is None:
            raise NotServed("lora", name, registry.lora_names(spec.family))
        reason = lora.misfit(spec)
        if reason:
            raise LoraError(name, reason)
    seed = body.seed if body.seed is not None and body.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
    hires = None if body.hires is None else _hires(body, sampler, registry, settings)
    image = body.image
    return GenParams(
        model=spec.name,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        sampler=sampler,
        steps=body.steps,
        width=body.width,
        height=body.height,
        cfg_scale=float(body.cfg_scale),
        loras=tuple(sorted((name, registry.loras[name].path, float(weight))
                           for name, weight in body.loras.items())),
        seed=seed,
        clip_skip=clip_skip,
        embeddings=_embeddings_used(registry, spec.family, (body.prompt, body.negative_prompt)
                                    + ((hires.prompt, hires.negative_prompt) if hires else ())),
        strength=1.0 if image is None else image.strength,
        fill=1 if image is None or image.mask is None else image.fill,
        hires=hires,
        controlnet=_units(body, spec, registry, settings),
        refiner=_refiner(body, spec, registry, settings),
    )


def _refiner(body: ImageRequest, spec: Any, registry: Registry, settings: Settings) -> Refiner | None:
    """The request's refiner checked (a served SDXL model, an SDXL job, a switch in 0..1, room
    for two models a device) and resolved. None where it would change nothing, as in A1111: a
    switch at 1 (the refiner never takes over) or the job's own model."""
    asked = body.refiner
    if asked is None:
        return None
    at, name = asked.field, asked.model
    xl_models = [n for n, s in registry.models.items() if s.family == "sdxl"]
    refiner = registry.models.get(name)
    if refiner is None:
        raise NotServed(at, name, xl_models)
    if refiner.family != "sdxl":
        raise InvalidParameter(at, name, f"a refiner must be an SDXL model and '{name}' is "
                               f"{family_label(refiner.family)} (the SDXL models served: "
                               f"{', '.join(sorted(xl_models)) or 'none'})")
    if spec.family != "sdxl":
        raise InvalidParameter(at, name, f"the refiner continues SDXL latents and model '{spec.name}' "
                               f"is {family_label(spec.family)}; use an SDXL model with a refiner")
    if refiner.in_channels != 4:
        raise InvalidParameter(at, name, f"'{name}' is an inpainting checkpoint ({refiner.in_channels}-"
                               "channel UNet); a refiner must be a text-to-image SDXL model")
    check_range(asked.switch_field, asked.switch_at, 0.0, 1.0, note=" (the fraction of the steps after "
                "which the refiner takes over; 1: never)")
    if asked.switch_at >= 1 or name == spec.name:
        return None
    if body.image is not None and body.image.mask is not None:
        raise InvalidParameter(at, name, "inpainting with a refiner is not served yet; leave the "
                               "refiner out or send the picture without a mask")
    if settings.max_models_per_device < 2:
        raise InvalidParameter(at, name, "a refiner needs two models loaded at once on a device and "
                               f"this server holds {settings.max_models_per_device} (setting "
                               "CRAFTSERVE_MAX_MODELS_PER_DEVICE)")
    return Refiner(model=refiner.name, switch_at=float(asked.switch_at))


MAX_CONTROL_WEIGHT = 2.0


def _units(body: ImageRequest, spec: Any, registry: Registry, settings: Settings) -> tuple[ControlUnit, ...]:
    """The request's ControlNet units checked (count, names, the model's fit, ranges, an image
    to use, the size it is preprocessed at) and resolved; their images are prepared by
    `prepare_controls`."""
    from app.engine.preprocessors import check_preprocessor

    units = body.controlnet
    if not units:
        return ()
    gen_size = (round_up8(body.width), round_up8(body.height))  # what prepare_controls fits to
    limit = settings.controlnet_max_units
    if len(units) > limit:
        raise InvalidParameter(units[limit].where, f"<{len(units)} units>", f"at most {limit} ControlNet "
                               "units a request (setting CRAFTSERVE_CONTROLNET_MAX_UNITS)")
    served = getattr(registry, "controlnets", {}) or {}
    resolved = []
    for unit in units:
        at = unit.where
        module = check_preprocessor(f"{at}.module", unit.module, getattr(registry, "annotators", None))
        net = find_controlnet(unit.model, served)
        if net is None:
            raise NotServed(f"{at}.model", unit.model, [n.title for n in served.values()])
        reason = net.fits.get(spec.name)
        if reason:
            raise InvalidParameter(f"{at}.model", unit.model, f"this ControlNet does not fit model "
                                   f"'{spec.name}' ({spec.family}): {reason}")
        check_range(f"{at}.weight", unit.weight, 0.0, MAX_CONTROL_WEIGHT)
        check_range(f"{at}.guidance_start", unit.guidance_start, 0.0, 1.0)
        check_range(f"{at}.guidance_end", unit.guidance_end, 0.0, 1.0)
        if unit.guidance_start > unit.guidance_end:
            raise InvalidParameter(f"{at}.guidance_start", unit.guidance_start, "guidance_start must "
                                   f"not be after guidance_end ({unit.guidance_end:g})")
        check_range(f"{at}.control_mode", unit.control_mode, 0, 2, note=" (0 Balanced, 1 My prompt is "
                    "more important, 2 ControlNet is more important)")
        check_range(f"{at}.resize_mode", unit.resize_mode, 0, 2, note=" (0 Just Resize, 1 Crop and "
                    "Resize, 2 Resize and Fill)")
        if unit.image is None and body.image is None:
            raise InvalidParameter(f"{at}.image", None, "a ControlNet unit needs an image (base64); "
                                   "only img2img may leave it out to use its init picture")
        for picture in (unit.image,) if unit.image is not None else body.image.images:
            check_working_size(f"{at}.pixel_perfect" if unit.pixel_perfect else f"{at}.processor_res",
                               module, picture.size, _resolution(unit, picture.size, gen_size), settings)
        if unit.hr_option not in HR_OPTIONS:
            raise InvalidParameter(f"{at}.hr_option", unit.hr_option, f"one of {', '.join(HR_OPTIONS)}")
        # Without the hires fix every unit guides the one pass (the extension's "Both"), so the
        # option sent splits no batch; with it, a unit's map is fitted to each pass it guides.
        hr_option = unit.hr_option if body.hires is not None else BOTH
        mode = int(unit.control_mode)
        resolved.append(ControlUnit(name=net.name, weights=str(net.weights), weight=float(unit.weight),
                                    start=float(unit.guidance_start), end=float(unit.guidance_end),
                                    mode=mode, hr_option=hr_option,
                                    hires_mode=hires_mode(module.name, mode)
                                    if body.hires is not None else None,
                                    title=net.title, module=module.name,
                                    resize_mode=int(unit.resize_mode), processor_res=unit.processor_res,
                                    threshold_a=unit.threshold_a, threshold_b=unit.threshold_b,
                                    pixel_perfect=unit.pixel_perfect))
    return tuple(resolved)


def check_working_size(field: str, module: Any, size: tuple[int, int], resolution: float,
                       settings: Settings) -> None:
    """Refuse a preprocessing whose working picture (the control picture of `size` with its
    short side scaled to the module's resolution) would be past CRAFTSERVE_MAX_IMAGE_PIXELS,
    from the sizes alone, before anything is allocated. `field` names the resolution's field."""
    from app.engine.preprocessors import working_resolution, working_size

    width, height = working_size(module, size, resolution)
    limit = settings.max_image_pixels
    if width * height <= limit:
        return
    working = working_resolution(module, resolution)
    raise InvalidParameter(field, working, f"preprocessing the {size[0]}x{size[1]} control picture with "
                           f"'{module.name}' at resolution {working} (its short side scaled to {working}) "
                           f"would make a {width}x{height} picture; at most {limit} pixels (setting "
                           "CRAFTSERVE_MAX_IMAGE_PIXELS): send a lower resolution or a less elongated "
                           "picture")


def _resolution(unit: UnitRequest, size: tuple[int, int], gen_size: tuple[int, int]) -> float:
    """The preprocessing resolution asked of a unit for a picture of `size`: its processor_res,
    or with pixel_perfect the extension's resolution from the generated size."""
    from app.engine.preprocessors import pixel_perfect_resolution

    if unit.pixel_perfect:
        return pixel_perfect_resolution(size, *gen_size, unit.resize_mode)
    return unit.processor_res


def _control_maps(unit: UnitRequest, picture: Any, width: int, height: int,
                  annotators: Any, hires: tuple[int, int] | None = None) -> tuple[Any, Any]:
    """(map fitted to width x height, map fitted to the `hires` pass's size or None) of one
    unit for one job. As the extension, the picture is detected once (pixel perfect reads the
    first pass's size) and the detected map is fitted to each pass. `annotators`: the
    registry's annotator files (app.annotator_files), for the modules that need weights."""
    from app.engine.preprocessors import detect, find_preprocessor, fit

    module = find_preprocessor(unit.module)
    assert module is not None
    image = unit.image if unit.image is not None else picture
    resolution = _resolution(unit, image.size, (width, height))
    detected = detect(module, image, resolution, unit.threshold_a, unit.threshold_b, files=annotators,
                      field=f"{unit.where}.module")
    hires_map = None if hires is None else fit(detected, *hires, unit.resize_mode)
    return fit(detected, width, height, unit.resize_mode), hires_map


async def prepare_controls(body: ImageRequest, params: GenParams, registry: Registry | None = None,
                           ) -> tuple[list[ControlImages | None], list[Any]]:
    """Each job's control images (one per unit, the unit's image or else the job's init
    picture, preprocessed and fitted to the generated size, and to the hires fix's second
    pass for the units that guide it), off the event loop; and the maps of the first job to
    answer, as the extension appends them: for each unit with save_detected_map, its map
    fitted to the second pass when the hires fix is on (whichever passes the unit guides),
    then its map fitted to the generated size. The registry's annotator files serve the
    preprocessors that need weights."""
    if not params.controlnet:
        return [None], []
    width, height = params.gen_size
    hires = params.hires
    second = None if hires is None else (round_up8(hires.size[0]), round_up8(hires.size[1]))
    pictures = body.image.images if body.image is not None else (None,)
    annotators = getattr(registry, "annotators", None)

    def prepare(picture: Any) -> tuple[ControlImages, list[Any]]:
        maps = [_control_maps(unit, picture, width, height, annotators, second)
                for unit in body.controlnet]
        shown_maps = [shown for (low, high), unit in zip(maps, body.controlnet, strict=True)
                      if unit.save_detected_map for shown in (high, low) if shown is not None]
        hires_maps = [high if resolved.high_res else None
                      for (_, high), resolved in zip(maps, params.controlnet, strict=True)]
        return ControlImages([low for low, _ in maps], hires_maps if hires is not None else ()), shown_maps

    prepared = [await off_loop_preprocessing(prepare, picture) for picture in pictures]
    return [images for images, _ in prepared], prepared[0][1]


def served_upscalers(registry: Registry) -> list[str]:
    """Every upscaler name a request may use: A1111's latent modes, the built-in pixel ones,
    then the model upscalers of models.yaml's upscaler_dirs."""
    return [*LATENT_MODES, *PIXEL_BUILTINS, *sorted(getattr(registry, "upscalers", {}) or {})]


def check_upscaler(field: str, name: str, registry: Registry, *, latent: bool = True) -> str:
    served = served_upscalers(registry)
    if not latent:
        served = [n for n in served if n not in LATENT_MODES]
    if name not in served:
        raise NotServed(field, name, served)
    return name


def hires_size(width: int, height: int, hires: HiresRequest) -> tuple[tuple[int, int], tuple[int, int]]:
    """(answer size, upscale size) of A1111's hires fix: the scale, or hr_resize_x/y (one of them
    keeps the aspect ratio; both: upscaled to cover, then centre-cropped)."""
    x, y = hires.resize_x, hires.resize_y
    if x == 0 and y == 0:
        size = (int(width * hires.scale), int(height * hires.scale))
        return size, size
    if y == 0:
        size = (x, x * height // width)
        return size, size
    if x == 0:
        size = (y * width // height, y)
        return size, size
    if width / height < x / y:
        return (x, y), (x, x * height // width)
    return (x, y), (y * width // height, y)


def _hires(body: ImageRequest, sampler: Any, registry: Registry, settings: Settings) -> Hires:
    asked = body.hires
    assert asked is not None
    if body.image is not None:
        raise InvalidParameter("enable_hr", True, "the hires fix is for text to image; send the "
                               "picture to img2img at the size you want instead")
    check_range("hr_scale", asked.scale, 1.0, 8.0)
    limit = settings.a1111_max_size
    for name, side in (("hr_resize_x", asked.resize_x), ("hr_resize_y", asked.resize_y)):
        check_range(name, side, 0, limit, setting="A1111_MAX_SIZE", note=" (0: by hr_scale)")
    size, upscale_size = hires_size(body.width, body.height, asked)
    if max(*size, *upscale_size) > limit or min(size) < 8:
        raise InvalidParameter("hr_scale", asked.scale, f"the hires fix would answer {size[0]}x{size[1]} "
                               f"(upscaled to {upscale_size[0]}x{upscale_size[1]}); each side must be at "
                               f"most {limit} (setting CRAFTSERVE_A1111_MAX_SIZE)")
    steps = asked.steps or body.steps
    check_steps("hr_second_pass_steps", steps, settings)
    check_range("denoising_strength", asked.strength, 0.0, 1.0)
    hr_sampler = sampler if asked.sampler is None and asked.scheduler is None else resolve_sampler(
        asked.sampler or sampler.sampler, asked.scheduler)
    for name, text in (("hr_prompt", asked.prompt), ("hr_negative_prompt", asked.negative_prompt)):
        check_prompt_length(name, text, settings)
        check_prompt_syntax(name, text)
        check_prompt_chunks(name, text, settings)
    upscaler = check_upscaler("hr_upscaler", asked.upscaler or "Latent", registry)
    return Hires(
        size=size, upscale_size=upscale_size, upscaler=upscaler, steps=steps, strength=asked.strength,
        sampler=hr_sampler, cfg_scale=float(body.cfg_scale if asked.cfg_scale is None else asked.cfg_scale),
        prompt=asked.prompt or body.prompt, negative_prompt=asked.negative_prompt or body.negative_prompt,
    )


async def prepare_sources(body: ImageRequest, params: GenParams) -> list[Source | None]:
    """Each init picture of the request prepared for the worker (resize mode, mask, fill,
    "only masked": app.engine.image_ops), off the event loop; [None] for text to image."""
    image = body.image
    if image is None:
        return [None]
    width, height = params.gen_size

    def prepare(picture: Any) -> Source:
        return prepare_source(picture, width, height, mask=image.mask, resize_mode=image.resize_mode,
                              mask_blur=image.mask_blur, fill_mode=image.fill, full_res=image.full_res,
                              padding=image.padding, invert=image.invert)

    return [await off_loop(prepare, picture) for picture in image.images]


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_jobs(engine: EngineAPI, jobs: list[Job], request: Request) -> list[JobResult]:
    """Await the jobs of one request. If the client leaves or a job fails (the queue answers
    a job that outlives its deadline), the request fails and its other jobs are taken back."""
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        while not all(job.future.done() for job in jobs):
            waiting = {job.future for job in jobs if not job.future.done()}
            done, _ = await asyncio.wait(waiting | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise Unavailable("the client disconnected", kind=ErrorKind.DISCONNECTED)
            for future in done:
                future.result()  # raises the job's error
        return [job.future.result() for job in jobs]
    except BaseException:
        for job in jobs:
            if not job.future.done():
                engine.cancel(job)
        raise
    finally:
        watcher.cancel()


async def _encode(params: GenParams, result: JobResult, output_format: str, quality: int,
                  job_id: str) -> bytes:
    """The image encoded off the event loop. An encoder failure is a bug: logged with its
    traceback under the job id and answered 500 naming the job, like a failed generation."""
    text = parameters_text(params, result.seed, result.sampler_label)
    try:
        return await asyncio.to_thread(encode_image, result.image, output_format, text, quality)
    except Exception:
        logger.exception("job %s: encoding the image as %s failed", job_id, output_format)
        raise InternalError(
            f"internal error while encoding the image (job {job_id}); the server log has the "
            "details and the server goes on serving"
        ) from None


def check_queue_share(engine: EngineAPI, client: str, count: int, share: int) -> None:
    """429 (`KeyQueueFull`, Retry-After) when `count` more jobs would take `client` past its
    share of the queue, so one key cannot fill the queue that every key shares (MAX_QUEUE).

    A key's waiting jobs count, each image of a request one job; its running jobs do not (they
    hold a worker, not room in the queue, and the fair queue gives workers to keys in turn).
    A request is never split: one bigger than the whole share goes in when the key has nothing
    waiting, so a key can always be served, at most one request past its share. Checked on
    the event loop right before the jobs are submitted (nothing awaits in between), through
    EngineAPI.waiting, so it holds for this machine's Engine and the Ray ingress alike."""
    waiting = engine.waiting(client)
    if not waiting or len(waiting) + count <= share:
        return
    place = engine.queue_position(waiting[0]) or 1
    raise KeyQueueFull(
        f"this caller already has {len(waiting)} jobs waiting and its share of the queue is {share} "
        f"jobs (setting CRAFTSERVE_MAX_QUEUE_PER_KEY, or queue=N on the key's line of the keys "
        f"file); this request would add {count}. Retry once some of them have started; other keys' "
        "jobs are not in the way",
        retry_after=min(MAX_SHARE_RETRY_S, place * RETRY_S_PER_PLACE),
    )


async def submit_job(body: ImageRequest, *, client: str, share: int, engine: EngineAPI,
                     registry: Registry, settings: Settings) -> Job:
    """One job for `body`, queued (the key's share, fairness, bound, deadline) without awaiting
    it: the job API (POST /jobs) follows it by its future and its `step`."""
    params = to_params(body, registry, settings)
    source = (await prepare_sources(body, params))[0]
    controls = (await prepare_controls(body, params, registry))[0][0]
    check_queue_share(engine, client, 1, share)
    return engine.submit(replace(params, source=source, control_images=controls), client)


async def encode_result(params: GenParams, result: JobResult, job_id: str,
                        output_format: str = "png", quality: int = 100) -> bytes:
    """A finished job's image, encoded off the event loop with its `parameters` text."""
    return await _encode(params, result, output_format, quality, job_id)


async def generate_images(
    body: ImageRequest,
    count: int,
    request: Request,
    *,
    client: str,
    share: int,
    engine: EngineAPI,
    registry: Registry,
    settings: Settings,
    output_format: str = "png",
    quality: int = 100,
    detected: list[Any] | None = None,
) -> list[Generated]:
    """`count` images of one request for the authenticated `client` (a key label), seeds
    seed, seed+1, ... (A1111's convention); they are compatible jobs, so the engine batches
    them. `share`: the jobs the client may have waiting (`check_queue_share`). Any failure
    fails the request and takes back its other jobs. Images are encoded as `output_format`
    (png, jpeg, webp; `quality` for the lossy ones), off the event loop. `detected`: a list
    the ControlNet units' detected maps are appended to (those to answer)."""
    first = to_params(body, registry, settings)
    sources = await prepare_sources(body, first)
    controls, maps = await prepare_controls(body, first, registry)
    if detected is not None:
        detected.extend(maps)
    all_params = [replace(first, seed=(first.seed + i) % (MAX_SEED + 1), source=sources[i % len(sources)],
                          control_images=controls[i % len(controls)])
                  for i in range(count)]
    check_queue_share(engine, client, count, share)
    jobs: list[Job] = []
    try:
        for params in all_params:
            jobs.append(engine.submit(params, client))
    except BaseException:  # e.g. the queue filled up half-way: take back what went in
        for job in jobs:
            engine.cancel(job)
        raise
    results = await run_jobs(engine, jobs, request)
    encoded = await asyncio.gather(*(_encode(p, r, output_format, quality, job.id)
                                     for p, r, job in zip(all_params, results, jobs, strict=True)))
    return [Generated(data, params, result, job.id)
            for data, params, result, job in zip(encoded, all_params, results, jobs, strict=True)]


@dataclass(frozen=True)
class Upscaled:
    """One upscaled picture: its PNG bytes and facts."""

    data: bytes
    size: tuple[int, int]
    info: str  # A1111's extras info ("Postprocess upscale by: 2, Postprocess upscaler: ...")
    result: JobResult
    job_id: str


def extras_size(image_size: tuple[int, int], *, scale: float | None = None,
                to: tuple[int, int] | None = None, crop: bool = True,
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upscaled size, answer size) of A1111's extras: by `scale`, or to `to` = (w, h) by the
    larger of the two ratios, centre-cropped to exactly `to` when `crop`."""
    width, height = image_size
    if to is None:
        assert scale is not None
        size = (int(width * scale), int(height * scale))
        return size, size
    by = max(to[0] / width, to[1] / height)
    size = (int(width * by), int(height * by))
    return size, (to if crop else size)


async def upscale_image(image: Any, request: Request, *, upscaler: str, size: tuple[int, int],
                        out_size: tuple[int, int], client: str, share: int, engine: EngineAPI,
                        registry: Registry, settings: Settings, upscaler_2: str | None = None,
                        visibility: float = 0.0, field: str = "upscaler_1") -> Upscaled:
    """`image` upscaled on a worker (queued as every job is: fair turns, the key's share, the
    deadline), as a PNG carrying A1111's extras info."""
    check_upscaler(field, upscaler, registry, latent=False)
    if upscaler_2 is not None:
        check_upscaler("upscaler_2", upscaler_2, registry, latent=False)
    limit = settings.max_image_pixels
    for what, (w, h) in (("the upscaled picture", size), ("the answer", out_size)):
        if w < 1 or h < 1 or w * h > limit:
            raise InvalidParameter(field, upscaler, f"{what} would be {w}x{h}; at most {limit} pixels "
                                   "(setting CRAFTSERVE_MAX_IMAGE_PIXELS)")
    params = UpscaleParams(image=image, upscaler=upscaler, size=size, out_size=out_size,
                           upscaler_2=upscaler_2, visibility=visibility)
    check_queue_share(engine, client, 1, share)
    job = engine.submit(params, client)  # type: ignore[arg-type]
    result = (await run_jobs(engine, [job], request))[0]
    scale = size[0] / image.width
    info = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {upscaler}"
    if upscaler_2 is not None and visibility > 0:
        info += f", Postprocess upscaler 2: {upscaler_2}"
    try:
        data = await asyncio.to_thread(encode_png, result.image, info)
    except Exception:
        logger.exception("job %s: encoding the upscaled image failed", job.id)
        raise InternalError(f"internal error while encoding the image (job {job.id}); the server "
                            "log has the details and the server goes on serving") from None
    return Upscaled(data=data, size=result.image.size, info=info, result=result, job_id=job.id)
