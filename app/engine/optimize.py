"""The GPU fast path of a loaded pipeline: what diffusers and PyTorch offer, applied once.

`optimize_pipeline(pipe, device, compile=...)` right after a model is loaded on its device,
then `warm_up(pipe, device, ...)` before the model counts as loaded (so before /ready says
200). Both run on the worker thread that owns the device, and both do nothing on the CPU:
the CPU path, its images and its tests stay exactly as they are (`force=True` applies the
GPU path on any device, for tests).

What is applied on CUDA, and why:

- SDPA attention. diffusers' default processor is already `AttnProcessor2_0`
  (`F.scaled_dot_product_attention`: flash / memory-efficient kernels); any classic
  `AttnProcessor` left over is replaced by it.
- Fused QKV projections (`pipe.fuse_qkv_projections()`): one matmul for q, k and v in
  self-attention and one for k and v in cross-attention, in the UNet and the VAE. The
  separate `to_q`/`to_k`/`to_v` layers stay, because LoRAs live there, as views into the
  fused weights (`share_fused_weights`): diffusers' fusion alone would keep both copies,
  648 M parameters (1.3 GB in fp16) more for SDXL's UNet.
  LoRA: PEFT wraps `to_q`/`to_k`/`to_v`, which diffusers' fused processor never calls, so
  with plain fusion an active LoRA would silently lose its q/k/v part (loading still works).
  The UNet therefore gets `LoraAwareFusedAttnProcessor`: fused while no LoRA is active on a
  layer's q/k/v (and no LoRA is merged into them), the unfused SDPA path of the very same
  layers as soon as one is. LoRA loading, `set_adapters`, `disable_lora` and
  `delete_adapters` work unchanged.
- channels-last memory format for the UNet and VAE (their convolutions are NHWC-native on
  tensor cores), and `torch.backends.cudnn.benchmark` (convolution algorithms autotuned per
  shape; warm-up pays for the sizes it runs).
- No VAE upcast. In fp16 diffusers' SDXL pipeline decodes in fp32 when the VAE config says
  `force_upcast: true`, converting the VAE's weights to fp32 and back on every call. The
  SDXL base VAE needs that (it overflows in fp16); madebyollin/sdxl-vae-fp16-fix, which the
  shipped models.yaml uses, does not and ships `force_upcast: false`. A VAE recognised as
  the fp16-fix one (its name) that still says true is set to false here; a genuine SDXL VAE
  in fp16 keeps upcasting and is logged once (use the fp16-fix VAE, or bfloat16, which
  never upcasts).
- Optional `torch.compile` of the UNet and the VAE decoder (setting `compile`), mode
  `COMPILE_MODE`, `dynamic=False`: one graph per (width, height, batch, CFG on/off), made on
  first use of that shape; `warm_up` makes the ones it is given. A new shape later costs one
  recompile (tens of seconds) on that request; after `torch._dynamo.config.recompile_limit`
  (8) shapes per function, further new shapes run eagerly instead of compiling. Activating
  or deactivating LoRAs also changes the graphs (PEFT layers are new modules): the first
  request of each such state recompiles. The UNet's timestep is cast to float32 before the
  compiled region (samplers give int64 or float32 timesteps; the UNet turns them into float
  either way, so results are identical) so that one graph serves every sampler.

Why the inductor "default" mode and not "max-autotune-no-cudagraphs" or "reduce-overhead":
SDXL's heavy convolutions and matmuls already go to cuDNN/cuBLAS, which max-autotune's
Triton templates rarely beat on an H100; the gain of compiling is the fusion of the many
pointwise and normalisation ops, which the default mode does. max-autotune compiles for
minutes per shape, too long for start-up and for a benchmark that compiles several batch
sizes. reduce-overhead adds CUDA graphs: little gain where the GPU is busy (1024x1024 SDXL
steps are tens of milliseconds), one static memory pool per shape, and graph outputs that
the next replay overwrites, which breaks samplers that keep past model outputs. The mode is
a parameter (`compile_mode`) for those who want to measure the others.

Host-device synchronisation: the diffusers SDXL denoising loop makes none per step with the
served samplers (their sigmas live on the CPU by design; the pipeline sets the scheduler's
begin index, so no `nonzero().item()` lookup). The engine's step callback reads only a
threading.Event. Per call there are a few unavoidable ones: prompt ids and the CPU-seeded
initial noise go to the device, the decoded image comes back. scripts/bench_gpu.py counts
them with `torch.cuda.set_sync_debug_mode`. Samplers that draw fresh noise every step from
the CPU generators the engine passes (Euler a, DPM++ 2M SDE and the like) copy that noise to
the device on every step: a small copy, but a synchronising one.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPILE_MODE = "default"
_MARK = "_craftserve_optimized"  # attribute on the pipeline: the tuple of what was applied
_COMPILED = "_craftserve_compiled"  # attribute on a module whose forward is compiled
_FP16_SAFE_VAE_TAGS = ("fp16-fix", "fp16_fix")


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
) -> None:
    """Apply the GPU fast path to a pipeline already on `device`. A no-op on the CPU.

    `force=True` applies it on any device (tests: the CPU runs every step except cuDNN).
    `fuse_qkv` and `channels_last` switch those steps off (for measuring them one by one).
    `vae_fp16_safe`: whether the VAE may decode in fp16 (None: recognise the fp16-fix VAE
    by name). Calling it again on the same pipeline does nothing.
    """
    if device.type != "cuda" and not force:
        return
    if applied_optimizations(pipe):
        return
    applied: list[str] = []
    models = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "vae", None)) if m is not None]
    for model in models:
        _use_sdpa(model)
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
    if compile:
        compile_pipeline(pipe, compile_mode)
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
) -> float:
    """Run short generations so compilation and cuDNN autotuning happen now. Seconds spent.

    One call per (width, height) x batch size, shaped like the engine's own calls (lists of
    prompts and negative prompts, CPU generators, classifier-free guidance when
    `guidance_scale` > 1), so the graphs it makes are the ones requests use. The pipeline's
    scheduler is left as it was. A no-op (0.0) on the CPU unless `force`.
    """
    if device.type != "cuda" and not force:
        return 0.0
    started = time.perf_counter()
    scheduler = pipe.scheduler
    try:
        for width, height in sizes:
            for batch in batch_sizes:
                shape_started = time.perf_counter()
                pipe.scheduler = copy.deepcopy(scheduler)
                pipe(
                    prompt=["warm-up"] * batch,
                    negative_prompt=[""] * batch,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    width=width,
                    height=height,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
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


def fused_qkv_extra_parameters(model: torch.nn.Module) -> int:
    """Parameters that fusing QKV adds to `model` (the fused copies), without fusing it."""
    from diffusers.models.attention_processor import Attention

    extra = 0
    for module in model.modules():
        if isinstance(module, Attention):
            layers = [module.to_k, module.to_v]
            if not module.is_cross_attention:
                layers.append(module.to_q)
            extra += sum(p.numel() for layer in layers for p in layer.parameters())
    return extra


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
    vae = getattr(pipe, "vae", None)
    if vae is None or vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        return False
    if fp16_safe is None:
        name = str(getattr(vae.config, "_name_or_path", "") or "").lower()
        fp16_safe = any(tag in name for tag in _FP16_SAFE_VAE_TAGS)
    if fp16_safe:
        vae.register_to_config(force_upcast=False)
        return True
    if hasattr(pipe, "text_encoder_2"):  # only diffusers' SDXL pipelines upcast
        logger.warning(
            "the VAE of this SDXL model is decoded in fp32 on every call (its config says "
            "force_upcast): use vae: madebyollin/sdxl-vae-fp16-fix in models.yaml, or "
            "dtype: bfloat16, for an fp16 decoder"
        )
    return False


# ---- torch.compile -------------------------------------------------------------------


def _float_timestep(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: int timesteps become float32 (the UNet embeds them as float)."""
    if len(args) > 1 and _is_int_tensor(args[1]):
        return (args[0], args[1].to(torch.float32), *args[2:]), kwargs
    if _is_int_tensor(kwargs.get("timestep")):
        return args, {**kwargs, "timestep": kwargs["timestep"].to(torch.float32)}
    return None


