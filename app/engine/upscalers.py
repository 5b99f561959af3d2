"""TEMPORARY stand-in until the upscalers branch lands (built-in upscalers only)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_BUILTINS = ("None", "Lanczos", "Nearest")


def upscale_latents(latents: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    interp, antialias = LATENT_MODES[mode]
    return torch.nn.functional.interpolate(latents, size=(height // 8, width // 8), mode=interp,
                                           antialias=antialias)


class Upscalers:
    def __init__(self, device: torch.device, dtype: torch.dtype | None = None, capacity: int = 2,
                 tile: int = 512) -> None:
        self.device = device

    def upscale(self, image: Image.Image, name: str, width: int, height: int,
                specs: Mapping[str, Any]) -> Image.Image:
        if name == "Nearest":
            return image.resize((width, height), Image.Resampling.NEAREST)
        return image.resize((width, height), Image.Resampling.LANCZOS)

    def unload(self) -> None:
        pass
