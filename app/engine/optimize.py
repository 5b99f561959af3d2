"""The GPU fast path of a loaded pipeline: what diffusers and PyTorch offer, applied once.

`optimize_pipeline(pipe, device, compile=...)` right after a model is loaded on its device,
then `warm_up(pipe, device, ...)` before the model counts as loaded; `eager(pipe)` around a
batch that carries LoRAs (and around the out-of-memory fallback), so a compiled pipeline never
recompiles for a LoRA state or a tiled decode. All run on the worker thread that owns the
device; on the CPU they do nothing (`force=True`: tests).

A compiled pipeline compiles only for new shapes: the compiled UNet is a twin of the pipeline's
UNet sharing its weights, which PEFT never wraps; every timestep reaches it as float32; no
parameter requires grad. A compilation that fails falls back to the eager forward, once, with a
warning. `load_compile_cache` / `save_compile_cache` carry inductor's compiled artifacts across
processes and machines in one file.

What is applied and why, what compilation costs and when: docs/gpu-path.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPILE_MODE = "default"
_MARK = "_craftserve_optimized"  # attribute on the pipeline: the tuple of what was applied
# attribute on a module whose forward is compiled: its original (eager) bound forward
_EAGER_FORWARD = "_craftserve_eager_forward"
# attribute on such a module: its _CompiledForward (which knows whether compiling failed)
_COMPILED_FORWARD = "_craftserve_compiled_forward"
# The fp16 check of a VAE whose config asks for fp32 decoding: one random latent of this
# side (16: a 128x128 image for SDXL), and the headroom below fp16's largest value that
# every activation of the decoder must keep (2: within a factor 2 of overflow is unsafe).
VAE_CHECK_LATENT_SIZE = 16
VAE_CHECK_HEADROOM = 2.0
# torch._dynamo's recompile limit per compiled function is raised to at least this when a
# pipeline is compiled. The function (UNet / decoder forward) is shared by every pipeline of
# that class: one graph per shape, per GPU, per set of LoRA-wrapped layers, and the engine
# warms MAX_BATCH shapes per model. Past the limit new shapes run eagerly (docs/gpu-path.md).
# An engine with many GPUs can raise it before loading: read when compiling.
RECOMPILE_LIMIT = 64


def applied_optimizations(pipe: Any) -> tuple[str, ...]:
    """What `optimize_pipeline` applied to `pipe` (empty: nothing, e.g. on the CPU)."""
    return tuple(getattr(pipe, _MARK, ()))


def optimize_pipeline(
    pipe: Any,
    device: torch.device,
    *,
    compile: bool,
    force: bool = False,
    compile_mode: str = COMPILE_MODE,
    fuse_qkv: bool = True,
    channels_last: bool = True,
    vae_fp16_safe: bool | None = None,
    compile_backend: str = "inductor",
) -> None:
    """Apply the GPU fast path to a pipeline already on `device`. A no-op on the CPU.

    `force=True` applies it on any device (tests: the CPU runs every step except cuDNN).
    `fuse_qkv` and `channels_last` switch those steps off (for measuring them one by one).
    `vae_fp16_safe`: whether an fp16 VAE whose config says `force_upcast` may decode in fp16
    anyway (None: decide by one test decode, see `vae_fp16_overflows`). Calling it again on
    the same pipeline does nothing. `applied_optimizations` then lists what was changed.
    """
    if device.type != "cuda" and not force:
        return
    if hasattr(pipe, _MARK):
        return
    applied: list[str] = []
    models = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "vae", None)) if m is not None]
    if any([_use_sdpa(model) for model in models]):  # a list: every model is looked at
        applied.append("sdpa")
    if fuse_qkv and _fuse_qkv(pipe):
        applied.append("fused-qkv")
    if channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
        applied.append("channels-last")
    if _avoid_vae_upcast(pipe, vae_fp16_safe):
        applied.append("vae-no-upcast")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        applied.append("cudnn-benchmark")
    if compile and compile_pipeline(pipe, compile_mode, backend=compile_backend):
        applied.append(f"compile:{compile_mode}")
    setattr(pipe, _MARK, tuple(applied))
    logger.info("optimized pipeline on %s: %s", device, ", ".join(applied))


def warm_up(
    pipe: Any,
    device: torch.device,
    sizes: Iterable[tuple[int, int]] = ((1024, 1024),),
    batch_sizes: Iterable[int] = (1,),
    *,
    steps: int = 2,
    guidance_scale: float = 7.0,
    force: bool = False,
    from_picture: bool = False,
) -> float:
    """Run short generations so compilation and cuDNN autotuning happen now. Seconds spent.

    One call per (width, height) x batch size, shaped like the engine's own calls (lists of
    prompts and negative prompts, CPU generators, classifier-free guidance when
    `guidance_scale` > 1), so the graphs it makes are the ones requests use; an inpainting
    checkpoint's pipeline (9-channel UNet) gets a blank picture fully masked, as its text to
    image jobs do; `from_picture` (SDXL's refiner, an image-to-image pipeline) gets a blank
    picture at strength 0.5 in place of a size. The pipeline's scheduler is left as it was. A
    no-op (0.0) on the CPU unless `force`.
    """
    if device.type != "cuda" and not force:
        return 0.0
    from app.engine.img2img import blank_sources, inpainting_unet

    started = time.perf_counter()
    scheduler = pipe.scheduler
    try:
        for width, height in sizes:
            for batch in batch_sizes:
                shape_started = time.perf_counter()
                pipe.scheduler = copy.deepcopy(scheduler)
                pictures: dict[str, Any] = {}
                if inpainting_unet(pipe):
                    image, mask = blank_sources(batch, width, height)
                    pictures = {"image": image, "mask_image": mask, "strength": 1.0}
                elif from_picture:
                    image, _ = blank_sources(batch, width, height)
                    pictures = {"image": image, "strength": 0.5}
                sized = {} if from_picture else {"width": width, "height": height}
                pipe(
                    prompt=["warm-up"] * batch,
                    negative_prompt=[""] * batch,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    **sized,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                    **pictures,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                logger.info(
                    "warm-up %dx%d batch %d on %s: %.1f s",
                    width, height, batch, device, time.perf_counter() - shape_started,
                )
    finally:
        pipe.scheduler = scheduler
    return time.perf_counter() - started


# ---- attention -----------------------------------------------------------------------


def _use_sdpa(model: Any) -> bool:
    """Replace classic AttnProcessor instances by AttnProcessor2_0. True if any was replaced.

    diffusers already picks AttnProcessor2_0 by default (tests/test_optimize.py checks that
    for SDXL's UNet and VAE); this catches models whose processors were set otherwise.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(model, "attn_processors", None)
    if not processors:
        return False
    classic = [name for name, p in processors.items() if type(p) is AttnProcessor]
    if not classic:
        return False
    sdpa = AttnProcessor2_0()
    model.set_attn_processor(
        {name: sdpa if type(p) is AttnProcessor else p for name, p in processors.items()}
    )
    return True


def _fuse_qkv(pipe: Any) -> bool:
    from diffusers.models.attention_processor import AttnProcessor2_0

    fuse = getattr(pipe, "fuse_qkv_projections", None)
    unet = getattr(pipe, "unet", None)
    if fuse is None or unet is None:
        return False
    if not all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values()):
        # custom processors (IP-Adapter, ...) would be replaced by the fused ones
        logger.info("fused QKV skipped: the UNet has non-default attention processors")
        return False
    from diffusers import AutoencoderKL

    vae = getattr(pipe, "vae", None)
    try:
        fuse(unet=True, vae=isinstance(vae, AutoencoderKL))
    except (ValueError, AttributeError) as exc:
        logger.info("fused QKV skipped: %s", exc)
        return False
    unet.set_attn_processor(LoraAwareFusedAttnProcessor())
    for model in (unet, vae):
        if model is not None:
            share_fused_weights(model)
    return True


def share_fused_weights(model: torch.nn.Module) -> int:
    """Make `to_q`/`to_k`/`to_v` views of the fused weights. Returns the layers re-pointed.

    diffusers' fusion concatenates copies (for SDXL's UNet 648 M parameters, 1.3 GB in
    fp16). The rows of the fused matrix that belong to q, k and v are contiguous, so the
    separate layers can use them in place and their own copies are freed: same values,
    no extra memory. PEFT wraps these layers without changing their weights.
    """
    from diffusers.models.attention_processor import Attention

    tuner = _tuner_layer_class()
    shared = 0
    for module in model.modules():
        if not isinstance(module, Attention) or not getattr(module, "fused_projections", False):
            continue
        if module.is_cross_attention:
            fused, layers = getattr(module, "to_kv", None), [module.to_k, module.to_v]
        else:
            fused, layers = getattr(module, "to_qkv", None), [module.to_q, module.to_k, module.to_v]
        if fused is None or any(tuner is not None and isinstance(x, tuner) for x in layers):
            continue
        start = 0
        for layer in layers:
            rows = layer.out_features
            layer.weight = torch.nn.Parameter(
                fused.weight[start : start + rows], requires_grad=layer.weight.requires_grad
            )
            if layer.bias is not None and fused.bias is not None:
                layer.bias = torch.nn.Parameter(
                    fused.bias[start : start + rows], requires_grad=layer.bias.requires_grad
                )
            start += rows
            shared += 1
    return shared


def _tuner_layer_class() -> type | None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return BaseTunerLayer


def _lora_changes(layer: Any, tuner: type | None) -> bool:
    """Whether PEFT makes `layer` compute something else than its base weights."""
    if tuner is None or not isinstance(layer, tuner):
        return False
    if layer.merged:
        return True  # merged LoRA weights: the fused copy of the base weights is stale
    if layer.disable_adapters:
        return False
    lora_a = getattr(layer, "lora_A", {})
    return any(name in lora_a for name in layer.active_adapters)


class LoraAwareFusedAttnProcessor:
    """diffusers' FusedAttnProcessor2_0, except where a LoRA is active on q, k or v.

    There it runs AttnProcessor2_0, which calls the (PEFT-wrapped) `to_q`/`to_k`/`to_v`, so
    the LoRA applies in full. Without LoRAs it is the fused processor, unchanged.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

        self._fused = FusedAttnProcessor2_0()
        self._unfused = AttnProcessor2_0()
        self._tuner = _tuner_layer_class()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        tuner = self._tuner
        lora = (
            _lora_changes(attn.to_q, tuner)
            or _lora_changes(attn.to_k, tuner)
            or _lora_changes(attn.to_v, tuner)
        )
        processor = self._unfused if lora else self._fused
        return processor(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )


# ---- VAE precision -------------------------------------------------------------------


def _avoid_vae_upcast(pipe: Any, fp16_safe: bool | None) -> bool:
    """Clear `force_upcast` of an fp16 VAE that is safe in fp16. True if it was cleared.

    A VAE whose config already says `force_upcast: false` is declared safe and left alone.
    Only diffusers' SDXL pipelines upcast (they have `upcast_vae`), so only they are checked.
    """
    vae = getattr(pipe, "vae", None)
    if vae is None or vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        return False
    if fp16_safe is None and not hasattr(pipe, "upcast_vae"):
        return False  # the pipeline never upcasts: nothing to win, no check to pay
    peak = None
    if fp16_safe is None:
        peak = vae_fp16_peak(vae)
        fp16_safe = peak < torch.finfo(torch.float16).max / VAE_CHECK_HEADROOM
    if fp16_safe:
        vae.register_to_config(force_upcast=False)
        if peak is not None:
            logger.info("the VAE decodes in fp16 (its config says force_upcast, but a test "
                        "decode peaked at %.0f, far from fp16's limit)", peak)
        return True
    logger.warning(
        "the VAE of this SDXL model is decoded in fp32 on every call: its config says "
        "force_upcast%s. Use vae: madebyollin/sdxl-vae-fp16-fix in models.yaml, or "
        "dtype: bfloat16, for an fp16 decoder",
        "" if peak is None else f" and a test decode in fp16 reached {peak:.0f}",
    )
    return False


def vae_fp16_overflows(vae: Any) -> bool:
    """Whether one fp16 decode of a random latent overflows (or comes within the headroom)."""
    return not vae_fp16_peak(vae) < torch.finfo(torch.float16).max / VAE_CHECK_HEADROOM


@torch.no_grad()
def vae_fp16_peak(vae: Any, latent_size: int | None = None) -> float:
    """The largest |activation| of one decode of a random latent by `vae`, in its own dtype.

    inf when any activation or the image is not finite. The latent is unit normal, scaled
    the way the SDXL pipeline scales the denoised latents before decoding; it is drawn from
    a seeded CPU generator, so the check gives the same answer on every run and device.
    Every output tensor of the decoder's modules is looked at, not only the image: a VAE
    that overflows inside its decoder gives NaN or black images.
    """
    side = latent_size or VAE_CHECK_LATENT_SIZE
    config = vae.config
    device = next(vae.parameters()).device
    latent = torch.randn(1, config.latent_channels, side, side,
                         generator=torch.Generator("cpu").manual_seed(0))
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        latent = (latent * torch.tensor(std).view(1, -1, 1, 1) / config.scaling_factor
                  + torch.tensor(mean).view(1, -1, 1, 1))
    else:
        latent = latent / config.scaling_factor
    peaks: list[torch.Tensor] = []

    def record(module: Any, args: Any, output: Any) -> None:
        for tensor in output if isinstance(output, tuple) else (output,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                peaks.append(tensor.detach().abs().amax().float())

    hooks = [m.register_forward_hook(record) for m in vae.decoder.modules()]
    try:
        image = vae.decode(latent.to(device=device, dtype=vae.dtype), return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    peaks.append(image.detach().abs().amax().float())
    peak = torch.stack(peaks).amax().item()  # NaN anywhere makes the maximum NaN
    return peak if math.isfinite(peak) else float("inf")


# ---- torch.compile -------------------------------------------------------------------


def _float_timestep(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: every timestep tensor reaches the UNet as float32.

    Samplers give int64 (DPM++ 2M, DDIM, ...), float32 (Euler, ...) or float64 (DPM2, DPM2 a
    and DPM++ SDE with Karras sigmas) timesteps; a compiled graph guards on the dtype, so each
    would be another full UNet compilation. The cast is exact: the UNet's timestep embedding
    (diffusers' `get_timestep_embedding`) calls `.float()` on the timesteps first, so float32
    is what it computes with whatever it is given (tests/test_gpu_ready.py checks it).
    """
    if len(args) > 1 and _needs_cast(args[1]):
        return (args[0], args[1].to(torch.float32), *args[2:]), kwargs
    if _needs_cast(kwargs.get("timestep")):
        return args, {**kwargs, "timestep": kwargs["timestep"].to(torch.float32)}
    return None


def _needs_cast(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype != torch.float32


def compile_pipeline(
    pipe: Any, mode: str = COMPILE_MODE, *, backend: str = "inductor", dynamic: bool | None = False
) -> bool:
    """Compile the UNet's and the VAE decoder's forward in place. True if anything was compiled.

    Only `forward` is compiled, so module hooks, LoRA loading and attribute access work as
    before; the timestep pre-hook runs outside the compiled region. The original forward is
    kept on the module, for `eager`. Parts already compiled are left alone. Compilation
    itself happens on the first call of each shape (docs/gpu-path.md). `backend` and
    `dynamic` are torch.compile's (tests use backend="eager"; the engine compiles with
    inductor and static shapes).

    What keeps the graphs valid for the life of the pipeline (each change below would be a
    full UNet compilation on the request path):
    - no parameter of the pipeline requires grad (an inference server never needs it, and
      PEFT turns it off on the layers it wraps: a guard of every graph checks it);
    - the UNet's compiled forward is that of a twin (`_twin`): the same weights, a module tree
      of its own that LoRA loading never changes. PEFT wraps layers of `pipe.unet` only, and
      batches with LoRAs run that UNet eagerly (`eager`), so the twin always computes the base
      model, which is what a batch without LoRAs asks for;
    - every timestep reaches it as float32 (`_float_timestep`).
    A compilation that fails (an inductor or Triton error, a missing C compiler) makes that
    part run eagerly from then on, with a warning: the model stays served (`_CompiledForward`).
    """
    options: dict[str, Any] = {"dynamic": dynamic, "fullgraph": False, "backend": backend}
    if mode != "default":
        options["mode"] = mode
    _raise_recompile_limit(RECOMPILE_LIMIT)
    for model in _models(pipe):
        model.requires_grad_(False)
    compiled = False
    for name, module in _compilable(pipe):
        if getattr(module, _EAGER_FORWARD, None) is not None:
            continue
        original = module.forward
        target = _twin(module).forward if name == "unet" else original
        if name == "unet":
            module.register_forward_pre_hook(_float_timestep, with_kwargs=True)
        wrapper = _CompiledForward(name, torch.compile(target, **options), original)
        setattr(module, _EAGER_FORWARD, original)
        setattr(module, _COMPILED_FORWARD, wrapper)
        module.forward = wrapper
        compiled = True
    return compiled


def _models(pipe: Any) -> list[torch.nn.Module]:
    return [m for m in vars(pipe).values() if isinstance(m, torch.nn.Module)]


def _twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s module tree that shares every parameter and buffer with it.

    It costs no weight memory (only the Python objects), and what happens to the original's
    structure afterwards (PEFT replacing layers by its wrappers) does not reach it. The
    weights are the same tensors, so their values and memory formats are the original's.
    """
    shared: dict[int, Any] = {id(t): t for t in module.parameters()}
    shared.update((id(t), t) for t in module.buffers())
    return copy.deepcopy(module, memo=shared)


class _CompiledForward:
    """A compiled forward that falls back to the eager one if compiling it fails.

    The fallback is for failures of compilation only (dynamo's `BackendCompilerFailed`, which
    inductor's and Triton's errors become, or an internal dynamo error) and only when the eager
    forward then succeeds on the same inputs: an error that eager gives too (a bad input, out
    of memory) is raised as eager raises it, and the compiled forward stays.
    """

    def __init__(self, name: str, compiled: Any, eager: Any) -> None:
        self.name = name
        self.compiled = compiled
        self.eager = eager
        self.failed: str | None = None  # why compiling failed, once it has

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except _compile_errors() as exc:
            reason = _compile_error_reason(exc)
            result = self.eager(*args, **kwargs)  # raises what eager raises: not a compile failure
            self.failed = reason
            logger.warning("compiling the %s failed (%s); it runs uncompiled from now on, as with "
                           "compile: false", self.name, reason)
            return result


def _compile_error_reason(exc: BaseException) -> str:
    """One line: the backend's own error (dynamo wraps it) rather than dynamo's wrapper."""
    inner = getattr(exc, "inner_exception", None)
    error = inner if isinstance(inner, BaseException) else exc
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return type(error).__name__ + (f": {lines[0][:300]}" if lines else "")


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc

    return (exc.BackendCompilerFailed, exc.InternalTorchDynamoError)


def compile_failures(pipe: Any) -> dict[str, str]:
    """{part: why} for each part of `pipe` whose compilation failed (now running eagerly)."""
    failures = {}
    for name, module in _compilable(pipe):
        wrapper = getattr(module, _COMPILED_FORWARD, None)
        if wrapper is not None and wrapper.failed is not None:
            failures[name] = wrapper.failed
    return failures


def _raise_recompile_limit(limit: int) -> None:
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < limit:
        setattr(config, name, limit)


def compiled_modules(pipe: Any) -> Sequence[str]:
    """Names of the pipeline parts whose forward is compiled (for logs and the benchmark); a
    part whose compilation failed (see `compile_failures`) is not among them."""
    failed = compile_failures(pipe)
    return [name for name, module in _compilable(pipe)
            if getattr(module, _EAGER_FORWARD, None) is not None and name not in failed]


@contextlib.contextmanager
def eager(pipe: Any) -> Iterator[None]:
    """While active, the compiled parts of `pipe` run their original, uncompiled forward.

    For batches with LoRAs: the compiled UNet is a twin that PEFT never wraps, so it would
    compute the base model; LoRA layers live in `pipe.unet`, which runs eagerly here. And for
    the out-of-memory fallback: its tiled decode has shapes no warm-up compiled, and compiling
    there costs memory just when there is none. A no-op for a pipeline that is not compiled. Restores
    the compiled forward on exit, also after an exception; nests. Per pipeline, not
    process-wide (unlike torch.compiler.set_stance), so other workers are not affected.
    Use it on the thread that owns the pipeline.
    """
    swapped = []
    for _, module in _compilable(pipe):
        original = getattr(module, _EAGER_FORWARD, None)
        if original is not None:
            swapped.append((module, module.forward))
            module.forward = original
    try:
        yield
    finally:
        for module, forward in reversed(swapped):
            module.forward = forward


def _compilable(pipe: Any) -> list[tuple[str, Any]]:
    parts = (("unet", getattr(pipe, "unet", None)),
             ("vae.decoder", getattr(getattr(pipe, "vae", None), "decoder", None)))
    return [(name, module) for name, module in parts if module is not None]


# ---- inductor's compiled artifacts, in one file ------------------------------------------


def load_compile_cache(path: Path | str) -> bool:
    """Load inductor's artifacts saved by `save_compile_cache` (True if a file was loaded).

    Call before the first compilation: compilations whose artifacts are there then skip
    inductor (dynamo still traces, seconds). Artifacts of another torch version, GPU or
    Triton are not used (torch checks); a missing file is fine (False); an unreadable one is
    logged and ignored. Complements `TORCHINDUCTOR_CACHE_DIR`, the on-disk cache, with a
    single file that can be copied to another machine.
    """
    path = Path(path)
    loader = getattr(torch.compiler, "load_cache_artifacts", None)
    if loader is None or not path.is_file():
        return False
    try:
        info = loader(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a stale or corrupt cache only costs compile time
        logger.warning("compile cache %s not loaded: %s: %s", path, type(exc).__name__, exc)
        return False
    if info is None:  # torch logs why (a corrupt file: its checksum)
        logger.warning("compile cache %s not loaded: torch could not read it", path)
        return False
    logger.info("compile cache %s loaded (%s)", path, _cache_summary(info))
    return True


def save_compile_cache(path: Path | str) -> int:
    """Write every artifact inductor made in this process so far to `path` (bytes written;
    0 when there is nothing, or torch cannot save them). Written whole or not at all."""
    path = Path(path)
    saver = getattr(torch.compiler, "save_cache_artifacts", None)
    saved = saver() if saver is not None else None
    if not saved or not saved[0]:
        return 0
    data, info = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
    logger.info("compile cache %s saved: %d bytes (%s)", path, len(data), _cache_summary(info))
    return len(data)


def _cache_summary(info: Any) -> str:
    artifacts = getattr(info, "artifacts", None)
    if not isinstance(artifacts, dict):
        return "no details"
    return ", ".join(f"{kind}: {len(keys)}" for kind, keys in artifacts.items() if keys) or "empty"
