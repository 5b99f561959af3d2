"""A new user's first hour (issue 25): the shipped defaults serve offline, the examples of the
docs run as written, and nothing waits on a model that loads or cannot.

- Every shell (curl) and Python example of README.md and docs/clients.md, extracted from the
  files themselves, runs against a live server on the shipped models.yaml, with an empty
  Hugging Face cache and no network (tests/test_hub.py's `hub_off`: the Hub's endpoint a
  closed port, anything not loopback refused). Only the host:port and the key are put in;
  curl runs with --fail-with-body (an HTTP error fails the example), every PNG an example
  writes must open. A block preceded by `<!-- not run by tests/test_first_hour.py: why -->`
  is not run (set-up, Docker, a transcript); one preceded by `<!-- continues the example
  above -->` runs after the Python block before it.
- The defaults: A1111's checkpoint, OpenAI's model (absent or `dall-e-2`), the discovery's
  default are `tiny-sdxl` while sdxl-base waits for weights; /ready serves and says so.
- The sample LoRA and embedding are what scripts/make_samples.py writes, and change the image.
- A model whose load hangs and then fails delays nobody: a loaded model's request is served
  in well under a second meanwhile.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.errors import ErrorKind, Unavailable
from tests.conftest import API_KEY, body, png, shipped_models_text
from tests.test_hub import hub_off  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "clients.md"]
NOT_RUN = "not run by tests/test_first_hour.py"
CONTINUES = "continues the example above"
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def doc_blocks(path: Path) -> list[dict]:
    """The fenced blocks of a Markdown file: {lang, code, note (the HTML comment right
    before it, if any), line}."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match or not match[2]:
            i += 1
            continue
        indent, lang, start = match[1], match[2], i
        note = ""
        j = i - 1
        comment: list[str] = []
        while j >= 0 and lines[j].strip() and not lines[j].strip().endswith("```"):
            comment.insert(0, lines[j].strip())
            if lines[j].strip().startswith("<!--"):
                break
            j -= 1
        if comment and comment[0].startswith("<!--"):
            note = " ".join(comment)
        i += 1
        code = []
        while i < len(lines) and lines[i].strip() != "```":
            code.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        blocks.append({"lang": lang, "code": "\n".join(code) + "\n", "note": note,
                       "line": start + 1, "file": path.name})
        i += 1
    return blocks


def runnable(path: Path) -> list[dict]:
    """The shell and Python examples to run, continuations joined to their first part."""
    out: list[dict] = []
    last_python = None
    for block in doc_blocks(path):
        if block["lang"] not in ("bash", "sh", "shell", "python"):
            continue
        if NOT_RUN in block["note"]:
            continue
        if block["lang"] == "python":
            if CONTINUES in block["note"]:
                assert last_python is not None, f"{path.name}:{block['line']} continues nothing"
                block = {**block, "code": last_python["code"] + block["code"]}
            last_python = block
        out.append(block)
    return out


def _shell(code: str) -> str:
    """A `$ command` transcript as the commands alone; other shell code as it is."""
    lines = code.splitlines()
    if not any(line.startswith("$ ") for line in lines):
        return code
    commands: list[str] = []
    going = False
    for line in lines:
        if line.startswith("$ "):
            commands.append(line[2:])
        elif going:
            commands[-1] += "\n" + line
        else:
            continue  # the command's output
        going = _incomplete(commands[-1])
    return "\n".join(commands) + "\n"


def _incomplete(command: str) -> bool:
    """Whether a shell command goes on on the next line: a trailing backslash, or a quote
    still open."""
    if command.endswith("\\"):
        return True
    try:
        shlex.split(command)
    except ValueError:
        return True
    return False


def localised(code: str, url: str, key: str) -> str:
    host = url.removeprefix("http://")
    code = code.replace("http://127.0.0.1:8000", url).replace("127.0.0.1:8000", host)
    code = code.replace("localhost:8000", host).replace('port=8000', f"port={host.split(':')[1]}")
    code = code.replace("YOUR_KEY", key).replace("your_api_key", key)
    return re.sub(r"\bKEY\b", key, code)


