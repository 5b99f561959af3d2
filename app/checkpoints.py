"""Single-file checkpoints on disk: what a file holds, read from its safetensors header only.

Torch-free (the registry reads every checkpoint at start-up with it, before any model loads).
A checkpoint in the original (CompVis / Stability SGM) layout is one `.safetensors` file with
the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text
encoder(s) under ``cond_stage_model.`` (SD 1.x/2.x) or ``conditioner.embedders.`` (SDXL).

Served: SD 1.x (CLIP ViT-L text encoder) and SDXL base (CLIP ViT-L + OpenCLIP bigG), each as
a text-to-image UNet (4 input channels) or a dedicated inpainting one (9: the latents, the
mask and the masked picture's latents; `CheckpointInfo.in_channels` tells the loader which);
and SDXL's refiner (one OpenCLIP bigG encoder, under ``conditioner.embedders.0.model.``, as
`sd_xl_refiner_1.0.safetensors` ships; `CheckpointInfo.refiner`), served as a refiner only
with the bundled app/configs/sdxl-refiner.
Refused with the reason, naming what was found: SD 2.x, UNets with any other
input (8: instruct-pix2pix / depth), SD3 / Flux / Stable Cascade /
other families, LoRAs, bare VAEs (usable as a model's `vae:`), diffusers-layout files, pickles
(`.ckpt`, `.pt`, `.pth`, `.bin`: never unpickled; convert them to safetensors), and
v-prediction checkpoints unless the models.yaml entry says `prediction: v`.

`config_folder(spec)` names the diffusers-format folder (model_index.json, */config.json and
tokenizers, no weights) that describes a model's architecture.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from app.errors import LoraError
from app.families import Family
from app.lora_files import SafetensorsHeader, read_header


class ModelSpecLike(Protocol):
    """What config_folder reads of app.registry.ModelSpec (which imports this module)."""

    kind: str
    source: str
    family: Family
    config: str | None
    refiner_only: bool

__all__ = [
    "BUNDLED_CONFIGS",
    "CheckpointError",
    "CheckpointInfo",
    "PICKLE_SUFFIXES",
    "REFINER_CONFIG",
    "SERVED_IN_CHANNELS",
    "bundled_config",
    "config_folder",
    "inspect_checkpoint",
    "inspect_vae",
    "is_refiner",
    "read_checkpoint_header",
    "unet_in_channels",
]

BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"
CHECKPOINT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_1 = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
REFINER_TEXT = "conditioner.embedders.0.model."

# Keys original checkpoints carry that no diffusers module holds: the training noise schedule,
# EMA copies, CLIP's position ids, OpenCLIP's logit scale, marker tensors of v-prediction
# models. The loader skips these; any other unused tensor is an error.
_IGNORED = re.compile(
    r"^(?:alphas_cumprod(?:_prev)?|betas|log_one_minus_alphas_cumprod|logvar|posterior_\w+"
    r"|sqrt_\w+|model_ema\..*|denoiser\..*|v_pred|ztsnr|.*\.position_ids"
    r"|.*\.logit_scale|.*\.attn_mask|first_stage_model\.loss\..*)$"
)


class CheckpointError(Exception):
    """The file cannot be served; `reason` says why and what was found."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CheckpointInfo:
    family: Family
    prediction: Literal["epsilon", "v"]  # what the file says (v: v_pred key or metadata)
    zero_terminal_snr: bool  # the file carries a `ztsnr` marker
    header: SafetensorsHeader
    in_channels: int = 4  # the UNet's input channels: 4 text-to-image, 9 inpainting
    refiner: bool = False  # SDXL's refiner: one OpenCLIP bigG text encoder, no CLIP ViT-L


# The UNet inputs served: 4 latent channels (text to image), 9 (inpainting: + mask + masked picture)
SERVED_IN_CHANNELS = frozenset({4, 9})


def is_ignored_key(key: str) -> bool:
    return bool(_IGNORED.match(key))