def _is_int_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point()


def compile_pipeline(pipe: Any, mode: str = COMPILE_MODE) -> None:
    """Compile the UNet's and the VAE decoder's forward in place (modules stay themselves).

    Only `forward` is compiled, so module hooks, LoRA loading and attribute access work as
    before; the timestep pre-hook runs outside the compiled region. Parts already compiled
    are left alone. Compilation itself happens on the first call of each shape.
    """
    options: dict[str, Any] = {"dynamic": False, "fullgraph": False}
    if mode != "default":
        options["mode"] = mode
    done = set(compiled_modules(pipe))
    unet = pipe.unet
    if "unet" not in done:
        unet.register_forward_pre_hook(_float_timestep, with_kwargs=True)
        unet.forward = torch.compile(unet.forward, **options)
        setattr(unet, _COMPILED, True)
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if decoder is not None and "vae.decoder" not in done:
        decoder.forward = torch.compile(decoder.forward, **options)
        setattr(decoder, _COMPILED, True)


def compiled_modules(pipe: Any) -> Sequence[str]:
    """Names of the pipeline parts whose forward is compiled (for logs and the benchmark)."""
    found = []
    for name, module in (("unet", getattr(pipe, "unet", None)),
                         ("vae.decoder", getattr(getattr(pipe, "vae", None), "decoder", None))):
        if module is not None and getattr(module, _COMPILED, False):
            found.append(name)
    return found
