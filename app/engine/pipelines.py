"""Loading diffusers pipelines for a model spec: builtin tiny, local folder, Hub repo or a
single-file checkpoint (app.engine.single_file).

Everything here runs on the worker thread that owns the target device.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine.determinism import make_batch_invariant
from app.engine.hub import HubAccess, WaitingForWeights, WeightsMissing, download_commands, hub_repos
from app.engine.img2img import base_pipeline
from app.engine.loras import LoraManager
from app.engine.optimize import load_compile_cache, optimize_pipeline, save_compile_cache, warm_up
from app.engine.prompts import PromptEncoder
from app.errors import ErrorKind, Unavailable
from app.families import PIPELINE_FAMILIES, REFINER_PIPELINE, SERVED_PIPELINES, Family
from app.registry import ModelSpec

logger = logging.getLogger(__name__)

# The size each family was trained at, where a GPU warm-up pays for the shapes used most.
DEFAULT_SIZES: dict[str, tuple[int, int]] = {"sdxl": (1024, 1024), "sd15": (512, 512)}


@dataclass
class LoadedModel:
    spec: ModelSpec
    pipe: Any  # a diffusers text-to-image pipeline (inpainting, for a 9-channel UNet)
    family: Family
    scheduler_config: dict  # pristine copy; every job builds its own scheduler from it
    loras: LoraManager
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    prompts: PromptEncoder | None = None  # A1111 prompt encoding, when the pipeline's own won't do
    # The image-to-image and inpainting pipelines made from `pipe`'s components on first use
    # (app.engine.img2img.pipeline_for), by task.
    variants: dict[str, Any] = field(default_factory=dict)
    # SDXL's refiner layout (`pipe` is its image-to-image pipeline, no first text encoder):
    # served as a job's refiner only, never as its model
    refiner_only: bool = False
    # a refiner-only model's components that are another loaded model's (app.engine.sharing):
    # component name -> the model it took them from
    shared: dict[str, str] = field(default_factory=dict)


def choose_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """fp32 on the CPU; on CUDA the spec's dtype, or for `auto` bf16 on Hopper-class GPUs
    and newer (as fast as fp16 there, and SDXL's VAE needs no fp32 upcast in bf16) and fp16
    on older ones (bf16 is slower or emulated before Ampere; fp16 is the common ground)."""
    if device.type != "cuda":
        return torch.float32  # half precision on the CPU is slow and lossy
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 9 else torch.float16


def _vae_is_file(spec: ModelSpec) -> bool:
    return bool(spec.vae) and Path(spec.vae).suffix.lower() == ".safetensors"


def _unavailable(spec: ModelSpec, repo: str, exc: BaseException) -> Unavailable:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    repos = hub_repos(spec)
    commands = download_commands(repos)
    if isinstance(exc, WeightsMissing):
        return WaitingForWeights(
            f"model '{spec.name}' cannot be served now: the weights of {repo} are not in the "
            f"Hugging Face cache and {exc.reason}. Download them where there is network "
            f"({commands}) and copy that Hugging Face cache here, or point models.yaml at local "
            "diffusers folders", retry_after=60, kind=ErrorKind.MODEL_UNAVAILABLE)
    if repo in repos:
        fix = (
            f"the weights of {repo} are not in the Hugging Face cache and could not be fetched "
            f"({reason}). Download them where there is network ({commands}), or point "
            "models.yaml at local diffusers folders"
        )
    else:
        fix = f"loading {repo} failed ({reason}); check the folder and the server log"
    return Unavailable(f"model '{spec.name}' cannot be served now: {fix}", retry_after=60,
                       kind=ErrorKind.MODEL_UNAVAILABLE)


def _from_pretrained(cls: Any, source: str, allow_downloads: bool, *, hub: HubAccess | None = None,
                     needed_by: str | None = None, **kwargs: Any) -> Any:
    """Load from the local cache first; reach the Hub only if that fails and it is allowed.

    `hub` (the engine's): asked before the Hub is, so an unreachable Hub costs one short
    request per engine rather than huggingface_hub's retries for every file of every model;
    while it cannot be asked, WeightsMissing (naming why) follows the cache's miss.
    In half precision the repo's fp16 `variant` files are asked for first (half the bytes to
    read or download; SDXL base ships them), then the plain files."""
    half = kwargs.get("torch_dtype") in (torch.float16, torch.bfloat16)
    variants = ["fp16", None] if half else [None]

    def attempt(local: bool, variant: str | None) -> Any:
        extra = {"variant": variant} if variant else {}
        return cls.from_pretrained(source, local_files_only=local, **extra, **kwargs)

    missed: Exception | None = None
    for variant in variants:
        try:
            return attempt(True, variant)
        except Exception as exc:  # noqa: BLE001 - not there (the error type varies by library)
            missed = exc
    assert missed is not None
    is_repo = not Path(source).expanduser().exists()  # a local folder has nothing to fetch
    reason = hub.why_not(needed_by) if hub is not None and is_repo else None
    if reason is not None:
        raise WeightsMissing(reason) from missed
    if not allow_downloads:
        raise missed
    for number, variant in enumerate(variants, 1):
        try:
            return attempt(False, variant)
        except Exception:  # noqa: BLE001
            if number == len(variants):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _load_vae(spec: ModelSpec, dtype: torch.dtype, allow_downloads: bool, hub: HubAccess | None) -> Any:
    """The entry's replacement VAE: a single file (with the model family's config and scaling
    factor), a folder or a Hub repo."""
    from diffusers import AutoencoderKL

    from app.checkpoints import bundled_config, config_folder

    assert spec.vae
    try:
        if _vae_is_file(spec):
            from app.engine.single_file import load_vae_file

            folder = config_folder(spec) or bundled_config(spec.family)
            return load_vae_file(spec.vae, folder, dtype)
        return _from_pretrained(AutoencoderKL, spec.vae, allow_downloads, hub=hub, needed_by=spec.name,
                                torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes a clear 503
        raise _unavailable(spec, spec.vae, exc) from exc


def _load_single_file(spec: ModelSpec, dtype: torch.dtype, allow_downloads: bool,
                      hub: HubAccess | None) -> Any:
    from app.checkpoints import CheckpointError
    from app.engine.single_file import SingleFileError, load_single_file

    try:
        pipe = load_single_file(spec, dtype)
    except (CheckpointError, SingleFileError) as exc:
        raise Unavailable(
            f"model '{spec.name}' cannot be served now: {Path(spec.source).name}: {exc.reason}",
            retry_after=60, kind=ErrorKind.MODEL_UNAVAILABLE,
        ) from exc
    if spec.vae:
        pipe.vae = _load_vae(spec, dtype, allow_downloads, hub)
        pipe.register_modules(vae=pipe.vae)
    return pipe


def _load_diffusers(spec: ModelSpec, dtype: torch.dtype, allow_downloads: bool,
                    hub: HubAccess | None) -> Any:
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if spec.family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if spec.vae:
        kwargs["vae"] = _load_vae(spec, dtype, allow_downloads, hub)
    try:
        return _from_pretrained(DiffusionPipeline, spec.source, allow_downloads, hub=hub,
                                needed_by=spec.name, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _unavailable(spec, spec.source, exc) from exc


def _build(spec: ModelSpec, dtype: torch.dtype, device: torch.device, allow_downloads: bool,
           hub: HubAccess | None) -> Any:
    if spec.source == "builtin:random-sdxl":
        from app.engine.random_sdxl import build_random_sdxl

        return build_random_sdxl(dtype=dtype, device=device)
    if spec.kind == "single_file":
        return _load_single_file(spec, dtype, allow_downloads, hub)
    if spec.kind == "builtin":
        from app.engine import tiny

        if spec.source == "builtin:sleep-sdxl":
            return tiny.build_sleep_sdxl()
        return tiny.build_tiny_sdxl() if spec.source.endswith("sdxl") else tiny.build_tiny_sd15()
    return _load_diffusers(spec, dtype, allow_downloads, hub)


def is_refiner_pipe(pipe: Any) -> bool:
    """SDXL's refiner layout: the image-to-image pipeline without a first text encoder."""
    return type(pipe).__name__ == REFINER_PIPELINE and getattr(pipe, "text_encoder", None) is None


