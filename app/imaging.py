"""Image encoding (run off the worker thread), the A1111-style `parameters` text, and the
store of recent images answered by URL."""

from __future__ import annotations

import io
import secrets
import threading
from collections import OrderedDict

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app import __version__
from app.engine.jobs import GenParams


def parameters_text(params: GenParams, seed: int, sampler_label: str) -> str:
    """Generation parameters in AUTOMATIC1111's `parameters` convention (civitai etc. read it)."""
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
    answers `{"images": [url, ...]}`, and the images `/v1/images/generations` answers by URL
    (PNG, JPEG or WebP: each kept with its media type). Bounded by total bytes; the oldest go
    first. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str = "image/png") -> str:
        return self.put_many([data], media_type)[0]

    def put_many(self, images: list[bytes], media_type: str = "image/png") -> list[str]:
        """Store one answer's images; their keys. The oldest images go first while the store is
        over its size, but never an image of this answer: every URL of an answer works when
        it is sent, even when the answer alone is bigger than the store (it then holds just
        this answer until the next one)."""
        keys = [secrets.token_urlsafe(16) for _ in images]  # unguessable: the URL is the credential
        with self._lock:
            for key, data in zip(keys, images, strict=True):
                self._images[key] = (data, media_type)
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._images) > len(keys):
                _, (old, _) = self._images.popitem(last=False)
                self._bytes -= len(old)
        return keys

    def get(self, key: str, media_type: str = "image/png") -> bytes | None:
        """The image stored under `key` if it has this media type (so a URL ending in .png
        never answers a JPEG), else None."""
        with self._lock:
            found = self._images.get(key)
        if found is None or found[1] != media_type:
            return None
        return found[0]
