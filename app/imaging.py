"""Image encoding (run off the worker thread), the A1111-style `parameters` text, and the
store of recent images answered by URL."""

from __future__ import annotations

import io
import json
import secrets
import threading
from collections import OrderedDict

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app import __version__
from app.engine.control_units import CONTROL_MODES, ControlUnit
from app.engine.image_ops import FILL_MODES
from app.engine.jobs import GenParams
from app.engine.preprocessors import RESIZE_MODES


def controlnet_entries(units: tuple[ControlUnit, ...]) -> dict[str, str]:
    """sd-webui-controlnet's `ControlNet N` infotext entries, one per unit in order: a quoted
    `Key: value` list (the quotes keep its commas inside one entry)."""
    entries = {}
    for index, unit in enumerate(units):
        parts = {
            "Module": unit.module,
            "Model": unit.title or unit.name,
            "Weight": f"{unit.weight:g}",
            "Resize Mode": RESIZE_MODES[unit.resize_mode],
            "Processor Res": f"{unit.processor_res:g}",
            "Threshold A": f"{unit.threshold_a:g}",
            "Threshold B": f"{unit.threshold_b:g}",
            "Guidance Start": f"{unit.start:g}",
            "Guidance End": f"{unit.end:g}",
            "Pixel Perfect": str(unit.pixel_perfect),
            "Control Mode": CONTROL_MODES[unit.mode],
        }
        entries[f"ControlNet {index}"] = '"' + ", ".join(f"{k}: {v}" for k, v in parts.items()) + '"'
    return entries


def parameters_text(params: GenParams, seed: int, sampler_label: str) -> str:
    """Generation parameters in AUTOMATIC1111's `parameters` convention (civitai etc. read it):
    the one infotext of every dialect (the PNG text chunk, A1111's `infotexts`)."""
    lora_tags = "".join(f" <lora:{name}:{weight:g}>" for name, _file, weight in params.loras)
    fields = [
        f"Steps: {params.steps}",
        f"Sampler: {params.sampler.sampler}",
        f"Schedule type: {params.sampler.schedule.replace('_', ' ').title()}",
        f"CFG scale: {params.cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {params.width}x{params.height}",
        f"Model: {params.model}",
    ]
    if params.clip_skip != 1:  # A1111 writes it only when it is not the default
        fields.append(f"Clip skip: {params.clip_skip}")
    if params.source is not None:  # img2img / inpainting, as A1111 writes them
        fields.append(f"Denoising strength: {params.strength:g}")
        if params.source.mask is not None:
            fields.append(f"Masked content: {FILL_MODES[params.fill]}")
    hires = params.hires
    if hires is not None:
        fields += [f"Denoising strength: {hires.strength:g}",
                   f"Hires resize: {hires.size[0]}x{hires.size[1]}",
                   f"Hires steps: {hires.steps}", f"Hires upscaler: {hires.upscaler}"]
        if hires.prompt != params.prompt:
            fields.append(f"Hires prompt: {json.dumps(hires.prompt)}")
        if hires.negative_prompt != params.negative_prompt:
            fields.append(f"Hires negative prompt: {json.dumps(hires.negative_prompt)}")
    if params.refiner is not None:  # A1111's extra generation params of its refiner
        fields += [f"Refiner: {params.refiner.model}", f"Refiner switch at: {params.refiner.switch_at:g}"]
    # the extension's entries, among A1111's extra generation params (before the version)
    fields += [f"{key}: {value}" for key, value in controlnet_entries(params.controlnet).items()]
    fields.append(f"Version: craftserve {__version__}")
    lines = [params.prompt + lora_tags]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    # Level 1: PNG compression is CPU time on the answer path; size matters less than latency.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