def read_checkpoint_header(path: Path | str) -> SafetensorsHeader:
    """The validated safetensors header; CheckpointError for a missing, unreadable, truncated
    or non-safetensors file (pickles are refused by name, never opened)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is a pickle checkpoint ({path.suffix}); pickles can run code when "
            "loaded and are not opened. Convert it to .safetensors (e.g. with diffusers' or "
            "A1111's converter on a trusted machine) and point models.yaml at that"
        )
    try:
        return read_header(path, name=path.stem)
    except LoraError as exc:
        reason = exc.reason.replace("the LoRA file", "the checkpoint").replace("the LoRA path", "the path")
        raise CheckpointError(reason) from None


def _count(keys: tuple[str, ...], prefix: str) -> int:
    return sum(1 for k in keys if k.startswith(prefix))


def _other_family(keys: tuple[str, ...]) -> str | None:
    """A family that is not SD 1.x / SDXL, named from keys only it has."""
    joined = "\n".join(keys)
    checks = (
        (r"(?m)^(?:model\.diffusion_model\.)?joint_blocks\.", "Stable Diffusion 3"),
        (r"(?m)^(?:model\.diffusion_model\.)?(?:double_blocks|single_blocks)\.", "Flux"),
        (r"(?m)^(?:model\.diffusion_model\.)?(?:transformer_blocks\.\d+\.attn\.add_q_proj|"
         r"single_transformer_blocks\.)", "Flux (diffusers layout)"),
        (r"(?m)clip_txt_(?:pooled_)?mapper\.", "Stable Cascade"),
        (r"(?m)^(?:model\.diffusion_model\.)?(?:blocks\.\d+\.cross_attn|x_embedder\.|t_embedder\.)",
         "a DiT model (PixArt / Hunyuan / other transformer family)"),
    )
    for pattern, name in checks:
        if re.search(pattern, joined):
            return name
    return None


def _looks_like_lora(keys: tuple[str, ...]) -> bool:
    return any(re.search(r"(?:lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up)\b", k) for k in keys)


def _is_vae(keys: tuple[str, ...]) -> bool:
    stripped = [k.removeprefix(VAE) for k in keys]
    return bool(stripped) and all(
        k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) or is_ignored_key(k)
        for k in stripped
    )


def _first(keys: tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _declared_v(header: SafetensorsHeader) -> tuple[bool, str]:
    if "v_pred" in header.keys:
        return True, "a `v_pred` marker tensor"
    for key in ("modelspec.prediction_type", "prediction_type"):
        value = header.metadata.get(key, "").lower()
        if value.startswith("v"):
            return True, f"metadata {key}={value!r}"
    return False, ""


def classify(header: SafetensorsHeader, label: str) -> tuple[Family, str]:
    """The served family and a short description of the evidence; CheckpointError otherwise."""
    keys = header.keys
    other = _other_family(keys)
    if other:
        raise CheckpointError(
            f"{label} is a {other} checkpoint; craftserve serves SDXL (base and refiner) and SD 1.x")
    if _looks_like_lora(keys):
        raise CheckpointError(
            f"{label} is a LoRA ({_first([k for k in keys if 'lora' in k])}), not a model; "
            "list it under `loras:` (or put it in a `lora_dirs:` folder)"
        )
    if _is_vae(keys):
        raise CheckpointError(
            f"{label} is a bare VAE ({len(keys)} encoder/decoder tensors), not a model; "
            "use it as a model's `vae:`"
        )
    unet = _count(keys, UNET)
    if not unet:
        if any(k.startswith(("down_blocks.", "unet.", "mid_block.")) for k in keys):
            raise CheckpointError(
                f"{label} holds diffusers-layout weights ({_first(keys)}), not an original-layout "
                "checkpoint; save the pipeline as a diffusers folder and use that as `source:`"
            )
        raise CheckpointError(
            f"{label} is not a Stable Diffusion checkpoint: none of its {len(keys)} tensors is "
            f"under model.diffusion_model. (found {_first(keys)})"
        )
    conv_in = header.shapes.get(UNET + "input_blocks.0.0.weight", ())
    if len(conv_in) != 4:
        raise CheckpointError(f"{label}: its UNet has no input convolution (input_blocks.0.0.weight)")
    if conv_in[1] not in SERVED_IN_CHANNELS:
        kind = {8: "an instruct-pix2pix / depth"}.get(conv_in[1], "an unknown kind of")
        raise CheckpointError(
            f"{label} is {kind} checkpoint: its UNet takes {conv_in[1]} input channels, "
            "text-to-image models take 4 and inpainting ones 9; craftserve serves those two"
        )
    refiner = is_refiner(header)
    if refiner and conv_in[1] != 4:
        raise CheckpointError(
            f"{label} is an SDXL refiner whose UNet takes {conv_in[1]} input channels; "
            "the refiner craftserve serves takes 4"
        )
    if _count(keys, SD2_TEXT):
        raise CheckpointError(
            f"{label} is an SD 2.x checkpoint (OpenCLIP ViT-H text encoder under {SD2_TEXT}); "
            "craftserve serves SDXL and SD 1.x"
        )
    if _count(keys, SDXL_TEXT_1) and _count(keys, SDXL_TEXT_2):
        family: Family = "sdxl"
        evidence = "SDXL base: CLIP ViT-L + OpenCLIP bigG text encoders"
    elif refiner:
        family = "sdxl"
        evidence = f"SDXL refiner: one OpenCLIP bigG text encoder under {REFINER_TEXT}"
    elif _count(keys, SD1_TEXT):
        family = "sd15"
        evidence = "SD 1.x: CLIP ViT-L text encoder"
    elif _count(keys, "conditioner.embedders."):
        found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")})
        raise CheckpointError(
            f"{label} has SGM text encoders craftserve does not know ({', '.join(found[:4])}); "
            "SDXL base has conditioner.embedders.0.transformer and conditioner.embedders.1.model, "
            "SDXL's refiner conditioner.embedders.0.model alone"
        )
    else:
        raise CheckpointError(
            f"{label} holds a UNet but no text encoder (no cond_stage_model. or "
            "conditioner.embedders. tensors); use a full checkpoint"
        )
    if not _count(keys, VAE):
        raise CheckpointError(f"{label} has no VAE (no first_stage_model. tensors); use a full checkpoint")
    if conv_in[1] == 9:
        evidence += ", inpainting (9-channel UNet)"
    return family, evidence


def is_refiner(header: SafetensorsHeader) -> bool:
    """SDXL's refiner layout: its one text encoder (OpenCLIP bigG) is SGM's embedder 0, under
    conditioner.embedders.0.model. (diffusers' single-file loader tells it by a tensor there,
    conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias), and there is no
    CLIP ViT-L (the base's embedder 0, under conditioner.embedders.0.transformer.) nor a
    second embedder."""
    keys = header.keys
    return bool(_count(keys, REFINER_TEXT) and not _count(keys, SDXL_TEXT_1)
                and not _count(keys, "conditioner.embedders.1."))


def unet_in_channels(header: SafetensorsHeader) -> int:
    """The input channels of the file's UNet (its first convolution), 0 if it has none."""
    conv_in = header.shapes.get(UNET + "input_blocks.0.0.weight", ())
    return int(conv_in[1]) if len(conv_in) == 4 else 0


def inspect_checkpoint(
    path: Path | str, *, prediction: Literal["epsilon", "v"] = "epsilon"
) -> CheckpointInfo:
    """What a single-file checkpoint is, from its header; CheckpointError with the reason when
    it cannot be served (with the models.yaml entry's declared `prediction`)."""
    path = Path(path)
    header = read_checkpoint_header(path)
    family, _ = classify(header, path.name)
    is_v, why = _declared_v(header)
    if is_v and prediction != "v":
        raise CheckpointError(
            f"{path.name} is a v-prediction checkpoint ({why}); add `prediction: v` to its "
            "models.yaml entry to serve it as one"
        )
    return CheckpointInfo(
        family=family,
        prediction="v" if is_v or prediction == "v" else "epsilon",
        zero_terminal_snr="ztsnr" in header.keys,
        header=header,
        in_channels=unet_in_channels(header),
        refiner=is_refiner(header),
    )


def inspect_vae(path: Path | str) -> SafetensorsHeader:
    """The header of a single-file VAE (original layout, bare or under first_stage_model., or
    diffusers layout); CheckpointError naming what the file is otherwise."""
    path = Path(path)
    header = read_checkpoint_header(path)
    if _is_vae(header.keys):
        return header
    try:
        family, _ = classify(header, path.name)
    except CheckpointError as exc:
        raise CheckpointError(f"not a VAE: {exc.reason}") from None
    raise CheckpointError(
        f"{path.name} is a whole {family} checkpoint, not a VAE; use it as a model's `source:`"
    )


# --------------------------------------------------------------------------- config folders


# SDXL 1.0 refiner's architecture (stabilityai/stable-diffusion-xl-refiner-1.0): its UNet,
# and the base's VAE, OpenCLIP bigG encoder, tokenizer 2 and scheduler configs
REFINER_CONFIG = "sdxl-refiner"


def bundled_config(family: Family, refiner: bool = False) -> Path:
    return BUNDLED_CONFIGS / (REFINER_CONFIG if refiner else family)


def config_family(folder: Path | str) -> Family | None:
    """The family a diffusers-format folder's model_index.json names, None if it names none."""
    from app.families import PIPELINE_FAMILIES

    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return PIPELINE_FAMILIES.get(index.get("_class_name")) if isinstance(index, Mapping) else None


def config_folder(spec: ModelSpecLike) -> Path | None:
    """The diffusers-format folder whose */config.json files describe `spec`'s architecture:
    the entry's `config:` or the bundled app/configs/<family> (sdxl-refiner for SDXL's refiner)
    for a single file, the folder
    itself for a local diffusers model, the bundled one for a Hub repo, None for builtins."""
    if spec.kind == "single_file":
        return Path(spec.config) if spec.config else bundled_config(spec.family, spec.refiner_only)
    if spec.kind == "local":
        return Path(spec.source)
    if spec.kind == "hub":
        return bundled_config(spec.family, spec.refiner_only)
    return None
