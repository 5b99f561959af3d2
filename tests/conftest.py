"""Shared fixtures: tiny models on disk, and real craftserve servers on loopback.

Every server here is the real app under real uvicorn on 127.0.0.1 with a free port
(tests.live.LiveServer), driven over real HTTP with httpx.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.config import Settings
from tests.live import LiveServer

API_KEY = "test-key-123"


# ---- no API key in any log line of the whole session ----------------------------------------
class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a record that cannot be formatted is no leak
            self.lines.append(self.format(record))


_LOGS = _Recorder()
_KEYS_USED: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _record_logs_and_keys():
    """Record every log line of the session at the server's default level (info) and every
    API key any Authenticator was given (or generated); pytest_sessionfinish checks that no
    key appears in any line."""
    from app import auth

    original = auth.Authenticator.__init__

    def recording_init(self, keys, *args, **kwargs):
        original(self, keys, *args, **kwargs)
        for entry in keys:
            _KEYS_USED.add(auth.parse_key_entry(entry).key)
        if self.generated_key:
            _KEYS_USED.add(self.generated_key)

    auth.Authenticator.__init__ = recording_init
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("app", "uvicorn", "uvicorn.access")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(_LOGS)
    yield
    root.removeHandler(_LOGS)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    auth.Authenticator.__init__ = original


@pytest.fixture(scope="session", autouse=True)
def _cache_dir_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Servers keep their cache (the weight files' hashes, CRAFTSERVE_CACHE_DIR) in the
    session's temporary folder, never in the home folder; a test that needs its own passes
    `cache_dir`."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CRAFTSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("craftserve-cache")))
    yield
    patch.undo()


# ---- two tiers: `-m "not slow"` is the fast one ------------------------------------------------
# The markers that say why a test is slow (pyproject.toml); each implies `slow`.
SLOW_BECAUSE = ("soak", "ray", "browser", "fuzz", "subprocess", "bigfile", "fullsize", "compile")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_BECAUSE):
            item.add_marker(pytest.mark.slow)


# ---- pytest-xdist (make test-all's first run: -n 2) -----------------------------------------------
# One worker per core, so one torch thread per worker: torch's default of one thread per core
# in each worker would put twice the threads on the cores, and its threads spin while waiting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    _WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

_WORKER_LEAKS: list[tuple[str, str]] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 - xdist's hook, on the controller
    """A worker's leaks (pytest_sessionfinish below, on the worker) reach the controller."""
    _WORKER_LEAKS.extend(tuple(pair) for pair in getattr(node, "workeroutput", {}).get("key_leaks", []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    keys = {k for k in _KEYS_USED if len(k) >= 6 and not k.startswith("sha256:")}
    leaks = sorted({(k, line) for line in _LOGS.lines for k in keys if k in line})
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports
        workeroutput["key_leaks"] = [list(pair) for pair in leaks]
        return
    leaks = sorted(set(leaks) | set(_WORKER_LEAKS))
    if leaks:
        print(f"\nAPI keys found in the session's logs ({len(leaks)} lines):")
        for key, line in leaks[:20]:
            print(f"  {key!r}: {line[:200]}")
        session.exitstatus = 1


def write_models_file(folder: Path, text: str) -> Path:
    path = folder / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def shipped_models_text() -> str:
    """The shipped models.yaml with its relative paths (the sample LoRA, the LoRA, embedding
    and ControlNet folders) made absolute, for a copy written to another folder."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "models.yaml").read_text(encoding="utf-8")
    return (text.replace("path: loras/", f"path: {root}/loras/")
            .replace("\n  - loras\n", f"\n  - {root}/loras\n")
            .replace("\n  - embeddings\n", f"\n  - {root}/embeddings\n")
            .replace("\n  - controlnet\n", f"\n  - {root}/controlnet\n"))


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

    def make(models: str = TINY_MODELS, *, wait_ready: bool = True, ready_timeout: float = 120.0,
             **overrides) -> LiveServer:
        folder = tmp_path_factory.mktemp("server")
        overrides.setdefault("api_keys", [API_KEY])
        # The shared servers take many deliberate wrong keys from 127.0.0.1; the per-address
        # throttle of failed keys has its own tests (test_edge.py).
        overrides.setdefault("auth_failures_per_minute", 0)
        settings = Settings(models=write_models_file(folder, models), **overrides)
        server = LiveServer(settings).start()
        started.append(server)
        if wait_ready:
            state = server.wait_ready(timeout=ready_timeout)
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


@pytest.fixture()
def network_off(monkeypatch: pytest.MonkeyPatch) -> list:
    """HF_HUB_OFFLINE=1 and every non-loopback connection refused (and recorded)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        loopback = host in ("127.0.0.1", "::1", "localhost")
        if isinstance(host, str) and not loopback and self.family != socket.AF_UNIX:
            attempts.append(address)
            raise OSError(f"network blocked by the test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny SDXL (the refiner of tests/test_refiner.py and test_controlnet_hires.py):
    the tiny model with its UNet, second text encoder and VAE decoder moved by seeded noise, so
    a picture shows whose UNet, encoder and VAE made it."""
    import torch

    from app.engine.tiny import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder_2, pipe.vae.decoder):
            for weight in module.parameters():
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("refiner") / "tiny-refiner"
    pipe.save_pretrained(folder)
    return folder
