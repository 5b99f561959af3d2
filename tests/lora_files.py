"""Write tiny LoRA files for the tiny pipelines of `app.engine.tiny`, in real-world formats.

The writers never touch the pipeline they are given: the layer names and shapes come from
PEFT injected into deep copies of its UNet and text encoders, the values from a seeded
generator. For the same pipeline, rank, seed and strength, `write_peft_lora` and
`write_kohya_lora` hold the very same numbers, so the two files must give the same image:
that checks diffusers' kohya conversion, alphas included.

- `write_peft_lora`: the diffusers/PEFT layout (`unet.<module>.lora_A.weight`,
  `text_encoder.<module>.lora_B.weight`, `text_encoder_2.` for SDXL), saved with the
  pipeline class's own `save_lora_weights`, optionally with diffusers' adapter metadata.
- `write_kohya_lora`: the kohya-ss / A1111 layout (`lora_unet_<module>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; text encoders as `lora_te_` for SD 1.x and `lora_te1_` /
  `lora_te2_` for SDXL). UNet modules are named the diffusers way (what kohya writes for
  SD 1.x) or the SGM way (`input_blocks_4_1_...`, what kohya writes for SDXL).
- `write_loha_lora`: a LyCORIS LoHa file (kohya prefixes, `hada_w1_a`...), which diffusers
  cannot load for Stable Diffusion pipelines.
- `write_garbage_lora`, `write_non_lora_safetensors`: files that are not LoRAs.
"""

from __future__ import annotations

import copy
import re
import weakref
from pathlib import Path
from typing import Literal

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# One LoRA layer: the PEFT module path in its component, lora_A (rank x in), lora_B (out x rank).
_Layer = tuple[str, torch.Tensor, torch.Tensor]


def _text_encoders(pipe) -> list[tuple[str, torch.nn.Module]]:
    names = ["text_encoder", "text_encoder_2"]
    return [(n, getattr(pipe, n)) for n in names if getattr(pipe, n, None) is not None]


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _peft_layer_shapes(model: torch.nn.Module, targets: tuple[str, ...], rank: int):
    """(module path, lora_A shape, lora_B shape) for every targeted layer, named by PEFT."""
    known = _SHAPES.setdefault(model, {})
    if (targets, rank) not in known:
        known[targets, rank] = _discover_layer_shapes(model, targets, rank)
    return known[targets, rank]


def _discover_layer_shapes(model: torch.nn.Module, targets: tuple[str, ...], rank: int):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    clone = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    inject_adapter_in_model(config, clone)
    state = get_peft_model_state_dict(clone)
    shapes = []
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            shapes.append((module, tuple(state[key].shape), tuple(state[f"{module}.lora_B.weight"].shape)))
    del clone
    return shapes


def random_lora_layers(
    pipe, *, rank: int = 4, seed: int = 0, text_encoder: bool = True, strength: float = 1.0
) -> dict[str, list[_Layer]]:
    """Seeded random LoRA weights for `pipe`, per component ("unet", "text_encoder", ...).

    lora_B is non-zero (PEFT would start it at zero, a LoRA that changes nothing); `strength`
    scales it. The default visibly changes a 64x64 image of the tiny pipelines.
    """
    gen = torch.Generator().manual_seed(seed)
    components: list[tuple[str, torch.nn.Module, tuple[str, ...]]] = [("unet", pipe.unet, UNET_TARGETS)]
    if text_encoder:
        components += [(name, model, TEXT_TARGETS) for name, model in _text_encoders(pipe)]
    layers: dict[str, list[_Layer]] = {}
    for name, model, targets in components:
        found = []
        for module, a_shape, b_shape in _peft_layer_shapes(model, targets, rank):
            if name != "unet" and not module.startswith("text_model."):
                # transformers 5 flattens CLIPTextModel; LoRA files in the wild name its
                # layers `text_model.encoder...` (diffusers strips the prefix when loading).
                module = f"text_model.{module}"
            a = torch.randn(a_shape, generator=gen) / a_shape[1] ** 0.5
            b = torch.randn(b_shape, generator=gen) * strength
            found.append((module, a.contiguous(), b.contiguous()))
        layers[name] = found
    return layers


