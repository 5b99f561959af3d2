"""Tests that need what CI lacks: real SDXL weights in the Hugging Face cache, or a CUDA GPU.

They skip cleanly without them (`pytest -m weights`, `pytest -m gpu` select them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import body, png

ROOT = Path(__file__).resolve().parent.parent
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def _cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - no cache, no weights
        return False


needs_weights = pytest.mark.skipif(not _cached(SDXL), reason=f"{SDXL} is not in the HF cache")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.weights
@needs_weights
def test_real_sdxl_base_serves_an_image(make_server) -> None:
    models = f"models:\n  sdxl-base: {{source: {SDXL}, preload: true}}\n"
    server = make_server(models, allow_downloads=False)
    with server.client(timeout=1800) as c:
        answer = c.post("/sd", json=body(model="sdxl-base", width=512, height=512, steps=4,
                                         prompt="a red apple on a wooden table"))
        image = png(answer)
    assert image.size == (512, 512)
    assert image.convert("L").getextrema()[1] > 32


@pytest.mark.gpu
@needs_gpu
def test_full_size_sdxl_on_the_gpu_path(make_server) -> None:
    models = "models:\n  random-sdxl: {source: builtin:random-sdxl, preload: true}\n"
    server = make_server(models)
    loaded = server.app.state.engine.workers[0].models["random-sdxl"]
    assert loaded.device.type == "cuda" and loaded.dtype == torch.float16
    with server.client(timeout=600) as c:
        first = c.post("/sd", json=body(model="random-sdxl", width=1024, height=1024, steps=4))
        again = c.post("/sd", json=body(model="random-sdxl", width=1024, height=1024, steps=4))
    assert png(first).size == (1024, 1024)
    assert first.content == again.content  # same seed, same device: same bytes


@pytest.mark.gpu
@needs_gpu
def test_tiny_model_on_the_gpu_matches_batched_within_tolerance(make_server) -> None:
    import io
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    server = make_server(max_batch=4, batch_window_ms=200)
    jobs = [body(seed=s) for s in range(4)]
    with server.client() as c, ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda j: c.post("/sd", json=j), jobs))
        alone = [c.post("/sd", json=j) for j in jobs]
    for a, b in zip(together, alone, strict=True):
        pa = np.asarray(Image.open(io.BytesIO(a.content)), dtype=np.int16)
        pb = np.asarray(Image.open(io.BytesIO(b.content)), dtype=np.int16)
        assert np.abs(pa - pb).max() <= 2
