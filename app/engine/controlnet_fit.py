"""Which ControlNet fits which model, from their real layer shapes (no weights, no GPU).

A ControlNet is a copy of a UNet's encoder: it fits a model when each of its Linear and
Conv2d layers that mirror the UNet (conv_in, the time and added embeddings, the down blocks,
the middle block) names a layer of the model's UNet with the same weight shape. The model's
UNet layers come from app.engine.lora_fit's meta-device build; the ControlNet's from its
file's header. So an SDXL ControlNet on an SD 1.5 model is refused naming the first layer
whose shapes differ, and a tiny test ControlNet fits the tiny model it was made from.
A file in the original (LDM) layout is compared with the UNet's layers under their original
names (app.engine.single_file's mapping, from the model's UNet config).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from app.controlnet_files import LDM
from app.engine.lora_fit import architecture_of
from app.engine.single_file import SingleFileError, unet_mapper
from app.registry import Registry

log = logging.getLogger(__name__)

_MIRRORED = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
_MIRRORED_LDM = ("input_blocks.", "time_embed.", "label_emb.", "middle_block.")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def original_names(unet_layers: Mapping[str, tuple[int, ...]],
                   unet_config: Any) -> dict[str, tuple[int, ...]]:
    """A UNet's layers (diffusers names) under their original (LDM) names."""
    mapper = unet_mapper(dict(unet_config))
    out: dict[str, tuple[int, ...]] = {}
    for layer, shape in unet_layers.items():
        try:
            out[mapper(layer + ".weight")[: -len(".weight")]] = shape
        except SingleFileError:
            continue
    return out


def misfit(shapes: dict[str, tuple[int, ...]], unet_layers: dict[str, tuple[int, ...]], *,
           ldm: bool = False) -> str | None:
    """Why a ControlNet with these tensor shapes does not fit a UNet with these layers (both
    named in the original layout when `ldm`), or None."""
    checked = 0
    mirrored = _MIRRORED_LDM if ldm else _MIRRORED
    for key in sorted(shapes):
        if not key.startswith(mirrored) or not key.endswith(".weight") or len(shapes[key]) < 2:
            continue
        layer = key[: -len(".weight")]
        theirs = unet_layers.get(layer)
        if theirs is None:
            return f"its layer {layer} is not in the model's UNet"
        if tuple(theirs) != tuple(shapes[key]):
            return (f"its layer {layer} is {_shape(shapes[key])} where the model's UNet has "
                    f"{_shape(tuple(theirs))}")
        checked += 1
    return None if checked else "it has no layer that mirrors a UNet's"


def match_controlnets(registry: Registry) -> None:
    """Fill each ControlNet's `fits` against every model whose architecture can be read."""
    nets = getattr(registry, "controlnets", {}) or {}
    if not nets:
        return
    for model in registry.models.values():
        try:
            arch = architecture_of(model)
        except Exception:  # noqa: BLE001 - an unreadable config: the load decides
            log.exception("model %s: its architecture could not be read for ControlNets", model.name)
            continue
        if arch is None:
            continue
        unet = dict(arch.layers.get("unet", {}))
        original: dict[str, tuple[int, ...]] | None = None
        for net in nets.values():
            if net.layout == LDM:
                if original is None:
                    original = original_names(unet, arch.unet_config)
                net.fits[model.name] = misfit(dict(net.shapes), original, ldm=True)
            else:
                net.fits[model.name] = misfit(dict(net.shapes), unet)
    for net in nets.values():
        fitting = [m for m, reason in net.fits.items() if reason is None]
        if not fitting:
            log.warning("ControlNet %r fits no served model: %s", net.name,
                        next(iter(net.fits.values()), "no model's architecture could be read"))