def write_peft_lora(
    pipe,
    path: Path | str,
    *,
    rank: int = 4,
    seed: int = 0,
    text_encoder: bool = True,
    strength: float = 1.0,
    alpha: float | None = None,
) -> Path:
    """Write a diffusers/PEFT-format LoRA for `pipe` (SDXL or SD 1.x) to `path`.

    With `alpha`, the file carries diffusers' LoRA adapter metadata (the LoraConfig: rank,
    lora_alpha, target modules, as diffusers' training scripts save it) and lora_B is multiplied
    by rank/alpha, so the effective weights equal those without `alpha` (and the kohya file's
    with the same seed): an image that differs means the metadata was not used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = random_lora_layers(pipe, rank=rank, seed=seed, text_encoder=text_encoder, strength=strength)
    kwargs = {}
    for component, found in layers.items():
        state = {}
        for module, a, b in found:
            state[f"{module}.lora_A.weight"] = a
            state[f"{module}.lora_B.weight"] = b if alpha is None else (b * (rank / alpha)).contiguous()
        kwargs[f"{component}_lora_layers"] = state
        if alpha is not None:
            targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
            kwargs[f"{component}_lora_adapter_metadata"] = {
                "r": rank,
                "lora_alpha": float(alpha),
                "target_modules": list(targets),
            }
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def _sgm_unet_name(module: str, layers_per_block: int) -> str:
    """diffusers UNet attention path -> the SGM/LDM path kohya uses for SDXL."""
    step = layers_per_block + 1
    match = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if match:
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + block * step + layer}.1.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if match:
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{block * step + layer}.1.{rest}"
    match = re.match(r"mid_block\.attentions\.0\.(.*)", module)
    if match:
        return f"middle_block.1.{match[1]}"
    raise ValueError(f"no SGM name for {module}")


def write_kohya_lora(
    pipe,
    path: Path | str,
    *,
    rank: int = 4,
    seed: int = 0,
    text_encoder: bool = True,
    strength: float = 1.0,
    alpha: float | None = None,
    unet_naming: Literal["auto", "diffusers", "sgm"] = "auto",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a kohya-ss/A1111-format LoRA for `pipe` to `path`.

    `alpha` (default: the rank) is stored per layer; lora_up is multiplied by rank/alpha so the
    effective weights, and the image, equal `write_peft_lora`'s for the same seed.
    `unet_naming="auto"` uses SGM names for SDXL and diffusers names for SD 1.x, as kohya does.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sdxl = _is_sdxl(pipe)
    if unet_naming == "auto":
        unet_naming = "sgm" if sdxl else "diffusers"
    alpha = float(rank if alpha is None else alpha)
    layers = random_lora_layers(pipe, rank=rank, seed=seed, text_encoder=text_encoder, strength=strength)
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    lpb = pipe.unet.config.layers_per_block
    state: dict[str, torch.Tensor] = {}
    for component, found in layers.items():
        for module, a, b in found:
            if component == "unet" and unet_naming == "sgm":
                module = _sgm_unet_name(module, lpb)
            name = prefixes[component] + module.replace(".", "_")
            state[f"{name}.lora_down.weight"] = a
            state[f"{name}.lora_up.weight"] = (b * (rank / alpha)).contiguous()
            state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata=metadata)
    return path


def write_loha_lora(pipe, path: Path | str, *, rank: int = 4, seed: int = 0) -> Path:
    """A LyCORIS LoHa file with kohya prefixes (a format diffusers does not load for SD)."""
    from safetensors.torch import save_file

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, a_shape, b_shape in _peft_layer_shapes(pipe.unet, UNET_TARGETS, rank):
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.hada_w1_a"] = torch.randn(b_shape, generator=gen)
        state[f"{name}.hada_w1_b"] = torch.randn(a_shape, generator=gen)
        state[f"{name}.hada_w2_a"] = torch.randn(b_shape, generator=gen)
        state[f"{name}.hada_w2_b"] = torch.randn(a_shape, generator=gen)
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def write_garbage_lora(path: Path | str) -> Path:
    """A `.safetensors` file that is not a safetensors file."""
    path = Path(path)
    path.write_bytes(b"\x13\x37 this is not a safetensors file " * 8)
    return path


def write_non_lora_safetensors(path: Path | str) -> Path:
    """A valid safetensors file without any LoRA weights (a tiny plain checkpoint)."""
    from safetensors.torch import save_file

    path = Path(path)
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            "model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3, generator=gen),
            "model.diffusion_model.out.2.bias": torch.zeros(4),
        },
        str(path),
    )
    return path
