"""Pictures for the image tests: random ones made from a seed, and base64 PNGs both ways."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture of random pixels, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def b64(image: Image.Image) -> str:
    """The picture as base64 PNG text, as clients send it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decoded(text: str) -> Image.Image:
    """An answer's base64 picture, as RGB."""
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def arr(image: Image.Image) -> np.ndarray:
    """The picture's RGB pixels as ints (differences do not wrap)."""
    return np.asarray(image.convert("RGB")).astype(int)
