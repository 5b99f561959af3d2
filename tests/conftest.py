"""Shared fixtures: tiny models on disk, and real craftserve servers on loopback.

Every server here is the real app under real uvicorn on 127.0.0.1 with a free port,
driven over real HTTP with httpx.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from app.config import Settings
from app.main import create_app

API_KEY = "test-key-123"


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        # IPPROTO_TCP (not 0) so asyncio sets TCP_NODELAY, as it does for uvicorn's own socket.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, ready_timeout: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            answer = httpx.get(self.url + "/ready", timeout=10)
            if answer.status_code == 200 or time.monotonic() > deadline:
                return answer.json()
            time.sleep(0.05)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def write_models_file(folder: Path, text: str) -> Path:
    path = folder / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


TINY_MODELS = """
models:
  tiny-sdxl:
    source: builtin:tiny-sdxl
    preload: true
"""


@pytest.fixture(scope="session")
def tiny_sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x pipeline saved as a local diffusers folder (loaded from disk by tests)."""
    from app.engine.tiny import build_tiny_sd15

    folder = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_sd15().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start a live server: make_server(models_yaml_text, **settings) → LiveServer (ready)."""
    started: list[LiveServer] = []

    def make(models: str = TINY_MODELS, *, wait_ready: bool = True, **overrides) -> LiveServer:
        folder = tmp_path_factory.mktemp("server")
        overrides.setdefault("api_keys", [API_KEY])
        settings = Settings(models=write_models_file(folder, models), **overrides)
        server = LiveServer(settings).start()
        started.append(server)
        if wait_ready:
            state = server.wait_ready()
            assert state["ready"], state
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(make_server) -> LiveServer:
    """The default server: tiny-sdxl, one CPU worker, key API_KEY."""
    return make_server()


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def body(**fields) -> dict:
    """A small, fast /sd body for the tiny model; fields override."""
    base = {
        "token": API_KEY,
        "model": "tiny-sdxl",
        "prompt": "a lighthouse at dusk",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 1234,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def png(answer: httpx.Response) -> Image.Image:
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    assert image.format == "PNG"
    return image
