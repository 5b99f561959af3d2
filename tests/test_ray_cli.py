"""`craftserve serve --ray` as a user runs it: its own process, a local Ray it starts itself,
one CPU replica. It serves /sd, re-reads models.yaml on SIGHUP (the ingress and the replica),
and on SIGTERM takes the application and its Ray down and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import API_KEY, body, png, write_models_file
from tests.live import ROOT, free_port

pytestmark = [pytest.mark.ray, pytest.mark.subprocess]

pytest.importorskip("ray.serve", reason="Ray Serve is the `craftserve[ray]` extra")

MODELS = 'models:\n  tiny-sdxl: {source: "builtin:tiny-sdxl", preload: true}\n'


def wait(url: str, predicate, what: str, proc: subprocess.Popen, timeout: float = 150) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"craftserve serve --ray exited: {proc.stdout.read()[-3000:]}"
        try:
            state = httpx.get(url + "/ready", headers={"Authorization": f"Bearer {API_KEY}"},
                              timeout=5).json()
            if predicate(state):
                return state
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:g} s")
        time.sleep(0.25)


def test_serve_ray_serves_reloads_on_sighup_and_stops_on_sigterm(tmp_path) -> None:
    models = write_models_file(tmp_path, MODELS)
    port = free_port()
    env = dict(os.environ, CRAFTSERVE_API_KEYS=API_KEY, CRAFTSERVE_RAY_GPUS_PER_REPLICA="0",
               CRAFTSERVE_RAY_CPUS_PER_REPLICA="1", CRAFTSERVE_AUTH_FAILURES_PER_MINUTE="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--ray", "--port", str(port), "--models", str(models)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait(url, lambda s: s["ready"], "ready", proc)
        answer = httpx.post(url + "/sd", json=body(), timeout=60)
        png(answer)
        assert answer.headers["x-worker"].startswith("Generator#")

        models.write_text(MODELS + '  tiny-extra: {source: "builtin:tiny-sdxl"}\n')
        proc.send_signal(signal.SIGHUP)
        wait(url, lambda s: "tiny-extra" in s["models"]
             and all("tiny-extra" in w["model_states"] for w in s["workers"]), "reloaded", proc, 30)
        png(httpx.post(url + "/sd", json=body(model="tiny-extra"), timeout=60))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        output = proc.stdout.read()
        assert f"craftserve on Ray Serve at http://127.0.0.1:{port}" in output
        assert "craftserve: draining the replicas, then stopping" in output
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
