"""Image encoding (run off the worker thread) and the A1111-style `parameters` text."""

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
    lora_tags = "".join(f" <lora:{name}:{weight:g}>" for name, weight in params.loras)
    fields = [
        f"Steps: {params.steps}",
        f"Sampler: {params.sampler.sampler}",
        f"Schedule type: {params.sampler.schedule.replace('_', ' ').title()}",
        f"CFG scale: {params.cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {params.width}x{params.height}",
        f"Model: {params.model}",
        f"Version: craftserve {__version__}",
    ]
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


class ImageStore:
    """Recent PNGs served by URL, for the spring-2024 `POST /generate` route that answers
    `{"images": [url, ...]}`. Bounded by total bytes; the oldest go first. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        key = secrets.token_urlsafe(16)  # unguessable: the URL is the only credential
        with self._lock:
            self._images[key] = png
            self._bytes += len(png)
            while self._bytes > self.max_bytes and len(self._images) > 1:
                _, old = self._images.popitem(last=False)
                self._bytes -= len(old)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._images.get(key)
