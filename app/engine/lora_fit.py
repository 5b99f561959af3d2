"""Which LoRA fits which model, settled at start-up against each model's real architecture.

A LoRA fits a model when every one of its layers names a Linear or Conv2d layer of that
model's UNet or text encoders, with matching input and output widths (and kernel, for a
convolution). That is checked here without weights and without a GPU:

- the model's architecture is built from its configs on PyTorch's meta device (no memory,
  about a second for full-size SDXL) and reduced to `{component: {layer: weight shape}}`;
  one build per distinct architecture, cached for the process;
- the LoRA file is read as diffusers reads it (kohya / A1111 names, SGM block names and
  diffusers / PEFT names all converted by diffusers' own `lora_state_dict`), but from its
  header only: every matrix becomes a meta tensor of its shape; only the scalar `alpha`
  values, which the conversion reads, come from the file.

No family is guessed from widths: a LoRA made for any architecture, tiny test models
included, is matched by its layers. The answer for each (LoRA, model) pair is stored on the
registry's LoraSpec (`fits`: None = fits, else the reason naming the first layer that does
not and both shapes), where the discovery routes and request validation read it. The LoRA
manager still checks every load against what PEFT actually holds (app.engine.loras).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from app.checkpoints import bundled_config, config_folder
from app.errors import LoraError
from app.families import Family, family_label
from app.registry import LoraSpec, ModelSpec, Registry

log = logging.getLogger(__name__)

__all__ = ["Architecture", "architecture_of", "lora_layers", "match_loras", "peft_names"]

# A LoRA matrix in a state dict as diffusers' lora_state_dict returns it (PEFT, diffusers or
# old attention-processor names) and, once renamed for PEFT, what get_peft_model_state_dict names.
FILE_MATRIX = re.compile(
    r"[._](?:lora_A|lora_B|lora[._](?:down|up)|lora_linear_layer\.(?:down|up))\.weight$"
)
PEFT_MATRIX = re.compile(r"\.lora_([AB])\.weight$")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Architecture:
    """The LoRA-targetable layers of one model: `{component: {layer path: weight shape}}`
    (Linear and Conv2d only, named as PEFT names them), and the UNet config diffusers needs
    to convert SGM block names."""

    key: str
    family: Family
    layers: Mapping[str, Mapping[str, tuple[int, ...]]]
    unet_config: Any


# --------------------------------------------------------------------------- architectures


def _layer_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def _from_configs(configs: Mapping[str, dict], family: Family, key: str) -> Architecture:
    """Build the UNet and text encoders of `configs` on the meta device and record their layers."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        layers["unet"] = _layer_shapes(unet)
        for component in ("text_encoder", "text_encoder_2"):
            if component in configs:
                config = CLIPTextConfig.from_dict(configs[component])
                with_projection = component == "text_encoder_2"
                cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
                layers[component] = _layer_shapes(cls(config))
    return Architecture(key=key, family=family, layers=layers, unet_config=unet.config)


_BUILD_LOCK = threading.Lock()


@lru_cache(maxsize=16)
def _built(key: str, family: Family) -> Architecture:
    configs = json.loads(key)
    if isinstance(configs, str):  # a builtin tiny model: built in code, in a few milliseconds
        from app.engine import tiny

        pipe = tiny.build_tiny_sdxl() if configs.endswith("sdxl") else tiny.build_tiny_sd15()
        layers = {c: _layer_shapes(getattr(pipe, c)) for c in _COMPONENTS
                  if getattr(pipe, c, None) is not None}
        return Architecture(key=key, family=family, layers=layers, unet_config=pipe.unet.config)
    return _from_configs(configs, family, key)


def _read_configs(folder: Path) -> dict[str, dict] | None:
    """unet/, text_encoder/, text_encoder_2/ config.json of a diffusers folder, or None."""
    configs = {}
    for component in _COMPONENTS:
        file = folder / component / "config.json"
        if file.is_file():
            try:
                configs[component] = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return configs if "unet" in configs and "text_encoder" in configs else None


