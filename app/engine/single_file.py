"""Loading single-file checkpoints in the original layout, offline, with every tensor accounted for.

No Hub function is called: the architecture comes from a diffusers-format config folder
(app.checkpoints.config_folder: the entry's `config:` or the bundled app/configs/<family>,
app/configs/sdxl-refiner for SDXL's refiner, which loads as its image-to-image pipeline without
a first text encoder), but for the UNet's input channels, read from the file (a dedicated
inpainting checkpoint, 9 channels, gets the family's inpainting pipeline); the modules are
built on the meta device (no memory, no random init), and each parameter is read from the
file by its original name. The name mapping (diffusers name -> original name) is derived here
from the UNet/VAE configs, so it holds for any depth and width, tiny or full.

Every tensor must land: the load fails, naming the tensors, when a module parameter has no
tensor in the file, when a shape differs, or when a tensor of the file is used by no module
(other than the known extras: noise-schedule buffers, EMA copies, position ids, OpenCLIP's
logit scale; app.checkpoints.is_ignored_key). The SDXL text encoders are told apart by their
key prefixes, never by width, so two encoders of one width cannot swap or duplicate weights.

The file is mapped copy-on-write and read in file order: a tensor already in the serving dtype
stays a view of the file's pages (no copy; read when first used, as diffusers' folder loads do),
one in another dtype is converted and its pages handed back at once. The peak memory is about
the model at the serving dtype (scripts/bench_load.py measures it). Like a diffusers folder,
the file must not be rewritten in place while it is served (delete or rename it instead).
"""

from __future__ import annotations

