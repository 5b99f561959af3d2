"""Writing diffusers components as an original-layout single-file checkpoint, for tests and
scripts/bench_load.py.

`original_state(family, unet=..., vae=..., text_encoder=..., text_encoder_2=...)` names every
tensor as CompVis SD 1.x (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.transformer.`) or Stability's SGM SDXL (`conditioner.embedders.0.transformer.`,
`conditioner.embedders.1.model.` with OpenCLIP's fused q/k/v `in_proj`, transposed
`text_projection`, 1x1-conv VAE attention; SDXL's refiner, without `text_encoder`, has its one
OpenCLIP encoder at `conditioner.embedders.0.model.`) lays them out; `save_safetensors` streams them to
disk without a second copy in memory (safetensors' own writer builds the whole file in memory
first). tests/test_single_file.py checks the layout against diffusers' own converters, and that
the loader gives back exactly the tensors that wrote the file.

Also: tiny SDXL / SD 1.x pipelines whose config folders the tests point `config:` at; the tiny
SDXL's text encoders have different widths (32 and 48) so a loader telling them apart by width
could not pass by luck.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from app.checkpoints import REFINER_TEXT, SD1_TEXT, SDXL_TEXT_1, SDXL_TEXT_2, UNET, VAE
from app.engine.single_file import clip_name, openclip_source, unet_mapper, vae_mapper

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def _openclip_state(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    state = encoder.state_dict()
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        key, how = openclip_source(name)
        if how == "transpose":
            out[prefix + key] = tensor.t().contiguous()
        elif isinstance(how, tuple):
            fused.setdefault(prefix + key, [None, None, None])[how[1]] = tensor
        else:
            out[prefix + key] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat(parts)  # type: ignore[arg-type]
    out[prefix + "logit_scale"] = torch.tensor(4.6052, dtype=next(iter(state.values())).dtype)
    return out


def original_state(family: str, *, unet: Any, vae: Any, text_encoder: Any,
                   text_encoder_2: Any = None) -> dict[str, torch.Tensor]:
    """Every tensor of the components under its original-layout name (views, no copies, but
    for OpenCLIP's fused q/k/v). SDXL without `text_encoder` is the refiner's layout: its one
    encoder (OpenCLIP bigG) is SGM's embedder 0, `conditioner.embedders.0.model.`."""
    parts = {"unet": unet, "vae": vae}
    if text_encoder is not None:
        parts["text_encoder"] = text_encoder
    if family == "sdxl":
        parts["text_encoder_2"] = text_encoder_2
    refiner = family == "sdxl" and text_encoder is None
    out: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        out.update(_component_state(family, name, module, refiner=refiner))
    return out


def pipeline_state(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    return original_state(family, unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                          text_encoder_2=getattr(pipe, "text_encoder_2", None))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str,
                     metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> int:
    """Stream `tensors` (floats cast to `dtype` one at a time) to a safetensors file; its size."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    plan = []
    for key in sorted(tensors):
        tensor = tensors[key]
        kind = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * torch.empty((), dtype=kind).element_size()
        header[key] = {"dtype": _ST_DTYPES[kind], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        plan.append((key, kind))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, kind in plan:
            tensor = tensors[key].detach().to("cpu", kind).contiguous()
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


def write_checkpoint(pipe: Any, family: str, path: Path | str, *, dtype: torch.dtype | None = None,
                     extra: dict[str, torch.Tensor] | None = None,
                     drop: tuple[str, ...] = (), metadata: dict[str, str] | None = None) -> Path:
    tensors = pipeline_state(pipe, family)
    tensors.update(extra or {})
    for prefix in drop:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    save_safetensors(tensors, path, metadata, dtype)
    return Path(path)


# --------------------------------------------------------------------------- tiny models


def tiny_sdxl_two_widths():
    """A tiny SDXL whose text encoders are 32 and 48 wide (fixed seed)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from app.engine import tiny

    torch.manual_seed(1)
    tokenizer = tiny.tiny_tokenizer()
    te1 = tiny._text_encoder(False, len(tokenizer))
    te2 = _wider(tiny._text_encoder(True, len(tokenizer)), 48)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 48,
        cross_attention_dim=32 + 48, norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=tiny._vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
        tokenizer_2=tiny.tiny_tokenizer(), scheduler=tiny._scheduler(),
    )


def _wider(encoder: Any, width: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**encoder.config.to_dict(), "hidden_size": width, "projection_dim": width,
                               "intermediate_size": 2 * width})
    return CLIPTextModelWithProjection(config)


