"""Full-size Stable Diffusion XL 1.0 base architecture with random weights, built offline.

For speed measurements where no weights can be downloaded: the UNet, VAE and both text
encoders are built from the published component configs kept in ``app/configs/sdxl/``, so
every layer, shape and FLOP is the real model's (speed does not depend on weight values).
The parameter counts match SDXL 1.0 base exactly (see ``EXPECTED_PARAMETERS``).

How it is built, fast and without double memory: the modules are constructed under
``torch.device("meta")`` (no memory, no initialisation; the context is thread-local, unlike
accelerate's monkey-patching), then every parameter is allocated once on the target device
in the target dtype and filled from seeded CPU generators (so every device gets the same
values): normal(0, 1/sqrt(fan_in)) for linear, conv and projection weights, N(0, 0.02) for
embeddings, ones for norm scales, zeros for biases. That init preserves variance, so the
activations stay finite in fp16: measured on the CPU, they peak around 30 in the UNet and
the text encoders, and at a few thousand in the VAE decoder fed latents of +-770, far inside
fp16's 65,504. The only buffer these models have, CLIP's ``position_ids``, is rebuilt.

The tokenizers are the byte-level CLIP tokenizers of :mod:`app.engine.tiny`
(``model_max_length=77``, ids far below the 49,408-token embedding), so prompts are padded to
77 tokens as with the real vocabulary and the text encoders do exactly the real work.

``device="meta"`` gives a pipeline whose weights have shapes but no storage: for counting.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sdxl"
RANDOM_SEED = 0

# SDXL 1.0 base, as published (tests/test_optimize.py checks these against its own literals).
EXPECTED_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}

# madebyollin/sdxl-vae-fp16-fix has the SDXL VAE's architecture and ships `force_upcast: false`
# (its activations were scaled down so fp16 does not overflow); the base model's own VAE
# config (configs/sdxl/vae/config.json) says `force_upcast: true`, so diffusers decodes it in fp32.


@cache
def load_config(name: str) -> dict[str, Any]:
    """One component config from app/configs/sdxl (unet, vae, text_encoder, text_encoder_2,
    scheduler), a diffusers-format folder."""
    file = "scheduler_config.json" if name == "scheduler" else "config.json"
    path = CONFIG_DIR / name / file
    return json.loads(path.read_text(encoding="utf-8"))


def _config(name: str) -> dict[str, Any]:
    return dict(load_config(name))  # a copy: callers may change it


def build_unet():
    """SDXL 1.0 base UNet on the meta device (shapes only; see `materialize`)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("unet"))
    return _finish(unet)


def build_vae(*, fp16_fix: bool = True):
    from diffusers import AutoencoderKL

    config = _config("vae")
    if fp16_fix:
        config["force_upcast"] = False
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    return _finish(vae)