import json
import logging
import mmap
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.checkpoints import (
    REFINER_TEXT,
    SD1_TEXT,
    SDXL_TEXT_1,
    SDXL_TEXT_2,
    UNET,
    VAE,
    CheckpointError,
    config_folder,
    inspect_checkpoint,
    inspect_vae,
    is_ignored_key,
)
from app.registry import ModelSpec

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class SingleFileError(Exception):
    """The checkpoint does not fit its config folder, or cannot be read; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- key mapping
# A source is (original key, how): "copy" (same values; a shape that differs only by
# trailing 1s, VAE attention 1x1 convs vs linears, is reshaped), ("slice", i) (the i-th third
# of a fused q/k/v tensor), or "transpose".
Source = tuple[str, Any]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_mapper(config: dict[str, Any]) -> Callable[[str], str]:
    """diffusers UNet2DConditionModel parameter name -> its name in an SGM/CompVis UNet."""
    per = config["layers_per_block"]
    per = per if isinstance(per, int) else per[0]
    up_attn = ["CrossAttn" in t for t in config.get("up_block_types", ())]  # (a ControlNet has none)
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def mapper(name: str) -> str:
        for prefix, target in fixed.items():
            if name.startswith(prefix + "."):
                return target + name[len(prefix):]
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", name)
        if m:
            level, part, index, rest = int(m[1]), m[2], int(m[3]), m[4]
            if part == "downsamplers":
                return f"input_blocks.{(per + 1) * (level + 1)}.0.{rest.replace('conv.', 'op.', 1)}"
            block = (per + 1) * level + index + 1
            if part == "resnets":
                return f"input_blocks.{block}.0.{_resnet(rest)}"
            return f"input_blocks.{block}.1.{rest}"
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
        if m:
            if m[1] == "attentions":
                return f"middle_block.1.{m[3]}"
            return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", name)
        if m:
            level, part, index, rest = int(m[1]), m[2], int(m[3]), m[4]
            if part == "upsamplers":
                return f"output_blocks.{(per + 1) * level + per}.{2 if up_attn[level] else 1}.{rest}"
            block = (per + 1) * level + index
            if part == "resnets":
                return f"output_blocks.{block}.0.{_resnet(rest)}"
            return f"output_blocks.{block}.1.{rest}"
        raise SingleFileError(f"no original-layout name known for UNet parameter {name}")

    return mapper


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_mapper(config: dict[str, Any]) -> Callable[[str], str]:
    """diffusers AutoencoderKL parameter name -> its name in a CompVis VAE (no prefix)."""
    levels = len(config["block_out_channels"])

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut.", "nin_shortcut.", 1)

    def mapper(name: str) -> str:
        side, _, rest = name.partition(".")
        if side not in ("encoder", "decoder"):
            return name  # quant_conv, post_quant_conv
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
        if m:
            level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
            if m[3] == "resnets":
                return f"{side}.{m[1]}.{level}.block.{m[4]}.{resnet(m[5])}"
            return f"{side}.{m[1]}.{level}.{m[1]}sample.{m[5]}"
        m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            return f"{side}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}"
        m = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest)
        if m:
            return f"{side}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}"
        if rest.startswith("conv_norm_out."):
            return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
        return name  # conv_in, conv_out

    return mapper


_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_name(name: str) -> str:
    """A CLIP text model's parameter name as checkpoints spell it: transformers 5's
    CLIPTextModel drops the `text_model.` level its saved files (and original checkpoints) have."""
    if name.startswith(("text_model.", "text_projection.")):
        return name
    return "text_model." + name


def openclip_source(name: str) -> Source:
    """transformers CLIPTextModelWithProjection name -> OpenCLIP text tower name (no prefix)."""
    name = clip_name(name)
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding"}
    if name in fixed:
        return fixed[name], "copy"
    if name == "text_projection.weight":
        return "text_projection", "transpose"
    if name.startswith("text_model.final_layer_norm."):
        return "ln_final." + name.rsplit(".", 1)[1], "copy"
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        layer, part, kind = m[1], m[2], m[3]
        proj = re.fullmatch(r"self_attn\.([qkv])_proj", part)
        if proj:
            return f"transformer.resblocks.{layer}.attn.in_proj_{kind}", ("slice", "qkv".index(proj[1]))
        if part in _OPENCLIP:
            return f"transformer.resblocks.{layer}.{_OPENCLIP[part]}.{kind}", "copy"
    raise SingleFileError(f"no OpenCLIP name known for text encoder parameter {name}")


# --------------------------------------------------------------------------- reading


class _File:
    """A safetensors file mapped copy-on-write (MAP_PRIVATE): a tensor whose dtype is the
    serving dtype stays backed by the file's pages (no copy, read on first use, as diffusers'
    own loads do), and writing to it never reaches the file. Tensors converted to another
    dtype are copied, and their pages handed back to the kernel at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, struct.error) as exc:
            raise SingleFileError(f"the checkpoint cannot be read ({exc})") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > len(self.map):  # changed since its header was checked
            self.map.close()
            raise SingleFileError("the checkpoint is truncated")
        self.used: set[str] = set()

    def shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.entries.get(key)
        return tuple(entry["shape"]) if entry else None

    def offset(self, key: str) -> int:
        return self.entries[key]["data_offsets"][0]

    def read(self, key: str) -> torch.Tensor:
        """The tensor as a view of the mapped file (no copy)."""
        entry = self.entries[key]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SingleFileError(f"tensor {key} has dtype {entry['dtype']}, which is not loaded")
        begin, end = entry["data_offsets"]
        self.used.add(key)
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        raw = torch.frombuffer(self.map, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        return raw.view(dtype).reshape(entry["shape"])

    def release(self, key: str) -> None:
        """Unmap the whole pages of a tensor that was copied (they would count in the RSS)."""
        begin, end = self.entries[key]["data_offsets"]
        page = mmap.PAGESIZE
        first = -(-(self.data_start + begin) // page) * page
        last = (self.data_start + end) // page * page
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        # Never map.close(): tensors viewing the file hold the mapping (torch.frombuffer keeps
        # a reference, not a buffer export, so close() would unmap memory still in use). It is
        # unmapped when the last of them goes.
        del self.map


def _fit(key: str, tensor: torch.Tensor, how: Any, target: torch.Tensor) -> torch.Tensor:
    if how == "transpose":
        tensor = tensor.t()
    elif isinstance(how, tuple):  # ("slice", i) of a fused q/k/v
        third = tensor.shape[0] // 3
        tensor = tensor[how[1] * third:(how[1] + 1) * third]
    if tuple(tensor.shape) != tuple(target.shape):
        if tensor.numel() == target.numel() and [d for d in tensor.shape if d != 1] == [
            d for d in target.shape if d != 1
        ]:
            tensor = tensor.reshape(target.shape)
        else:
            raise SingleFileError(
                f"tensor {key} has shape {list(tensor.shape)} where the config folder's "
                f"architecture needs {list(target.shape)}; the config does not describe this checkpoint"
            )
    return tensor


def _fill(module: nn.Module, file: _File, source: Callable[[str], Source], dtype: torch.dtype,
          label: str) -> nn.Module:
    """Give every parameter of a meta-device `module` its tensor from `file`."""
    state = module.state_dict()
    plan = [(name, *source(name)) for name in state if not name.endswith("position_ids")]
    missing = [key for _, key, _ in plan if file.shape(key) is None]
    if missing:
        raise SingleFileError(
            f"the {label} needs {len(missing)} tensors the checkpoint lacks, e.g. {', '.join(missing[:3])}; "
            "the checkpoint is incomplete or the config folder does not describe it"
        )
    # In file order: jumping around a file not in the page cache defeats the kernel's
    # read-ahead (measured: 4x slower on a cold 2 GB file).
    plan.sort(key=lambda item: file.offset(item[1]))
    users: dict[str, list[tuple[str, Any]]] = {}  # a fused q/k/v tensor serves three parameters
    for name, key, how in plan:
        users.setdefault(key, []).append((name, how))
    loaded: dict[str, torch.Tensor] = {}
    for key, fits in users.items():
        raw = file.read(key)
        copied = True
        for name, how in fits:
            target = state[name]
            tensor = _fit(key, raw, how, target)
            kind = dtype if target.is_floating_point() else target.dtype
            # a slice would pin the fused whole; a transposed view (OpenCLIP's text_projection)
            # would run the projection through another, non-contiguous GEMM path: a diffusers
            # folder of the same weights computes other last bits
            copy = tensor.dtype != kind or isinstance(how, tuple) or how == "transpose"
            loaded[name] = tensor.to(kind, copy=True).contiguous() if copy else tensor
            copied = copied and copy
        del raw, tensor
        if copied:
            file.release(key)
    for name in [n for n in state if n.endswith("position_ids")]:
        loaded[name] = torch.arange(state[name].shape[-1]).expand(state[name].shape).clone()
    module.load_state_dict(loaded, strict=True, assign=True)
    for owner in module.modules():  # non-persistent buffers (CLIP's position ids)
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None and buffer.is_meta and name == "position_ids":
                owner._buffers[name] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise SingleFileError(f"the {label} has tensors left without values: {', '.join(on_meta[:3])}")
    module.eval()
    module.requires_grad_(False)
    return module


def _check_all_used(file: _File) -> None:
    unused = sorted(k for k in file.entries if k not in file.used and not is_ignored_key(k))
    if unused:
        raise SingleFileError(
            f"{len(unused)} tensors of the checkpoint belong to no module of the configured "
            f"architecture, e.g. {', '.join(unused[:3])}; the config folder does not describe "
            "this checkpoint (or the file mixes in foreign weights)"
        )


# --------------------------------------------------------------------------- building


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SingleFileError(f"config file {path} cannot be read ({exc})") from None


def _meta_unet(folder: Path, in_channels: int | None = None):
    """The config folder's UNet on the meta device; `in_channels` (the file's) overrides the
    config's, so one folder describes a family's text-to-image and inpainting checkpoints."""
    from diffusers import UNet2DConditionModel

    config = _json(folder / "unet" / "config.json")
    if in_channels:
        config["in_channels"] = in_channels
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config), config


def _meta_vae(folder: Path):
    from diffusers import AutoencoderKL

    config = _json(folder / "vae" / "config.json")
    with torch.device("meta"):
        return AutoencoderKL.from_config(config), config


def _meta_text_encoder(folder: Path, name: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = _json(folder / name / "config.json")
    # SDXL's second encoder is the projected one even where the config does not say so
    default = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
    architecture = (config.pop("architectures", None) or [default])[0]
    cls = CLIPTextModelWithProjection if architecture.endswith("WithProjection") else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**config))