# Formats an answer can be encoded in (OpenAI's `output_format` names) → media type.
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def _exif_with_parameters(parameters: str) -> bytes:
    """EXIF whose UserComment holds the `parameters` text, where A1111 puts it in a JPEG or
    WebP (UNICODE prefix, UTF-16 big-endian, as piexif writes it)."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
    return exif.tobytes()


def encode_image(image: Image.Image, output_format: str, parameters: str, quality: int = 100) -> bytes:
    """The image as `output_format` (png, jpeg or webp), carrying the `parameters` text (a PNG
    text chunk, or the EXIF UserComment of a JPEG or WebP). `quality` (0-100, OpenAI's
    `output_compression`) applies to jpeg and webp; PNG is lossless."""
    if output_format == "png":
        return encode_png(image, parameters)
    if output_format not in MEDIA_TYPES:
        raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(MEDIA_TYPES)}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality,
                              exif=_exif_with_parameters(parameters))
    return buffer.getvalue()


class ImageStore:
    """Recent images served by URL: the PNGs of the spring-2024 `POST /generate` route that
    answers `{"images": [url, ...]}`, the images `/v1/images/generations` answers by URL (PNG,
    JPEG or WebP: each kept with its media type) and the job API's. Thread-safe.

    Each image is kept for the key that made it (`owner`), so one key cannot push out another
    key's images: a key past `max_bytes_per_key` loses its own oldest; past `max_bytes` in all,
    the owner that holds the most loses its oldest, and an owner holding no more than its fair
    share (`max_bytes` / owners) never loses one. The URL itself stays the credential: `get`
    serves an image to whoever has its random key."""

    def __init__(self, max_bytes: int, max_bytes_per_key: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_key = max_bytes if max_bytes_per_key is None else max_bytes_per_key
        self._images: OrderedDict[str, tuple[bytes, str, str]] = OrderedDict()  # key → data, type, owner
        self._owned: dict[str, OrderedDict[str, int]] = {}  # owner → its keys, oldest first → size
        self._owner_bytes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str = "image/png", *, owner: str = "") -> str:
        return self.put_many([data], media_type, owner=owner)[0]

    def put_many(self, images: list[bytes], media_type: str = "image/png", *, owner: str = "") -> list[str]:
        """Store one answer's images for `owner` (a key label); their keys. Then the owner's
        oldest go while it is past its own budget, and the biggest owner's oldest while the
        store is past its size, but never an image of this answer: every URL of an answer works
        when it is sent, even when the answer alone is bigger than the budget or the store (it
        then holds the answer past the bound until that owner's next one)."""
        if not images:
            return []
        keys = [secrets.token_urlsafe(16) for _ in images]  # unguessable: the URL is the credential
        with self._lock:
            owned = self._owned.setdefault(owner, OrderedDict())
            for key, data in zip(keys, images, strict=True):
                self._images[key] = (data, media_type, owner)
                owned[key] = len(data)
                self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + len(data)
                self._bytes += len(data)
            fresh = set(keys)
            while self._owner_bytes[owner] > self.max_bytes_per_key and self._drop_oldest(owner, fresh):
                pass
            while self._bytes > self.max_bytes:
                victim = self._biggest_over_share(fresh)
                if victim is None or not self._drop_oldest(victim, fresh):
                    break
        return keys

    def _biggest_over_share(self, fresh: set[str]) -> str | None:
        """The owner holding the most bytes above its fair share that has an image to drop
        (one not of the answer being stored); of equals, the one that stored first."""
        fair = self.max_bytes / max(1, len(self._owned))
        candidates = [(size, owner) for owner, size in self._owner_bytes.items()
                      if size > fair and any(key not in fresh for key in self._owned[owner])]
        return max(candidates, key=lambda found: found[0])[1] if candidates else None

    def _drop_oldest(self, owner: str, fresh: set[str]) -> bool:
        """Drop the owner's oldest image that is not of the answer being stored; False if none."""
        owned = self._owned[owner]
        for key, size in owned.items():
            if key in fresh:
                continue
            del owned[key]
            del self._images[key]
            self._owner_bytes[owner] -= size
            self._bytes -= size
            if not owned:
                del self._owned[owner]
                del self._owner_bytes[owner]
            return True
        return False

    def bytes_of(self, owner: str) -> int:
        """The bytes of the images kept for `owner`."""
        with self._lock:
            return self._owner_bytes.get(owner, 0)

    def get(self, key: str, media_type: str = "image/png") -> bytes | None:
        """The image stored under `key` if it has this media type (so a URL ending in .png
        never answers a JPEG), else None."""
        with self._lock:
            found = self._images.get(key)
        if found is None or found[1] != media_type:
            return None
        return found[0]
