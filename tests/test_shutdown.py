"""SIGTERM on the real `craftserve serve` process: stop taking jobs, finish the running one,
answer the waiting ones 503, exit."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, body
from tests.live import serve_process

pytestmark = pytest.mark.subprocess


def test_sigterm_finishes_running_and_refuses_waiting(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n")
    proc, url = serve_process(models, API_KEY, max_batch="1", shutdown_grace_s="120",
                              log_level="warning")
    try:
        slow = body(steps=30, width=512, height=512, seed=1)  # seconds on a CPU
        with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(3) as pool:
            running = pool.submit(c.post, "/sd", json=slow)
            time.sleep(0.5)  # the first job is now on the worker
            waiting = [pool.submit(c.post, "/sd", json=body(seed=s)) for s in (2, 3)]
            deadline = time.monotonic() + 30
            auth = {"Authorization": f"Bearer {API_KEY}"}  # /ready's queue_depth needs a key
            while httpx.get(url + "/ready", headers=auth, timeout=5).json()["queue_depth"] < 2:
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
