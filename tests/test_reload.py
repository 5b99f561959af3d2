"""Rescanning models.yaml without a restart: POST /admin/reload, A1111's refresh routes, SIGHUP."""

from __future__ import annotations

import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from app.engine.tiny import build_tiny_sd15
from tests.conftest import API_KEY, body, png
from tests.live import serve_process

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# reloading takes an admin key; these tests reload back to back (coalescing has its own tests)
ADMIN = {"api_keys": [f"{API_KEY}  admin"], "reload_interval_s": 0}


@pytest.fixture()
def setup(tmp_path: Path, tiny_sd15_folder: Path):
    """A models file with the builtin tiny SDXL and a tiny SD 1.x diffusers folder (a copy,
    so the test may change its files)."""
    folder = tmp_path / "sd15"
    shutil.copytree(tiny_sd15_folder, folder)
    return tmp_path, folder


def _models(folder: Path, *, extra: str = "", with_folder: bool = True) -> str:
    text = "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"
    if with_folder:
        text += f"  folder-sd15: {{source: {folder}}}\n"
    return text + extra


def _write(models_file: Path, text: str) -> None:
    models_file.write_text(text, encoding="utf-8")


def _wait_unloaded(c: httpx.Client, name: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        state = c.get("/ready", headers=AUTH).json()
        if all(name not in w["models"] for w in state["workers"]):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def test_reload_needs_a_key(make_server, setup):
    _, folder = setup
    server = make_server(_models(folder), **ADMIN)
    with server.client() as c:
        answer = c.post("/admin/reload")
        assert answer.status_code == 403
        assert answer.json()["error"]["message"].startswith("Missing API key")
        assert c.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403


def test_added_changed_and_removed_models(make_server, setup):
    _, folder = setup
    server = make_server(_models(folder), **ADMIN)
    models_file = server.app.state.settings.models
    with server.client() as c:
        before = c.post("/sd", json=body(model="folder-sd15"))
        png(before)
        assert "folder-sd15" in c.get("/ready", headers=AUTH).json()["workers"][0]["models"]

        # nothing changed
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["summary"] == "reload: nothing changed"

        # a model added to the file is served at once
        _write(models_file, _models(folder, extra="  late: {source: builtin:tiny-sd15}\n"))
        report = c.post("/admin/reload", headers=AUTH).json()
        assert (report["added"], report["removed"], report["changed"]) == (["late"], [], [])
        assert "late" in c.get("/sd/models-sd").json()
        png(c.post("/sd", json=body(model="late")))

        # the files of a model change (other weights, same names): unloaded, and the next
        # request loads the new weights
        original = folder.parent / "original"
        shutil.copytree(folder, original)
        other = build_tiny_sd15()
        with torch.no_grad():
            for p in other.unet.parameters():
                p.add_(0.05)
        other.save_pretrained(folder)
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["changed"] == ["folder-sd15"], report
        _wait_unloaded(c, "folder-sd15")
        after = c.post("/sd", json=body(model="folder-sd15"))
        png(after)
        assert after.content != before.content
        # the old files back: the old bytes back (nothing of the other weights lingers)
        shutil.rmtree(folder)
        shutil.copytree(original, folder)
        assert c.post("/admin/reload", headers=AUTH).json()["changed"] == ["folder-sd15"]
        assert c.post("/sd", json=body(model="folder-sd15")).content == before.content

        # a removed model: unloaded, then unknown
        _write(models_file, _models(folder, with_folder=False))
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["removed"] == ["folder-sd15", "late"]
        state = _wait_unloaded(c, "folder-sd15")
        assert state["last_reload"]["removed"] == ["folder-sd15", "late"]
        gone = c.post("/sd", json=body(model="folder-sd15"))
        assert gone.status_code == 422 and "doesn't have model" in gone.json()["detail"]
        png(c.post("/sd", json=body()))  # the other model never stopped


@pytest.mark.fullsize  # a 768², 30-step job holds the worker while the model is removed
def test_removed_model_finishes_its_running_job_and_answers_its_waiting_ones(make_server, setup):
    _, folder = setup
    server = make_server(_models(folder), max_batch=1, **ADMIN)
    models_file = server.app.state.settings.models
    with server.client() as c, ThreadPoolExecutor(2) as pool:
        png(c.post("/sd", json=body(model="folder-sd15")))  # loaded
        slow = body(model="folder-sd15", steps=30, width=768, height=768, seed=7)
        running = pool.submit(c.post, "/sd", json=slow)
        deadline = time.monotonic() + 30
        while not c.get("/sdapi/v1/progress", auth=("u", API_KEY)).json()["state"]["job_count"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting = pool.submit(c.post, "/sd", json=body(model="folder-sd15", seed=8))
        while c.get("/ready", headers=AUTH).json()["queue_depth"] < 1:
            assert time.monotonic() < deadline and not running.done()
            time.sleep(0.02)
        _write(models_file, _models(folder, with_folder=False))
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["removed"] == ["folder-sd15"]
        answer = waiting.result(timeout=60)
        assert answer.status_code == 503
        assert "removed from the models file" in answer.json()["detail"]
        png(running.result(timeout=120))  # the running job finished on its model
        _wait_unloaded(c, "folder-sd15")


def test_invalid_file_changes_nothing(make_server, setup):
    _, folder = setup
    server = make_server(_models(folder), **ADMIN)
    with server.client() as c:
        _write(server.app.state.settings.models, "models: [not, a, mapping]\n")
        answer = c.post("/admin/reload", headers=AUTH)
        assert answer.status_code == 500
        assert "reload failed, nothing changed" in answer.json()["detail"]
        a1111 = c.post("/sdapi/v1/refresh-checkpoints", auth=("u", API_KEY))
        assert a1111.status_code == 500 and "nothing changed" in a1111.json()["detail"]
        assert c.get("/ready", headers=AUTH).json()["last_reload"]["error"]
        png(c.post("/sd", json=body(model="folder-sd15")))


@pytest.mark.subprocess
def test_sighup_reloads_the_real_process(tmp_path: Path):
    models = tmp_path / "models.yaml"
    _write(models, "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n")
    proc, url = serve_process(models, API_KEY, log_level="info")
    deadline = time.monotonic() + 120
    try:
        _write(models, "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"
                       "  tiny-sd15: {source: builtin:tiny-sd15}\n")
        proc.send_signal(signal.SIGHUP)
        while "tiny-sd15" not in httpx.get(url + "/sd/models-sd", timeout=5).json():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        state = httpx.get(url + "/ready", headers=AUTH, timeout=5).json()
        assert state["last_reload"]["added"] == ["tiny-sd15"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "reload: models added: tiny-sd15" in out


def test_model_dirs_are_rescanned(make_server, tmp_path: Path):
    """A checkpoint file dropped into a model_dirs folder is served after a reload; one taken
    away is no longer."""
    from tests.original_layout import tiny_sd15, write_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    server = make_server("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"
                         f"model_dirs: [{folder}]\n", **ADMIN)
    with server.client() as c:
        assert c.get("/sd/models-sd").json() == []
        write_checkpoint(tiny_sd15(), "sd15", folder / "dropped-in.safetensors")
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["added"] == ["dropped-in"]
        assert c.get("/sd/models-sd").json() == ["dropped-in"]
        (folder / "dropped-in.safetensors").unlink()
        assert c.post("/admin/reload", headers=AUTH).json()["removed"] == ["dropped-in"]
        assert c.get("/sd/models-sd").json() == []