def _curl_failing_on_errors(folder: Path) -> dict:
    """PATH with a `curl` that fails on an HTTP error (--fail-with-body), as the docs' own
    curl would show the error; the real curl does the rest."""
    real = shutil.which("curl")
    assert real, "curl is needed to run the docs' examples"
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "curl"
    wrapper.write_text(f'#!/bin/sh\nexec {real} --fail-with-body "$@"\n', encoding="utf-8")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1,localhost")


def _pngs(folder: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in folder.glob("*.png")}


def _shipped_server(make_server):  # noqa: ANN001, ANN202
    from tests.live import LiveServer  # noqa: F401 - make_server's kind

    return make_server(shipped_models_text(), wait_ready=False)


def _wait_preloaded(server, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not all(w["preloaded"] for w in server.ready().json()["workers"]):
        assert time.monotonic() < deadline, server.ready().json()
        time.sleep(0.05)


# ---- the docs' examples on a fresh clone's defaults, offline --------------------------------
def test_the_examples_are_found() -> None:
    """The extraction sees the docs' examples (a parser that finds none would pass anything)."""
    readme, clients = (runnable(path) for path in DOCS)
    assert len(readme) >= 5 and len(clients) >= 8
    assert any("/sdapi/v1/txt2img" in b["code"] for b in readme)
    assert any("images.edit" in b["code"] and "OpenAI(" in b["code"] for b in clients)  # joined
    assert any("tiny-canny" in b["code"] and "/controlnet/detect" in b["code"] for b in readme)
    assert any("ControlNetUnit" in b["code"] and "WebUIApi(" in b["code"] for b in clients)  # joined
    assert not any("docker build" in b["code"] or "make serve" in b["code"] for b in readme)


@pytest.mark.subprocess
def test_every_example_of_the_docs_runs_offline_on_the_defaults(
        hub_off: dict, make_server, tmp_path: Path) -> None:  # noqa: F811
    """Each example answers as the docs say: exit status 0, no HTTP error, every PNG it
    writes opens. The Hub is asked once in all, nothing else outside is reached."""
    server = _shipped_server(make_server)
    _wait_preloaded(server)
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    env = _curl_failing_on_errors(tmp_path)
    ran = []
    for path in DOCS:
        for block in runnable(path):
            where = f"{block['file']}:{block['line']}"
            code = localised(block["code"], server.url, API_KEY)
            before = _pngs(work)
            if block["lang"] == "python":
                command = [sys.executable, "-c", code]
            else:
                command = ["bash", "-c", "set -euo pipefail\n" + _shell(code)]
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=240)
            assert done.returncode == 0, \
                f"{where} failed:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            for png_path, mtime in _pngs(work).items():
                if before.get(png_path) != mtime:
                    with Image.open(png_path) as image:
                        assert image.format == "PNG", f"{where}: {png_path.name} is not a PNG"
                        image.load()
            ran.append(where)
    assert len(ran) >= 25, ran
    assert hub_off["outside"] == []
    assert len(hub_off["hub"]) <= 1  # the Hub asked once (or not at all: the cache answered)


