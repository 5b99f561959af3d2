"""Loading diffusers pipelines for a model spec: builtin tiny, local folder or Hub repo.

Everything here runs on the worker thread that owns the target device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.loras import LoraManager
from app.errors import Unavailable
from app.registry import ModelSpec

logger = logging.getLogger(__name__)

_SDXL_CLASSES = {"StableDiffusionXLPipeline"}
_SD15_CLASSES = {"StableDiffusionPipeline"}


@dataclass
class LoadedModel:
    spec: ModelSpec
    pipe: Any  # a diffusers text-to-image pipeline
    family: str
    scheduler_config: dict  # pristine copy; every job builds its own scheduler from it
    loras: LoraManager
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def choose_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32  # half precision on the CPU is slow and lossy
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.float16


def _unavailable(spec: ModelSpec, repo: str, exc: BaseException) -> Unavailable:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if spec.kind == "hub" or repo != spec.source:
        fix = (
            f"the weights of {repo} are not in the Hugging Face cache and could not be fetched "
            f"({reason}). Download them where there is network (`huggingface-cli download "
            f"{repo}`), or point models.yaml at a local diffusers folder"
        )
    else:
        fix = f"loading {repo} failed ({reason}); check the folder and the server log"
    return Unavailable(f"model '{spec.name}' cannot be served now: {fix}", retry_after=60,
                       kind="model_unavailable")


def _from_pretrained(cls: Any, source: str, allow_downloads: bool, **kwargs: Any) -> Any:
    """Load from the local cache first; reach the Hub only if that fails and it is allowed."""
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached (the error type varies by library)
        if not allow_downloads:
            raise
    return cls.from_pretrained(source, **kwargs)


def _load_diffusers(spec: ModelSpec, dtype: torch.dtype, allow_downloads: bool) -> Any:
    from diffusers import AutoencoderKL, DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if spec.family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if spec.vae:
        try:
            kwargs["vae"] = _from_pretrained(AutoencoderKL, spec.vae, allow_downloads, torch_dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - every load failure becomes a clear 503
            raise _unavailable(spec, spec.vae, exc) from exc
    try:
        return _from_pretrained(DiffusionPipeline, spec.source, allow_downloads, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _unavailable(spec, spec.source, exc) from exc


def _build(spec: ModelSpec, dtype: torch.dtype, allow_downloads: bool) -> Any:
    if spec.source == "builtin:random-sdxl":
        from app.engine.random_sdxl import build_random_sdxl

        return build_random_sdxl(dtype=dtype)
    if spec.kind == "builtin":
        from app.engine import tiny

        return tiny.build_tiny_sdxl() if spec.source.endswith("sdxl") else tiny.build_tiny_sd15()
    return _load_diffusers(spec, dtype, allow_downloads)


def _family_of(spec: ModelSpec, pipe: Any) -> str:
    name = type(pipe).__name__
    if name in _SDXL_CLASSES:
        return "sdxl"
    if name in _SD15_CLASSES:
        return "sd15"
    raise Unavailable(
        f"model '{spec.name}' cannot be served: {spec.source} is a {name}, and craftserve "
        "serves text-to-image StableDiffusionXLPipeline and StableDiffusionPipeline models",
        retry_after=3600,
    )


def load_model(
    spec: ModelSpec,
    device: torch.device,
    *,
    allow_downloads: bool,
    lora_cache_size: int,
) -> LoadedModel:
    """Build or load the pipeline for `spec` on `device`. Raises Unavailable on failure."""
    started = time.perf_counter()
    dtype = choose_dtype(spec, device)
    pipe = _build(spec, dtype, allow_downloads)
    family = _family_of(spec, pipe)
    pipe.to(device)
    if spec.kind == "builtin" and dtype != pipe.unet.dtype:  # from_pretrained already chose
        pipe.to(dtype=dtype)  # the dtype (keeping fp32-only modules in fp32)
    pipe.set_progress_bar_config(disable=True)
    seconds = time.perf_counter() - started
    logger.info("model %s loaded on %s (%s) in %.1f s", spec.name, device, dtype, seconds)
    return LoadedModel(
        spec=spec,
        pipe=pipe,
        family=family,
        scheduler_config=dict(pipe.scheduler.config),
        loras=LoraManager(pipe, family, capacity=lora_cache_size),  # type: ignore[arg-type]
        device=device,
        dtype=dtype,
        load_seconds=seconds,
    )