def _family_of(spec: ModelSpec, pipe: Any) -> Family:
    name = type(pipe).__name__
    if name in SERVED_PIPELINES or is_refiner_pipe(pipe):
        return PIPELINE_FAMILIES[name]
    raise Unavailable(
        f"model '{spec.name}' cannot be served: {spec.source} is a {name}, and craftserve "
        "serves text-to-image StableDiffusionXLPipeline and StableDiffusionPipeline models (and "
        "SDXL's refiner layout, a StableDiffusionXLImg2ImgPipeline without text_encoder, as a refiner)",
        retry_after=3600,
    )


def _quiet_libraries() -> None:
    """Progress bars and advice meant for notebooks do not belong in a server log."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    # A LoRA load makes transformers log a table listing every *other* cached adapter's keys
    # as MISSING, and diffusers notes about encoders without LoRA keys: misleading in a
    # server log. The LoRA manager checks the fit of every load itself (app.engine.loras).
    for name in ("transformers.integrations.peft", "diffusers.loaders.peft",
                 "diffusers.loaders.lora_base", "diffusers.utils.peft_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
    warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
    # diffusers still passes huggingface_hub an argument it ignores, and is told so on every
    # lookup of a Hub repo (nothing the server's operator can act on)
    warnings.filterwarnings("ignore", message=".*`local_dir_use_symlinks` argument is deprecated.*")
    # DPM++ SDE's Brownian tree (torchsde) starts at the first sigma in one precision and is
    # asked for it in the other (float32 / float64: one rounding apart), and warns "Should have
    # ta>=t0" on every such job; torchsde clamps to its interval, the answer is the same.
    warnings.filterwarnings("ignore", message="Should have ta>=t0", module="torchsde")
    warnings.filterwarnings("ignore", message="Should have tb<=t1", module="torchsde")
    # diffusers' image-to-image pipelines move a force_upcast VAE to fp32 and back around every
    # encode, and each move warns about modules "kept in float32" (none: the list is empty)
    modeling = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropMessage) for f in modeling.filters):
        modeling.addFilter(_DropMessage("should be kept in float32"))


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def load_model(
    spec: ModelSpec,
    device: torch.device,
    *,
    allow_downloads: bool,
    hub: HubAccess | None = None,
    lora_cache_size: int,
    compile: bool = False,
    exact_batches: bool = True,
    warm_batch_sizes: Iterable[int] = (1,),
    compile_cache: Path | None = None,
) -> LoadedModel:
    """Build or load the pipeline for `spec` on `device`. Raises Unavailable on failure.

    Before it returns (so before /ready says 200) every batch size in `warm_batch_sizes` (the
    engine passes the setting WARM_BATCHES, by default 1..MAX_BATCH) runs once: on CUDA at the
    family's default size, which pays for cuDNN autotuning and compilation of the shapes
    requests use most; on the CPU at a tiny size, since CPU kernels need no per-shape tuning
    and only the first-call costs (lazy imports, allocator and thread-pool start-up) are worth
    paying early. With `compile` on CUDA, `compile_cache` (a file) is loaded before the
    warm-up and written after it (app.engine.optimize.load_compile_cache).

    A load that fails keeps nothing on the device: the pipeline's last references (the frames
    of the failed calls, held by the exception's traceback) are dropped and the memory freed
    before the exception leaves, so the error can be kept and a retry does not find a second
    copy of the weights in the way."""
    _quiet_libraries()
    started = time.perf_counter()
    dtype = choose_dtype(spec, device)
    pipe = None
    try:
        pipe = _build(spec, dtype, device, allow_downloads, hub)
        family = _family_of(spec, pipe)
        refiner_only = is_refiner_pipe(pipe)
        if not refiner_only:  # the refiner serves from its own image-to-image pipeline
            pipe = base_pipeline(pipe, family)
        pipe.to(device)
        if spec.kind == "builtin" and dtype != pipe.unet.dtype:  # from_pretrained already chose
            pipe.to(dtype=dtype)  # the dtype (keeping fp32-only modules in fp32)
        pipe.set_progress_bar_config(disable=True)
        # CUDA only (no-ops on the CPU): half-precision-friendly VAE, fused QKV, channels-last,
        # optional torch.compile; the warm-up compiles/autotunes before the model counts as loaded.
        optimize_pipeline(pipe, device, compile=compile)
        compiled = compile and device.type == "cuda"
        if compiled and compile_cache is not None:
            load_compile_cache(compile_cache)
        if device.type == "cpu" and exact_batches and not getattr(pipe, "fixed_time_steps", None):
            make_batch_invariant(pipe)  # (not for builtin:sleep-sdxl, whose UNet only sleeps)
        default_size = DEFAULT_SIZES[family] if device.type == "cuda" else (64, 64)
        warm_up(pipe, device, sizes=[default_size], batch_sizes=sorted(set(warm_batch_sizes)),
                force=True, from_picture=refiner_only)
        if compiled and compile_cache is not None:
            save_compile_cache(compile_cache)
    except BaseException as exc:
        _release(exc)
        pipe = None
        _free(device)
        raise
    seconds = time.perf_counter() - started
    logger.info("model %s loaded on %s (%s) in %.1f s", spec.name, device, dtype, seconds)
    return LoadedModel(
        spec=spec,
        pipe=pipe,
        family=family,
        scheduler_config=dict(pipe.scheduler.config),
        loras=LoraManager(pipe, family, capacity=lora_cache_size, model_name=spec.name),  # type: ignore[arg-type]
        device=device,
        dtype=dtype,
        load_seconds=seconds,
        prompts=PromptEncoder(pipe, family),
        refiner_only=refiner_only,
    )


def _release(exc: BaseException) -> None:
    """Drop the local variables of every finished frame in `exc`'s tracebacks (and those of
    its causes and contexts): the pipeline and its modules are locals there (`self` of each
    forward). File names and line numbers stay, so the traceback still prints in full."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