def test_the_defaults_serve_offline_and_say_what_waits(hub_off: dict, make_server) -> None:  # noqa: F811
    """sdxl-base first in models.yaml, its weights absent, no network: the default is
    tiny-sdxl everywhere, and /ready, /sd/models-status, /v1/models say sdxl-base waits."""
    server = _shipped_server(make_server)
    _wait_preloaded(server)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with server.client() as c:
        ready = c.get("/ready")
        assert ready.status_code == 200, ready.json()
        assert ready.json()["status"] == "serving, some models wait for weights"
        assert ready.json()["waiting_for_weights"] == ["sdxl-base"]
        assert "last_reload" in server.ready().json()  # null until a reload
        assert server.ready().json()["last_reload"] is None
        status = {m["name"]: m for m in c.get("/sd/models-status").json()}
        assert status["tiny-sdxl"]["default"] and not status["sdxl-base"]["default"]
        assert status["sdxl-base"]["state"] == "waiting for weights"
        assert status["sdxl-base"]["weights_here"] is False
        assert status["tiny-sdxl"]["state"] == "loaded"
        options = c.get("/sdapi/v1/options", headers=auth).json()
        assert options["sd_model_checkpoint"] == "tiny-sdxl"
        models = {m["id"]: m for m in c.get("/v1/models", headers=auth).json()["data"]}
        assert models["sdxl-base"]["waiting_for_weights"] and models["tiny-sdxl"]["default"]
        for name in (None, "dall-e-2", "dall-e-3", "gpt-image-1"):
            sent = {"prompt": "a lighthouse", "size": "64x64", "steps": 2, "seed": 7,
                    "response_format": "b64_json"}
            if name:
                sent["model"] = name
            answer = c.post("/v1/images/generations", headers=auth, json=sent)
            assert answer.status_code == 200, (name, answer.text)
            picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
            assert "tiny-sdxl" in picture.info["parameters"]
        assert c.get("/v1/models/dall-e-2", headers=auth).json()["id"] == "dall-e-2"


def test_an_alias_still_wins_over_the_default(make_server) -> None:
    server = make_server("""
models:
  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}
  other: {source: builtin:tiny-sdxl}
""", openai_model_aliases={"dall-e-2": "other"})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with server.client() as c:
        answer = c.post("/v1/images/generations", headers=auth, json={
            "model": "dall-e-2", "prompt": "x", "size": "64x64", "steps": 2, "response_format": "b64_json"})
        picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert "Model: other" in picture.info["parameters"]


def test_a_server_whose_only_model_waits_cannot_serve(hub_off: dict, make_server) -> None:  # noqa: F811
    server = make_server("""
models:
  far-away: {source: craftserve-tests/not-here, family: sdxl, preload: true}
""", wait_ready=False, allow_downloads=False)
    _wait_preloaded(server)
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "cannot serve"
    assert ready.json()["models"] == {"far-away": "waiting for weights"}


# ---- the samples made for tiny-sdxl ----------------------------------------------------------
def _make_samples():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "scripts" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_samples_are_what_the_script_writes(tmp_path: Path) -> None:
    samples = _make_samples()
    samples.write(tmp_path / "lora.safetensors", tmp_path / "embedding.safetensors",
                  tmp_path / "controlnet.safetensors")
    assert (tmp_path / "lora.safetensors").read_bytes() == samples.LORA.read_bytes()
    assert (tmp_path / "embedding.safetensors").read_bytes() == samples.EMBEDDING.read_bytes()
    assert (tmp_path / "controlnet.safetensors").read_bytes() == samples.CONTROLNET.read_bytes()
    assert samples.CONTROLNET.stat().st_size < 1_200_000  # small enough to commit


def test_the_sample_controlnet_is_tiny_sdxls_encoder_with_live_zero_convolutions() -> None:
    """Read with safetensors and compared with tiny-sdxl's UNet built here: the mirrored
    layers are the UNet's (in half precision), the zero convolutions are not zero."""
    import torch
    from safetensors.torch import load_file

    from app.engine.tiny import build_tiny_sdxl

    tensors = load_file(str(ROOT / "controlnet" / "tiny-canny.safetensors"))
    unet = build_tiny_sdxl().unet.state_dict()
    mirrored = [k for k in tensors if k.startswith(("conv_in.", "time_embedding.", "add_embedding.",
                                                    "down_blocks.", "mid_block."))]
    assert len(mirrored) > 50
    for key in mirrored:
        assert torch.equal(tensors[key].float(), unet[key].half().float()), key
    zero_convs = [k for k in tensors if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))]
    assert zero_convs and all(tensors[k].abs().max() > 0.1 for k in zero_convs)