def _tokenizer(folder: Path, name: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder / name), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the folder is not a tokenizer
        raise SingleFileError(f"tokenizer {folder / name} cannot be loaded ({exc})") from None


def _scheduler(folder: Path, spec: ModelSpec):
    import diffusers

    config = _json(folder / "scheduler" / "scheduler_config.json")
    cls = getattr(diffusers, config.get("_class_name", ""), None) or diffusers.EulerDiscreteScheduler
    options: dict[str, Any] = {}
    if spec.prediction == "v":
        options["prediction_type"] = "v_prediction"
        if spec.zero_terminal_snr:
            options.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cls.from_config(config, **options)


def _prefixed(prefix: str, mapper: Callable[[str], str]) -> Callable[[str], Source]:
    return lambda name: (prefix + mapper(name), "copy")


def _vae_layout(file: _File) -> tuple[str, str]:
    """The mapper for a VAE in the file: original (bare or prefixed) or diffusers layout."""
    keys = file.entries
    if any(k.startswith(VAE) for k in keys):
        return "original", VAE
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
        return "diffusers", ""
    return "original", ""


def _build_vae(file: _File, folder: Path, dtype: torch.dtype):
    vae, config = _meta_vae(folder)
    layout, prefix = _vae_layout(file)
    mapper = vae_mapper(config) if layout == "original" else (lambda name: name)
    return _fill(vae, file, _prefixed(prefix, mapper), dtype, "VAE")


