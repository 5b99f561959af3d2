"""craftserve in this process: the real app under real uvicorn on a loopback port, on a
background thread. For tests and benchmarks that drive the server over real HTTP.

A test helper, not part of the served package: scripts import it as `tests.live` with the
repository root on sys.path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from app.auth import parse_key_entry
from app.cli import uvicorn_options
from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parent.parent


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        keys = [parse_key_entry(k).key for k in settings.all_api_keys()]
        keys = [k for k in keys if not k.startswith("sha256:")]  # a digest is not a key
        # /ready shows its details (workers, failures' text) to a request with a valid key
        self.ready_headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        # IPPROTO_TCP explicitly: asyncio then sets TCP_NODELAY on accepted connections, as
        # on the socket `craftserve serve` lets uvicorn create. With protocol 0 it does not,
        # and each keep-alive response waits ~40 ms for the client's delayed ACK (Nagle).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5,
                                **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, timeout: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Poll /ready (with the first key: its details) until 200, a model is reported
        unavailable, or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            answer = httpx.get(self.url + "/ready", headers=self.ready_headers, timeout=10)
            state = answer.json()
            failed = [r for r in state.get("reasons", []) if "unavailable" in r]
            if answer.status_code == 200 or failed or time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    def ready(self) -> httpx.Response:
        """GET /ready with the first key: the detailed answer (workers, failures' text)."""
        return httpx.get(self.url + "/ready", headers=self.ready_headers, timeout=10)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(models: Path, key: str, **env: str) -> tuple[subprocess.Popen, str]:
    """`craftserve serve` as its own process (signals, stdout) on a free port, once /ready
    says 200: (the process, its URL). `env`: CRAFTSERVE_* settings, without the prefix."""
    port = free_port()
    environ = dict(os.environ, CRAFTSERVE_API_KEYS=key,
                   **{f"CRAFTSERVE_{name.upper()}": value for name, value in env.items()})
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--models", str(models)],
        cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"craftserve serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("craftserve serve was not ready within 120 s")
        time.sleep(0.1)