def test_the_samples_fit_tiny_sdxl_and_change_the_image(hub_off: dict, make_server, server) -> None:  # noqa: F811
    """Against a server without them (the suite's tiny-sdxl): the same request gives the same
    pixels, the LoRA and the embedding's word give other pixels."""
    shipped = _shipped_server(make_server)
    _wait_preloaded(shipped)
    with shipped.client() as c, server.client() as plain:
        assert "tiny-style" in c.get("/loras-xl").json()
        assert {"name": "tiny-token", "family": "sdxl", "vectors": 2} in c.get("/sd/embeddings").json()
        base = png(c.post("/sd", json=body(prompt="a house")))
        assert base.tobytes() == png(plain.post("/sd", json=body(prompt="a house"))).tobytes()
        styled = png(c.post("/sd", json=body(prompt="a house", loras={"tiny-style": 0.8})))
        assert styled.tobytes() != base.tobytes()
        token = png(c.post("/sd", json=body(prompt="a tiny-token house")))
        without = png(plain.post("/sd", json=body(prompt="a tiny-token house")))
        assert token.tobytes() != without.tobytes()
        _the_sample_controlnet_changes_the_image(c)


def _the_sample_controlnet_changes_the_image(c) -> None:  # noqa: ANN001
    """tiny-canny is listed, fits tiny-sdxl (a unit runs) and changes the picture; the same
    unit at weight 0 gives the picture without it."""
    import numpy as np

    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert c.get("/controlnet/model_list", headers=auth).json()["model_list"][0].startswith("tiny-canny [")
    house = base64.b64encode((ROOT / "examples" / "house.png").read_bytes()).decode()
    request = {"model": "tiny-sdxl", "prompt": "a house", "size": "128x128", "steps": 4, "seed": 5,
               "response_format": "b64_json"}

    def generate(**extra: object) -> np.ndarray:
        answer = c.post("/v1/images/generations", headers=auth, json={**request, **extra})
        assert answer.status_code == 200, answer.text
        data = base64.b64decode(answer.json()["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)

    plain = generate()
    unit = {"model": "tiny-canny", "module": "canny", "image": house, "processor_res": 128}
    assert np.abs(generate(controlnet=[unit]) - plain).mean() > 1
    assert np.abs(generate(controlnet=[{**unit, "weight": 0}]) - plain).max() <= 1


# ---- loading one model never delays another's jobs -------------------------------------------
def test_a_loaded_model_serves_at_once_while_another_fails_to_load(make_server) -> None:
    server = make_server("""
models:
  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}
  stuck: {source: builtin:tiny-sd15}
""", max_batch=1)
    worker = server.app.state.engine.workers[0]
    gate = threading.Event()
    real_load = worker._load

    def load(spec):  # noqa: ANN001, ANN202
        if spec.name == "stuck":  # as a Hub that does not answer, then gives up
            gate.wait(30)
            raise Unavailable("model 'stuck' cannot be served now: injected failure",
                              kind=ErrorKind.MODEL_UNAVAILABLE)
        return real_load(spec)

    worker._load = load
    with server.client() as c, server.client() as other:
        stuck: dict = {}
        thread = threading.Thread(target=lambda: stuck.setdefault("answer", other.post(
            "/sd", json=body(model="stuck"))))
        thread.start()
        deadline = time.monotonic() + 30
        while "stuck" not in worker.slot.loading:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        png(c.post("/sd", json=body()))
        assert time.monotonic() - started < 0.8  # served while the other model loads
        gate.set()
        thread.join(30)
        assert stuck["answer"].status_code == 503
        assert "injected failure" in stuck["answer"].json()["detail"]
        started = time.monotonic()
        again = c.post("/sd", json=body(model="stuck"))
        assert again.status_code == 503 and time.monotonic() - started < 0.5  # at once
        png(c.post("/sd", json=body()))
