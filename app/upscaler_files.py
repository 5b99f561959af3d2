"""Upscaler model files on disk: what `upscaler_dirs:` in models.yaml lists.

Torch-free and cheap, like app.lora_files: the registry runs it at start-up (and on every
reload) before anything is loaded, so it never reads tensor data. A `.safetensors` file has
its header checked (a truncated or foreign file is skipped with a warning naming it); a
`.pth` file is listed as it is and loaded later only through a weights-only unpickler
(app.engine.upscalers), which refuses a pickle that would run code.

An upscaler is named as A1111 lists it: the file stem ("4x-UltraSharp", "RealESRGAN_x4plus").
Its native scale is read from the architecture once loaded; for the listing it is parsed from
the name where the name says it ("4x-foo", "RealESRGAN_x2plus", "SwinIR_4x"), else None.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app.errors import LoraError
from app.lora_files import read_header

logger = logging.getLogger(__name__)

# What A1111 lists before any model upscaler; a file of one of these names would shadow it.
PIXEL_BUILTINS = ("None", "Lanczos", "Nearest")
LATENT_MODE_NAMES = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
UPSCALER_SUFFIXES = (".safetensors", ".pth")
# pickle formats that are not read: .pt may be TorchScript, .ckpt/.bin are rarely upscalers
_SKIPPED_PICKLES = (".pt", ".ckpt", ".bin")

# "4x-UltraSharp", "4xNomos8kSC", "8x_NMKD-Superscale": a leading "<n>x"
_LEADING_SCALE = re.compile(r"^(\d{1,2})x", re.IGNORECASE)
# "RealESRGAN_x4plus", "realesr-general-x4v3", "SwinIR-M_x4_GAN": "x<n>" after a separator
_X_SCALE = re.compile(r"(?<![a-z0-9])x(\d{1,2})(?!\d)", re.IGNORECASE)
# "ESRGAN_4x", "SwinIR_4x-foo": "<n>x" after a separator, no letter after it
_SCALE_X = re.compile(r"(?<![a-z0-9])(\d{1,2})x(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class UpscalerSpec:
    """A model upscaler file: its name (the file stem), absolute path, and native scale as far
    as the name tells (None: unknown until loaded)."""

    name: str
    path: Path
    scale: int | None


def scale_from_name(name: str) -> int | None:
    """The scale a file's name states ("4x-foo" 4, "RealESRGAN_x2plus" 2), or None."""
    for pattern in (_LEADING_SCALE, _X_SCALE, _SCALE_X):
        match = pattern.search(name)
        if match and 1 <= int(match.group(1)) <= 16:
            return int(match.group(1))
    return None


def _usable(path: Path) -> bool:
    """Whether a listed file is worth offering; logs why not."""
    if path.suffix.lower() == ".safetensors":
        try:
            read_header(path, name=path.stem)
        except LoraError as exc:
            logger.warning("upscaler %r (%s) is not served: %s", path.stem, path,
                           exc.reason.replace("LoRA", "upscaler"))
            return False
    return True


def discover_upscalers(dirs: Iterable[Path | str]) -> dict[str, UpscalerSpec]:
    """Every `.safetensors` and `.pth` file directly in `dirs`, by file stem, in folder order.

    A name A1111 already uses for a built-in upscaler or latent mode is skipped, and so is the
    second file of one name (a `.safetensors` beside a `.pth` of the same stem wins): both with
    a warning. Folders that do not exist are the caller's to refuse (app.registry does)."""
    found: dict[str, UpscalerSpec] = {}
    reserved = {n.lower() for n in PIXEL_BUILTINS + LATENT_MODE_NAMES}
    for folder in dirs:
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        # .safetensors first, so it wins over a .pth of the same stem in the same folder
        files.sort(key=lambda p: p.suffix.lower() != ".safetensors")
        for path in files:
            suffix = path.suffix.lower()
            if suffix in _SKIPPED_PICKLES:
                logger.warning("upscaler %r (%s) is not read: only .safetensors and .pth files are "
                               "(a %s file is a pickle that may run code, or TorchScript)",
                               path.stem, path, suffix)
                continue
            if suffix not in UPSCALER_SUFFIXES:
                continue
            name = path.stem
            if name.lower() in reserved:
                logger.warning("upscaler file %s is not served: %r is the name of a built-in "
                               "upscaler; rename the file", path, name)
                continue
            if name in found:
                logger.warning("upscaler %r (%s): %s came first; this file is ignored",
                               name, path, found[name].path)
                continue
            if _usable(path):
                found[name] = UpscalerSpec(name=name, path=path.resolve(), scale=scale_from_name(name))
    return found
