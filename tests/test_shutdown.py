"""SIGTERM on the real `craftserve serve` process: stop taking jobs, finish the running one,
answer the waiting ones 503, exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import API_KEY, body

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_running_and_refuses_waiting(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n")
    port = free_port()
    env = dict(os.environ, CRAFTSERVE_API_KEYS=API_KEY, CRAFTSERVE_MAX_BATCH="1",
               CRAFTSERVE_SHUTDOWN_GRACE_S="120", CRAFTSERVE_LOG_LEVEL="warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--models", str(models)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        slow = body(steps=30, width=512, height=512, seed=1)  # seconds on a CPU
        with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(3) as pool:
            running = pool.submit(c.post, "/sd", json=slow)
            time.sleep(0.5)  # the first job is now on the worker
            waiting = [pool.submit(c.post, "/sd", json=body(seed=s)) for s in (2, 3)]
            deadline = time.monotonic() + 30
            while httpx.get(url + "/ready", timeout=5).json()["queue_depth"] < 2:
                assert time.monotonic() < deadline and not running.done()
                time.sleep(0.02)
            assert not running.done()
            proc.send_signal(signal.SIGTERM)
            answers = [w.result() for w in waiting]
            finished = running.result()
        if finished.status_code != 200:
            proc.wait(60)
            raise AssertionError(proc.stdout.read()[-3000:])
        for answer in answers:
            assert answer.status_code == 503
            assert "shutting down" in answer.json()["detail"]
        # uvicorn re-raises the signal after its graceful shutdown: killed by SIGTERM, cleanly
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