def _openclip_bigg(prefix: str) -> Callable[[str], Source]:
    return lambda name: (prefix + openclip_source(name)[0], openclip_source(name)[1])


def load_single_file(spec: ModelSpec, dtype: torch.dtype) -> Any:
    """The pipeline of a single-file checkpoint, on the CPU in `dtype`: the family's
    text-to-image pipeline, its inpainting pipeline for a 9-channel (inpainting) UNet, or for
    SDXL's refiner its image-to-image pipeline without a first text encoder (as
    stabilityai/stable-diffusion-xl-refiner-1.0's folder loads). Raises SingleFileError (or
    CheckpointError, for a file that changed since start-up) with the reason."""
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    path = Path(spec.source)
    info = inspect_checkpoint(path, prediction=spec.prediction)
    if info.family != spec.family:
        raise CheckpointError(f"the file is now a {info.family} checkpoint, registered as {spec.family}")
    if info.in_channels != spec.in_channels:
        raise CheckpointError(f"the file's UNet now takes {info.in_channels} input channels, registered "
                              f"with {spec.in_channels}; reload the models file")
    if info.refiner != spec.refiner_only:
        raise CheckpointError(f"the file is {'now' if info.refiner else 'no longer'} SDXL's refiner; "
                              "reload the models file")
    folder = config_folder(spec)
    assert folder is not None
    file = _File(path)
    try:
        unet, unet_config = _meta_unet(folder, info.in_channels)
        inpainting = info.in_channels == 9
        parts: dict[str, Any] = {
            "unet": _fill(unet, file, _prefixed(UNET, unet_mapper(unet_config)), dtype, "UNet"),
            "vae": _build_vae(file, folder, dtype),
            "scheduler": _scheduler(folder, spec),
        }
        if info.refiner:  # one encoder, OpenCLIP bigG, as SGM's embedder 0
            parts["text_encoder_2"] = _fill(
                _meta_text_encoder(folder, "text_encoder_2"), file, _openclip_bigg(REFINER_TEXT),
                dtype, "text encoder (OpenCLIP bigG)")
            parts["tokenizer_2"] = _tokenizer(folder, "tokenizer_2")
            _check_all_used(file)
            index = _json(folder / "model_index.json")
            return StableDiffusionXLImg2ImgPipeline(
                **parts, text_encoder=None, tokenizer=None,
                requires_aesthetics_score=bool(index.get("requires_aesthetics_score", True)),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
        parts["tokenizer"] = _tokenizer(folder, "tokenizer")
        if spec.family == "sdxl":
            parts["text_encoder"] = _fill(
                _meta_text_encoder(folder, "text_encoder"), file,
                _prefixed(SDXL_TEXT_1, clip_name), dtype, "text encoder (CLIP ViT-L)")
            parts["text_encoder_2"] = _fill(
                _meta_text_encoder(folder, "text_encoder_2"), file, _openclip_bigg(SDXL_TEXT_2),
                dtype, "text encoder 2 (OpenCLIP bigG)")
            parts["tokenizer_2"] = _tokenizer(folder, "tokenizer_2")
            _check_all_used(file)
            if inpainting:  # as diffusers' own SDXL inpainting model folder configures it
                return StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False)
            return StableDiffusionXLPipeline(**parts)
        parts["text_encoder"] = _fill(_meta_text_encoder(folder, "text_encoder"), file,
                                      _prefixed(SD1_TEXT, clip_name), dtype, "text encoder (CLIP ViT-L)")
        _check_all_used(file)
        cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    finally:
        file.close()


def load_vae_file(path: Path | str, folder: Path, dtype: torch.dtype) -> Any:
    """A single-file VAE with the architecture and scaling factor of `folder`'s vae/config.json
    (the model's family: SDXL's 0.13025, SD 1.x's 0.18215; the file cannot tell them apart)."""
    path = Path(path)
    inspect_vae(path)
    file = _File(path)
    try:
        vae = _build_vae(file, folder, dtype)
        _check_all_used(file)
        return vae
    finally:
        file.close()