def _hub_cache_folder(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(repo, "unet/config.json")
    except Exception:  # noqa: BLE001 - a broken cache only means "not cached"
        return None
    return Path(index).parent.parent if isinstance(index, str) else None


def _config_folder(spec: ModelSpec) -> Path | None:
    """app.checkpoints.config_folder, but a Hub model's own configs when they are cached (a
    repo need not be the stock architecture)."""
    if spec.kind == "hub":
        return _hub_cache_folder(spec.source) or config_folder(spec)
    if spec.source == "builtin:random-sdxl":
        return bundled_config("sdxl")
    return config_folder(spec)


def architecture_of(spec: ModelSpec) -> Architecture | None:
    """The model's layers, built from its configs on the meta device; None when no config
    can be found (the LoRA manager's check at load time is then the only one)."""
    if spec.kind == "builtin" and spec.source != "builtin:random-sdxl":
        key = json.dumps(spec.source)
    else:
        folder = _config_folder(spec)
        configs = _read_configs(folder) if folder else None
        if configs is None:
            return None
        if spec.kind == "single_file":  # the file's UNet input, as the loader builds it (9: inpainting)
            configs["unet"] = {**configs["unet"], "in_channels": spec.in_channels}
        key = json.dumps(configs, sort_keys=True)
    with _BUILD_LOCK:
        return _built(key, spec.family)


# --------------------------------------------------------------------------- LoRA files


def _meta_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors without their data: meta tensors of the right shape, except the
    scalars (kohya's `alpha`), which diffusers' conversion reads as numbers."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            shape = f.get_slice(key).get_shape()
            if len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
                out[key] = f.get_tensor(key)
            else:
                out[key] = torch.empty(shape, device="meta")
    return out


def peft_names(component: str, part: Mapping[str, torch.Tensor], *,
               flat_text_model: bool) -> dict[str, torch.Tensor]:
    """One component's LoRA matrices (component prefix removed) under the names PEFT gives
    them in it: the renaming diffusers applies when it loads them (UNet: load_lora_adapter;
    text encoders: _load_lora_into_text_encoder). `flat_text_model`: the text encoder has no
    `text_model` attribute (transformers 5 flattened CLIPTextModel)."""
    if not part:
        return {}
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return convert_unet_state_dict_to_peft(dict(part))
    named = convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(part)))
    if flat_text_model:
        named = {k.removeprefix("text_model."): v for k, v in named.items()}
    return named


Layers = dict[tuple[str, str], dict[str, tuple[int, ...]]]