def build_text_encoder(name: str):
    """`text_encoder` (CLIP ViT-L/14 text) or `text_encoder_2` (OpenCLIP bigG, projected)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = _config(name)
    architecture = (config.pop("architectures", None) or ["CLIPTextModel"])[0]
    cls = CLIPTextModelWithProjection if architecture.endswith("WithProjection") else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**config))
    return _finish(model)


def _finish(model: nn.Module) -> nn.Module:
    model.eval()  # as from_pretrained leaves it
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The layers diffusers' `fuse_qkv_projections` adds to an Attention module: concatenations of
# to_q/to_k/to_v (or of the added projections), not parts of the architecture.
FUSED_PROJECTIONS = ("to_qkv", "to_kv", "to_added_qkv")


def architecture_parameters(model: nn.Module) -> int:
    """The parameters of `model`'s architecture as published, fused QKV or not.

    `count_parameters` of a UNet whose QKV projections were fused counts the fused layers too
    (SDXL's UNet: 3,215,450,884 instead of 2,567,463,684, whether the separate layers are views
    into the fused weights, as craftserve makes them, or copies, as diffusers leaves them).
    This leaves out the fused layers of every Attention module that says it has them, and
    counts each parameter once.
    """
    skipped: set[int] = set()
    for module in model.modules():
        if getattr(module, "fused_projections", False):
            for name in FUSED_PROJECTIONS:
                layer = getattr(module, name, None)
                if isinstance(layer, nn.Module):
                    skipped.update(id(p) for p in layer.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skipped)


def build_random_sdxl(
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    *,
    seed: int = RANDOM_SEED,
    fp16_fix_vae: bool = True,
):
    """A StableDiffusionXLPipeline with SDXL 1.0 base's full architecture and random weights.

    `fp16_fix_vae=True` configures the VAE as madebyollin/sdxl-vae-fp16-fix is configured
    (`force_upcast: false`, what craftserve's models.yaml uses); False keeps configs/sdxl/vae/config.json
    (`force_upcast: true`, the base model's own VAE: diffusers decodes in fp32 when in fp16).
    The same `seed` and dtype give the same weights on any device. On the CPU a float32 build needs
    about 14 GB of memory; a float16 one on a GPU about 7 GB.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from app.engine.tiny import tiny_tokenizer

    device = torch.device(device)
    components = {
        "unet": build_unet(),
        "vae": build_vae(fp16_fix=fp16_fix_vae),
        "text_encoder": build_text_encoder("text_encoder"),
        "text_encoder_2": build_text_encoder("text_encoder_2"),
    }
    if device.type != "meta":
        for offset, name in enumerate(("text_encoder", "text_encoder_2", "unet", "vae")):
            materialize(components[name], device, dtype, seed=seed * 16 + offset)
    return StableDiffusionXLPipeline(
        **components,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(_config("scheduler")),
    )


# ---- materialising a meta-device model -----------------------------------------------


def materialize(
    model: nn.Module, device: torch.device | str, dtype: torch.dtype, *, seed: int = RANDOM_SEED
) -> nn.Module:
    """Give every meta parameter storage on `device` in `dtype`, filled with random values.

    Floating parameters take `dtype`; shared parameters stay shared. The values come from
    CPU generators, one per parameter (seeded from `seed` and its position), filled by
    several threads and copied to the device parameter by parameter: the same seed gives the
    same weights on every device, whether a model is built on the GPU or built on the CPU
    and moved there (one CPU generator alone would take half a minute for SDXL). Raises for
    a meta buffer it does not know how to rebuild, rather than leave uninitialised memory.
    """
    device = torch.device(device)
    created: dict[int, nn.Parameter] = {}
    todo: list[tuple[torch.Tensor, nn.Module, str]] = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            new = created.get(id(param))
            if new is None:
                kind = dtype if param.is_floating_point() else param.dtype
                data = torch.empty(param.shape, device=device, dtype=kind)
                todo.append((data, module, name))
                new = nn.Parameter(data, requires_grad=param.requires_grad)
                created[id(param)] = new
            module._parameters[name] = new
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = _rebuild_buffer(module, name, buffer, device)

    def fill(item: tuple[int, tuple[torch.Tensor, nn.Module, str]]) -> None:
        index, (data, module, name) = item
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        if data.device.type == "cpu":
            _fill(data, module, name, generator)
        else:
            values = torch.empty(data.shape, dtype=data.dtype)
            _fill(values, module, name, generator)
            data.copy_(values)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, enumerate(todo)))
    return model


_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.InstanceNorm2d)


@torch.no_grad()
def _fill(data: torch.Tensor, module: nn.Module, name: str, generator: torch.Generator) -> None:
    if not data.is_floating_point():
        data.zero_()
    elif isinstance(module, _NORMS) or (data.dim() == 1 and name == "weight"):
        data.fill_(1.0 if name == "weight" else 0.0)
    elif data.dim() <= 1:
        data.zero_()  # biases
    elif isinstance(module, nn.Embedding):
        data.normal_(0.0, 0.02, generator=generator)
    else:
        fan_in = data[0].numel()
        data.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)


def _rebuild_buffer(
    module: nn.Module, name: str, buffer: torch.Tensor, device: torch.device
) -> torch.Tensor:
    if buffer.device.type != "meta":
        return buffer.to(device)
    if name == "position_ids":  # CLIP: arange(max_positions).expand((1, -1)), not saved
        return torch.arange(buffer.shape[-1], device=device, dtype=buffer.dtype).expand(
            buffer.shape
        )
    raise RuntimeError(
        f"cannot rebuild buffer {name!r} of {type(module).__name__} built on the meta device"
    )