def tiny_sd15():
    from app.engine import tiny

    return tiny.build_tiny_sd15()


def write_config_folder(pipe: Any, folder: Path | str) -> Path:
    """The pipeline's diffusers-format folder without weights: model_index.json, */config.json,
    scheduler and tokenizers."""
    folder = Path(folder)
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        target = folder / name
        if hasattr(component, "save_vocabulary"):
            component.save_pretrained(target)
        elif hasattr(component, "save_config"):
            component.save_config(target)
        else:  # transformers models: their config only
            component.config.architectures = [type(component).__name__]
            component.config.save_pretrained(target)
    return folder


# --------------------------------------------------------------------------- full size, random


def _meta_components(family: str, folder: Path) -> dict[str, Any]:
    from app.engine.single_file import _meta_text_encoder, _meta_unet, _meta_vae

    parts = {"unet": _meta_unet(folder)[0], "vae": _meta_vae(folder)[0],
             "text_encoder": _meta_text_encoder(folder, "text_encoder")}
    if family == "sdxl":
        parts["text_encoder_2"] = _meta_text_encoder(folder, "text_encoder_2")
    return parts


def _component_state(family: str, name: str, module: Any, *,
                     refiner: bool = False) -> dict[str, torch.Tensor]:
    """The original-layout tensors of one component (the others left out); `refiner`: SDXL's
    refiner, whose OpenCLIP encoder is embedder 0."""
    if name == "unet":
        to_unet = unet_mapper(dict(module.config))
        return {UNET + to_unet(k): v for k, v in module.state_dict().items()}
    if name == "vae":
        to_vae = vae_mapper(dict(module.config))
        # CompVis VAE attention is 1x1 convolutions where diffusers has linears
        return {VAE + to_vae(k): v[:, :, None, None] if ".mid_block.attentions." in k and v.dim() == 2 else v
                for k, v in module.state_dict().items()}
    if name == "text_encoder":
        prefix = SDXL_TEXT_1 if family == "sdxl" else SD1_TEXT
        return {prefix + clip_name(k): v for k, v in module.state_dict().items()}
    return _openclip_state(module, REFINER_TEXT if refiner else SDXL_TEXT_2)


_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                  "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def write_random_checkpoint(family: str, path: Path | str, *, dtype: torch.dtype = torch.float16,
                            seed: int = 0, folder: Path | None = None,
                            diffusers_folder: Path | None = None) -> int:
    """A full-size original-layout checkpoint with random weights, built from the bundled
    configs (or `folder`), written one component at a time: the memory peak is the largest
    component (SDXL's UNet: 5.1 GB in fp16), never the whole model. Returns the file size.

    `diffusers_folder`: also write the same weights as a diffusers folder (configs copied from
    the config folder, each component's safetensors file in diffusers names)."""
    from app.checkpoints import bundled_config
    from app.engine.random_sdxl import materialize

    folder = folder or bundled_config(family)  # type: ignore[arg-type]
    parts = _meta_components(family, folder)
    header: dict[str, Any] = {}
    order: list[tuple[str, list[str]]] = []
    offset = 0
    for name, module in parts.items():
        state = _component_state(family, name, module)  # meta tensors: shapes only
        keys = sorted(state)
        for key in keys:
            tensor = state[key]
            kind = dtype if tensor.is_floating_point() else tensor.dtype
            size = tensor.numel() * torch.empty((), dtype=kind).element_size()
            header[key] = {"dtype": _ST_DTYPES[kind], "shape": list(tensor.shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        order.append((name, keys))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for index, (name, keys) in enumerate(order):
            module = materialize(parts.pop(name), "cpu", dtype, seed=seed * 16 + index)
            if diffusers_folder is not None:
                _write_diffusers_component(module, name, Path(folder), Path(diffusers_folder))
            state = _component_state(family, name, module)
            for key in keys:
                tensor = state[key].contiguous()
                if tensor.numel():
                    f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del module, state
    return 8 + len(raw) + offset


def _write_diffusers_component(module: Any, name: str, folder: Path, target: Path) -> None:
    import shutil

    if not (target / "model_index.json").exists():
        shutil.copytree(folder, target, dirs_exist_ok=True)  # configs, tokenizers (links followed)
    state = module.state_dict()
    if name.startswith("text_encoder"):
        state = {clip_name(k): v for k, v in state.items() if not k.endswith("position_ids")}
    save_safetensors(state, target / name / _WEIGHT_FILES[name], {"format": "pt"})