def lora_layers(path: Path, arch: Architecture, name: str) -> Layers:
    """The LoRA's layers as PEFT would place them in `arch`'s model: `{(component, layer):
    {"A": shape, "B": shape}}`; a component of "?" holds names diffusers left unconverted.
    Raises LoraError when diffusers cannot read or convert the file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch.family == "sdxl" else StableDiffusionPipeline
    try:
        converted = cls.lora_state_dict(_meta_state_dict(path), unet_config=arch.unet_config)[0]
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for odd files
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        reason = f"unsupported format: diffusers cannot convert its layer names ({text})"
        raise LoraError(name, reason) from None
    matrices = {k: v for k, v in converted.items() if FILE_MATRIX.search(k)}
    if not matrices:
        raise LoraError(name, "not a LoRA: the file holds no LoRA weights")
    layers: Layers = {}
    claimed: set[str] = set()
    for component in _COMPONENTS:
        prefix = f"{component}."
        part = {k.removeprefix(prefix): v for k, v in matrices.items() if k.startswith(prefix)}
        claimed.update(prefix + k for k in part)
        held = arch.layers.get(component, {})
        flat = component != "unet" and not any(k.startswith("text_model.") for k in held)
        renamed = peft_names(component, part, flat_text_model=flat)
        for key, tensor in renamed.items():
            match = PEFT_MATRIX.search(key)
            if match:
                layer = key[: match.start()]
                layers.setdefault((component, layer), {})[match[1]] = tuple(tensor.shape)
    for key in matrices.keys() - claimed:
        layers.setdefault(("?", FILE_MATRIX.sub("", key)), {})
    return layers


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def misfit(layers: Mapping[tuple[str, str], Mapping[str, tuple[int, ...]]], arch: Architecture,
           model: str) -> str | None:
    """Why these LoRA layers do not fit `arch` (the first layer that does not, by name, with
    both shapes), or None when every one does."""
    where = f"model '{model}' ({family_label(arch.family)})"
    for (component, layer), matrices in sorted(layers.items()):
        label = f"{component}.{layer}" if component != "?" else layer
        held = arch.layers.get(component)
        if held is None:
            what = "text encoder" if component.startswith("text_encoder") else "part"
            return f"does not fit {where}: its layer {label} is for a {what} the model does not have"
        weight = held.get(layer)
        if weight is None:
            return f"does not fit {where}: its layer {label} matches no layer of the model"
        a, b = matrices.get("A"), matrices.get("B")
        if a is None or b is None:
            return f"is incomplete: its layer {label} lacks its LoRA {'down' if a is None else 'up'} weight"
        rank_ok = len(a) >= 2 and len(b) >= 2 and a[0] == b[1]
        fits = (
            rank_ok
            and len(a) == len(weight)
            and a[1] == weight[1]
            and b[0] == weight[0]
            and (len(weight) == 2 or tuple(a[2:]) == tuple(weight[2:]))
        )
        if not fits:
            return (
                f"does not fit {where}: layer {label} has weight {_shape(weight)} (out, in), "
                f"the LoRA's down matrix is {_shape(a)} and its up matrix {_shape(b)}"
            )
    return None


# --------------------------------------------------------------------------- the registry


def match_loras(registry: Registry) -> None:
    """Fill every usable LoRA's `fits` with each model's answer (None = fits, else why not);
    a LoRA that fits no model is logged once. A declared `family:` limits a LoRA to the models
    of that family."""
    architectures = {name: architecture_of(spec) for name, spec in registry.models.items()}
    for lora in registry.loras.values():
        if lora.error is None:
            _match(lora, registry.models, architectures)


def _match(lora: LoraSpec, models: Mapping[str, ModelSpec],
           architectures: Mapping[str, Architecture | None]) -> None:
    fits: dict[str, str | None] = {}
    read: dict[str, Any] = {}  # per architecture: the layers, or the LoraError
    for model, spec in models.items():
        arch = architectures[model]
        if lora.family is not None and spec.family != lora.family:
            fits[model] = (f"is declared an {family_label(lora.family)} LoRA in the models file and "
                           f"model '{model}' is {family_label(spec.family)}")
            continue
        if arch is None:
            continue  # unknown architecture: the check at load time decides
        key = (arch.key, arch.family)
        if key not in read:
            try:
                read[key] = lora_layers(lora.path, arch, lora.name)
            except LoraError as exc:
                read[key] = exc
            except Exception as exc:  # noqa: BLE001 - diffusers' converters raise many types
                text = " ".join(str(exc).split())[:160] or type(exc).__name__
                read[key] = LoraError(lora.name, f"its layer names cannot be converted for this "
                                                 f"architecture ({text})")
        layers = read[key]
        if isinstance(layers, LoraError):  # for this model's architecture, not for others
            fits[model] = f"does not fit model '{model}' ({family_label(spec.family)}): {layers.reason}"
            continue
        fits[model] = misfit(layers, arch, model)
    lora.fits = fits
    if fits and all(reason is not None for reason in fits.values()):
        log.warning("LoRA %r (%s) fits none of the served models, so it is listed nowhere; "
                    "for example, it %s", lora.name, lora.path, next(iter(fits.values())))
