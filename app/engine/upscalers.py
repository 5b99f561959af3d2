"""Upscalers as A1111 names them: latent modes, pixel built-ins, and model files (spandrel).

Three kinds, all resizing to an exact target size:
- Latent modes ("Latent", "Latent (bicubic antialiased)", ...): `upscale_latents` resizes the
  latents of a hires-fix first pass with `torch.nn.functional.interpolate` in the mode and
  antialias A1111's `shared.latent_upscale_modes` give each name.
- Pixel built-ins: "Lanczos" and "Nearest" are PIL resizes to the target. "None" is A1111's
  UpscalerNone in hires fix: no model runs, and the resize that follows every upscaler
  (images.resize_image) brings the image to the target with Lanczos. (A1111's extras,
  extra-single-image, treat upscaler_1 "None" differently: the image comes back unchanged;
  that route should not call `upscale` then.)
- Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ... whatever spandrel's main,
  permissively licensed registry detects; spandrel_extra_arches is not used) from the files of
  models.yaml's `upscaler_dirs:` (app.upscaler_files). A1111's Upscaler.upscale: the model
  runs again while the image is smaller than the target (at most MAX_PASSES times, stopping if
  a pass changes nothing), then Lanczos brings it to the exact size. A target no larger than
  the image runs no model (A1111's resize_image: only Lanczos).

Model files are read safely: `.safetensors` with safetensors, `.pth` only through
`torch.load(weights_only=True)`, which refuses a pickle that would build arbitrary objects.
A file spandrel cannot identify, or whose model is not an image-to-image super-resolution
model of 3 channels in and out (an inpainting, face-restoration or 1x model), is refused with
an UpscalerError (422) naming the upscaler and the file, never its folder.

Models run tiled: tiles of at most `tile` input pixels a side, neighbours overlapping by
`overlap` pixels, blended with weights that rise from 0 to 1 across the middle half of each
overlap (a pixel within a quarter of the overlap of a tile's inner edge takes nothing from that
tile, so where the model's receptive field is under a quarter of the overlap the result equals
an untiled run). The output is accumulated in float32 on the device; the model runs in its own
dtype (float16 on CUDA where the architecture supports it) under inference mode. Colours go in
as RGB in [0, 1], spandrel's convention (A1111 swaps to BGR before its models; the models were
trained on RGB).

`Upscalers` belongs to one worker thread (its device): it loads lazily and keeps at most
`capacity` models (least recently used first out); a file replaced on disk (other size or
mtime) is loaded again. spandrel imports torchvision for two architectures that are no
upscalers (LaMa, RestoreFormer); where torchvision is missing or unusable (a CUDA build beside
a CPU torch), spandrel is imported with a stand-in for those two functions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.errors import InvalidParameter, NotServed, UpscalerError
from app.upscaler_files import PIXEL_BUILTINS, UpscalerSpec, discover_upscalers

log = logging.getLogger(__name__)

__all__ = [
    "LATENT_MODES",
    "PIXEL_BUILTINS",
    "UpscalerError",
    "UpscalerSpec",
    "Upscalers",
    "discover_upscalers",
    "upscale_latents",
]

# A1111's shared.latent_upscale_modes: name -> (interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

LATENT_FACTOR = 8  # pixels per latent cell of the SD 1.x / SDXL VAE
MAX_PASSES = 3  # A1111's Upscaler.upscale runs a model at most three times
MAX_TARGET_SIDE = 16384  # no upscale target past this many pixels a side (a guard, not a setting)
# no model pass whose output would pass this many pixels: the rest is Lanczos (a 4x model on a
# 4096² image for a 4100² target would otherwise make 16384² on the device first)
MAX_PASS_PIXELS = 8192 * 8192
_MAX_REASON = 200

TileCallback = Callable[[int, int], None]  # (tiles done, tiles in all); raising stops the run


# --------------------------------------------------------------------------- latents


def upscale_latents(latents: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Latents (B, C, h, w) resized to (B, C, height // 8, width // 8) by the named latent mode,
    as A1111's hires fix does: F.interpolate(latents, size, mode=..., antialias=...)."""
    if mode not in LATENT_MODES:
        raise NotServed("upscaler", mode, LATENT_MODES)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (batch, channels, height, width), not {tuple(latents.shape)}")
    for field, value in (("height", height), ("width", width)):
        if not LATENT_FACTOR <= value <= MAX_TARGET_SIDE:
            raise InvalidParameter(field, value, f"a latent upscale target is {LATENT_FACTOR} to "
                                   f"{MAX_TARGET_SIDE} pixels")
    interpolation, antialias = LATENT_MODES[mode]
    size = (height // LATENT_FACTOR, width // LATENT_FACTOR)
    return F.interpolate(latents, size=size, mode=interpolation, antialias=antialias)


# --------------------------------------------------------------------------- spandrel


def _stand_in_torchvision() -> dict[str, types.ModuleType]:
    """Modules that satisfy spandrel's two torchvision imports; calling them says why not."""

    def missing(attribute: str) -> Any:
        def unavailable(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"torchvision.transforms.functional.{attribute} is needed here and "
                               "torchvision is not installed (or does not match torch)")
        return unavailable

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {name: types.ModuleType(name) for name in names}
    modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
    modules["torchvision.transforms"].functional = modules[names[2]]  # type: ignore[attr-defined]
    modules[names[2]].__getattr__ = missing  # type: ignore[method-assign]  # PEP 562
    return modules


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception:  # a CUDA build beside a CPU torch fails to register its operators
        log.info("torchvision is installed but cannot be imported; spandrel gets a stand-in")
        return False
    return True


@contextlib.contextmanager
def _torchvision_for_import() -> Iterator[None]:
    """The real torchvision if it imports, else the stand-in for the import only: it leaves
    sys.modules again, so nothing else (transformers' checks) ever sees it."""
    if _torchvision_works():
        yield
        return
    stand_in = _stand_in_torchvision()
    saved = {name: sys.modules.get(name) for name in stand_in}
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_spandrel(name: str = "") -> types.ModuleType:
    """The spandrel package (imported once, with the torchvision stand-in where needed).
    Raises UpscalerError for upscaler `name` where it is not installed."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise UpscalerError(name, "model upscalers need the spandrel package, which is not "
                            "installed on this server (pip install --no-deps spandrel einops)")
    with _torchvision_for_import():
        return importlib.import_module("spandrel")


# --------------------------------------------------------------------------- loading


def _reason(exc: BaseException, path: Path) -> str:
    """An exception's text for a message: the server's folder taken out, cut short."""
    text = str(exc).replace(str(path), path.name).replace(str(path.parent), "<upscaler_dirs>")
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def read_state_dict(spec: UpscalerSpec) -> dict[str, Any]:
    """The file's tensors on the CPU: safetensors, or a weights-only unpickle of a .pth."""
    path = spec.path
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            try:
                return dict(load_file(str(path), device="cpu"))
            except (OSError, MemoryError):
                raise
            except Exception as exc:
                raise UpscalerError(spec.name, f"its file {path.name} is not a readable safetensors "
                                    f"file ({_reason(exc, path)})") from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UpscalerError(spec.name, f"its file {path.name} is a pickle that a weights-only load "
                                f"refuses (it would build objects other than tensors: "
                                f"{_reason(exc, path)[:120]}); convert it to .safetensors") from None
        except (OSError, MemoryError):
            raise
        except Exception as exc:
            raise UpscalerError(spec.name, f"its file {path.name} is not a readable .pth file "
                                f"({_reason(exc, path)})") from None
    except FileNotFoundError:
        raise UpscalerError(spec.name, f"its file {path.name} is missing on the server") from None
    except OSError as exc:
        raise UpscalerError(spec.name, f"its file {path.name} cannot be read "
                            f"({exc.strerror or 'I/O error'})") from None
    if not isinstance(loaded, dict):
        raise UpscalerError(spec.name, f"its file {path.name} holds a {type(loaded).__name__}, "
                            "not a state dict of tensors")
    return loaded


def load_descriptor(spec: UpscalerSpec) -> Any:
    """The spandrel ImageModelDescriptor of a super-resolution file, on the CPU in float32."""
    spandrel = import_spandrel(spec.name)
    state = spandrel.canonicalize_state_dict(read_state_dict(spec))
    # training files carry a step count or options beside the weights: only tensors are the model
    state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise UpscalerError(spec.name, f"its file {spec.path.name} holds no tensors")
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(spec.name, f"its file {spec.path.name} is no model architecture spandrel "
                            "knows (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...)") from None
    except Exception as exc:
        raise UpscalerError(spec.name, f"its file {spec.path.name} does not load as the architecture "
                            f"spandrel detected ({_reason(exc, spec.path)})") from None
    _check_super_resolution(spec, descriptor, spandrel)
    return descriptor.eval()


def _check_super_resolution(spec: UpscalerSpec, descriptor: Any, spandrel: types.ModuleType) -> None:
    arch = descriptor.architecture.name
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise UpscalerError(spec.name, f"its file {spec.path.name} is a {arch} {descriptor.purpose} "
                            "model, not a super-resolution upscaler")
    if descriptor.scale < 2:
        raise UpscalerError(spec.name, f"its file {spec.path.name} is a {arch} model of scale "
                            f"{descriptor.scale}, not an upscaler")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise UpscalerError(spec.name, f"its file {spec.path.name} is a {arch} model of "
                            f"{descriptor.input_channels} channels in and {descriptor.output_channels} "
                            "out; only RGB models (3 and 3) are served")


# --------------------------------------------------------------------------- tiling


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start to cover `length`, neighbours overlapping by at least
    `overlap`, spread evenly, the last flush with the end."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(size: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """A tile's weights along one axis (output pixels): 0 to 1 across the middle half of the
    overlap with the previous tile (`before` pixels), 1 to 0 across that of the next."""
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones(size, device=device)
    if before:
        weight = weight * ((centres - before / 4) / (before / 2)).clamp(0, 1)
    if after:
        weight = weight * ((size - centres - after / 4) / (after / 2)).clamp(0, 1)
    return weight


def run_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, *,
              tile: int, overlap: int, on_tile: TileCallback | None = None) -> torch.Tensor:
    """`model` over `image` (1, C, H, W) in overlapping tiles, blended: (1, C', H*scale, W*scale)
    in float32. An image that fits one tile is one call."""
    _, _, height, width = image.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    total = len(rows) * len(cols)
    if total == 1:
        out = model(image).float()
        if on_tile:
            on_tile(1, 1)
        return out
    result: torch.Tensor | None = None
    weights = torch.zeros(1, 1, height * scale, width * scale, device=image.device)
    done = 0
    for i, top in enumerate(rows):
        tile_h = min(tile, height)
        wy = _ramp(tile_h * scale, _shared(rows, i - 1, i, tile_h) * scale,
                   _shared(rows, i, i + 1, tile_h) * scale, image.device)
        for j, left in enumerate(cols):
            tile_w = min(tile, width)
            wx = _ramp(tile_w * scale, _shared(cols, j - 1, j, tile_w) * scale,
                       _shared(cols, j, j + 1, tile_w) * scale, image.device)
            out = model(image[..., top:top + tile_h, left:left + tile_w]).float()
            if result is None:
                result = torch.zeros(1, out.shape[1], height * scale, width * scale, device=image.device)
            weight = (wy[:, None] * wx[None, :])[None, None]
            ys = slice(top * scale, (top + tile_h) * scale)
            xs = slice(left * scale, (left + tile_w) * scale)
            result[..., ys, xs] += out * weight
            weights[..., ys, xs] += weight
            done += 1
            if on_tile:
                on_tile(done, total)
    assert result is not None
    return result / weights.clamp_min(1e-6)


def _shared(starts: list[int], a: int, b: int, size: int) -> int:
    """Pixels tile `a` and tile `b` (a < b) of one axis share; 0 where either does not exist."""
    if a < 0 or b >= len(starts):
        return 0
    return max(0, starts[a] + size - starts[b])


# --------------------------------------------------------------------------- images


def _to_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy(), "RGB")


def _check_target(width: int, height: int) -> None:
    for field, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or not 1 <= value <= MAX_TARGET_SIDE:
            raise InvalidParameter(field, value, f"an upscale target is 1 to {MAX_TARGET_SIDE} pixels a side")


class Upscalers:
    """The model upscalers of one worker (device). Not thread-safe: its worker thread alone
    calls it. Models load on first use; at most `capacity` stay loaded."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None, capacity: int = 2,
                 tile: int = 512, overlap: int = 32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not 0 <= overlap <= tile // 2:
            raise ValueError(f"overlap must be 0 to tile / 2 ({tile // 2}), not {overlap}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity = capacity
        self.tile = tile
        self.overlap = overlap
        # (name, path, size, mtime_ns) -> spandrel ImageModelDescriptor, least recently used first
        self._models: OrderedDict[tuple[str, str, int, int], Any] = OrderedDict()

    # ---------------------------------------------------------------- models

    def loaded(self) -> list[str]:
        """Names of the models held now, least recently used first."""
        return [key[0] for key in self._models]

    def model(self, name: str, specs: Mapping[str, UpscalerSpec]) -> Any:
        """The loaded spandrel ImageModelDescriptor of model upscaler `name` (loads it if needed)."""
        spec = specs.get(name)
        if spec is None:
            raise NotServed("upscaler", name, [*PIXEL_BUILTINS, *specs])
        try:
            stat = os.stat(spec.path)
        except OSError:
            raise UpscalerError(name, f"its file {spec.path.name} is missing on the server") from None
        key = (name, str(spec.path), stat.st_size, stat.st_mtime_ns)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        for old in [k for k in self._models if k[0] == name]:  # the file changed on disk
            self._drop(old)
        descriptor = load_descriptor(spec)
        descriptor.to(self.device, self._dtype_for(descriptor))
        while len(self._models) >= self.capacity:
            self._drop(next(iter(self._models)))
        self._models[key] = descriptor
        log.info("upscaler %r loaded: %s x%d, %s on %s", name, descriptor.architecture.name,
                 descriptor.scale, descriptor.dtype, self.device)
        return descriptor

    def _dtype_for(self, descriptor: Any) -> torch.dtype:
        wanted = self.dtype
        if wanted is None:
            wanted = torch.float16 if self.device.type == "cuda" else torch.float32
        if (wanted == torch.float16 and not descriptor.supports_half) or (
                wanted == torch.bfloat16 and not descriptor.supports_bfloat16):
            return torch.float32
        return wanted

    def _drop(self, key: tuple[str, str, int, int]) -> None:
        descriptor = self._models.pop(key)
        descriptor.to("cpu")  # its device memory goes back at once, whoever still holds it
        log.info("upscaler %r unloaded", key[0])

    def unload(self) -> None:
        """Free every loaded model (device memory included)."""
        for key in list(self._models):
            self._drop(key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- upscaling

    def upscale(self, image: Image.Image, name: str, width: int, height: int,
                specs: Mapping[str, UpscalerSpec], on_tile: TileCallback | None = None) -> Image.Image:
        """`image` brought to exactly (width, height) by upscaler `name`: "None"/"Lanczos" and
        "Nearest" resize with PIL; a model runs (repeatedly while smaller than the target), then
        Lanczos makes the size exact. `on_tile(done, total)` is called after each model tile."""
        _check_target(width, height)
        if name in ("None", "Lanczos"):
            return image.resize((width, height), Image.Resampling.LANCZOS)
        if name == "Nearest":
            return image.resize((width, height), Image.Resampling.NEAREST)
        if name not in specs:
            raise NotServed("upscaler", name, [*PIXEL_BUILTINS, *specs])
        if width <= image.width and height <= image.height:
            return image.resize((width, height), Image.Resampling.LANCZOS)
        descriptor = self.model(name, specs)
        out = image.convert("RGB")
        for _ in range(MAX_PASSES):
            if out.width * out.height * descriptor.scale ** 2 > MAX_PASS_PIXELS:
                log.warning("upscaler %r: a pass on %dx%d would pass %d pixels; Lanczos does the rest",
                            name, out.width, out.height, MAX_PASS_PIXELS)
                break
            before = out.size
            out = self._run(descriptor, out, on_tile)
            if out.size == before or (out.width >= width and out.height >= height):
                break
        if out.size != (width, height):
            out = out.resize((width, height), Image.Resampling.LANCZOS)
        return _like(image, out)

    def _run(self, descriptor: Any, image: Image.Image, on_tile: TileCallback | None) -> Image.Image:
        tensor = _to_tensor(image, self.device, descriptor.dtype)
        internal = descriptor.tiling.name == "INTERNAL"  # the model tiles itself
        tile = max(image.width, image.height) if internal else self.tile
        with torch.inference_mode():
            out = run_tiled(descriptor, tensor, descriptor.scale, tile=tile,
                            overlap=min(self.overlap, tile // 2), on_tile=on_tile)
        return _to_image(out)


def _like(original: Image.Image, upscaled: Image.Image) -> Image.Image:
    """The upscaled RGB image in the original's mode: greyscale stays greyscale; an alpha
    channel is resized with Lanczos and put back."""
    if original.mode in ("L", "LA", "RGBA", "PA") or "transparency" in original.info:
        if original.mode in ("L", "LA"):
            grey = upscaled.convert("L")
            if original.mode == "L":
                return grey
            alpha = original.getchannel("A").resize(upscaled.size, Image.Resampling.LANCZOS)
            return Image.merge("LA", (grey, alpha))
        alpha = original.convert("RGBA").getchannel("A").resize(upscaled.size, Image.Resampling.LANCZOS)
        return Image.merge("RGBA", (*upscaled.split(), alpha))
    return upscaled

