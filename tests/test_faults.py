"""Faults injected into a live server: an exception while building a scheduler, applying a
LoRA, encoding the image or loading a model; a model's files deleted while it is loaded; the
image store full.

Each time the affected request gets a clear error in its dialect's shape (no traceback; 500
naming the job for a bug, 503 for a model that cannot be served), the worker lives, and the
NEXT request's bytes equal those of a clean server (`reference`, another live server that
never saw a fault) for the same request.

Faults are injected with monkeypatch on the real objects the live server uses (the names the
worker and the generation core look up at call time), never by mocking the pipeline.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from app.engine import loras as loras_module
from app.engine.tiny import build_tiny_sdxl
from tests.conftest import API_KEY, LiveServer, body, png
from tests.lora_files import write_peft_lora

MODELS = """
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
  tiny-sd15: {{source: builtin:tiny-sd15}}
lora_dirs: [{folder}]
"""

AUTH = {"Authorization": f"Bearer {API_KEY}"}


SECRET = "injected-fault-internals"  # in every injected exception's text: never answered


class Boom(RuntimeError):
    """The injected fault (a name no real error has, so its traceback is easy to spot)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: {SECRET}")


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fault-loras")
    write_peft_lora(build_tiny_sdxl(), folder / "style.safetensors", seed=5)
    return folder


@pytest.fixture(scope="module")
def reference(make_server, lora_folder: Path) -> LiveServer:
    """A clean server: it never sees a fault; its answers are the expected bytes."""
    return make_server(MODELS.format(folder=lora_folder))


@pytest.fixture(scope="module")
def faulty(make_server, lora_folder: Path) -> LiveServer:
    """The server the faults are injected into (same models, same settings)."""
    return make_server(MODELS.format(folder=lora_folder), load_retry_s=0.5)


def expected(server: LiveServer, **fields) -> bytes:
    with server.client() as c:
        answer = c.post("/sd", json=body(**fields))
    png(answer)
    return answer.content


def workers_alive(server: LiveServer) -> list[bool]:
    state = server.ready().json()
    return [w["alive"] for w in state["workers"]]


def assert_clean_error(answer: httpx.Response, status: int, *phrases: str) -> str:
    """The error text of a dialect's answer: the status, JSON, no traceback, the phrases."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    text = answer.text
    assert "Traceback" not in text and SECRET not in text and 'File "' not in text
    data = answer.json()
    if "error" in data and isinstance(data["error"], dict):  # VisionCraft, OpenAI
        message = data["error"]["message"]
    else:  # A1111: {"error", "detail", ...}
        message = data["detail"]
    for phrase in phrases:
        assert phrase in message, message
    return message


# The three dialects, each with its own request for the same image and its own error shape.
def post_dialect(c: httpx.Client, dialect: str, **fields) -> httpx.Response:
    b = body(**fields)
    if dialect == "visioncraft":
        return c.post("/sd", json=b)
    if dialect == "a1111":
        return c.post("/sdapi/v1/txt2img", headers=AUTH, json={
            "prompt": b["prompt"], "steps": b["steps"], "width": b["width"],
            "height": b["height"], "seed": b["seed"], "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "override_settings": {"sd_model_checkpoint": b["model"]},
        })
    return c.post("/v1/images/generations", headers=AUTH, json={
        "model": b["model"], "prompt": b["prompt"], "size": "64x64", "response_format": "b64_json",
    })


def check_a1111_shape(answer: httpx.Response) -> None:
    data = answer.json()
    assert {"error", "detail", "body", "errors"} <= set(data), data


def check_openai_shape(answer: httpx.Response) -> None:
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error


def fault_then_clean(faulty: LiveServer, reference: LiveServer, monkeypatch: pytest.MonkeyPatch,
                     dialect: str, seed: int, phrase: str) -> httpx.Response:
    """One request in `dialect` while the fault is in place: a clean 500 naming its job, and
    the worker lives. Then, the fault undone, the next /sd request (seed + 1) gives the bytes
    of a server that never saw a fault. Returns the faulted answer."""
    with faulty.client() as c:
        answer = post_dialect(c, dialect, seed=seed)
        message = assert_clean_error(answer, 500, phrase, "the server log has the details")
        assert "job-" in message
        assert workers_alive(faulty) == [True]
        monkeypatch.undo()
        assert c.post("/sd", json=body(seed=seed + 1)).content == expected(reference, seed=seed + 1)
    return answer


# ---- an exception while building the scheduler ---------------------------------------------
@pytest.mark.parametrize("dialect", ["visioncraft", "a1111", "openai"])
def test_scheduler_fault(faulty: LiveServer, reference: LiveServer,
                         monkeypatch: pytest.MonkeyPatch, dialect: str) -> None:
    from app.engine import worker

    def broken(*args, **kwargs):
        raise Boom("scheduler construction failed")

    monkeypatch.setattr(worker, "make_scheduler", broken)
    answer = fault_then_clean(faulty, reference, monkeypatch, dialect, 11,
                              "internal error while generating (job ")
    if dialect == "a1111":
        check_a1111_shape(answer)
    if dialect == "openai":
        check_openai_shape(answer)
    assert workers_alive(faulty) == [True]


# ---- an exception while applying a LoRA ------------------------------------------------------
def test_lora_apply_fault_leaves_no_lora_behind(faulty: LiveServer, reference: LiveServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault strikes after the real apply has activated the LoRA (the worst moment): the
    job fails 500, and neither the next plain job nor the next job with the LoRA is changed."""
    real_apply = loras_module.LoraManager.apply

    def apply_then_fail(self, loras):
        real_apply(self, loras)
        raise Boom("LoRA activation failed")

    monkeypatch.setattr(loras_module.LoraManager, "apply", apply_then_fail)
    with faulty.client() as c:
        answer = c.post("/sd", json=body(seed=21, loras={"style": 1.0}))
        assert_clean_error(answer, 500, "internal error while generating (job job-")
        assert workers_alive(faulty) == [True]
        monkeypatch.undo()
        assert c.post("/sd", json=body(seed=21)).content == expected(reference, seed=21)
        with_lora = c.post("/sd", json=body(seed=21, loras={"style": 1.0})).content
        assert with_lora == expected(reference, seed=21, loras={"style": 1.0})


# ---- an exception while encoding the image ---------------------------------------------------
@pytest.mark.parametrize("dialect", ["visioncraft", "a1111", "openai"])
def test_encode_fault(faulty: LiveServer, reference: LiveServer,
                      monkeypatch: pytest.MonkeyPatch, dialect: str) -> None:
    from app.api import generation

    def broken(*args, **kwargs):
        raise Boom("PNG encoder failed")

    monkeypatch.setattr(generation, "encode_image", broken)
    fault_then_clean(faulty, reference, monkeypatch, dialect, 31,
                     "internal error while encoding the image (job job-")


# ---- an exception while loading a model ------------------------------------------------------
def test_model_load_fault_is_503_then_the_model_loads(faulty: LiveServer, reference: LiveServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine import worker

    calls: list[str] = []

    def broken(spec, *args, **kwargs):
        calls.append(spec.name)
        raise Boom("weights unreadable")

    monkeypatch.setattr(worker, "load_model", broken)
    with faulty.client() as c:
        answer = c.post("/sd", json=body(model="tiny-sd15", seed=41))
        message = assert_clean_error(answer, 503, "model 'tiny-sd15' cannot be served now",
                                     "loading it failed")
        assert "Retry-After" in answer.headers
        assert calls == ["tiny-sd15"]
        state = faulty.ready().json()
        assert state["models"]["tiny-sd15"].startswith("unavailable")
        assert workers_alive(faulty) == [True]
        # the other model is untouched meanwhile
        assert c.post("/sd", json=body(seed=42)).content == expected(reference, seed=42)
        monkeypatch.undo()
        time.sleep(0.6)  # load_retry_s=0.5: the next request tries the load again
        fresh = c.post("/sd", json=body(model="tiny-sd15", seed=41)).content
        assert fresh == expected(reference, model="tiny-sd15", seed=41)
    assert "(Boom)" in message  # the exception's type, never its text (checked above)


# ---- a model's files deleted while it is loaded ---------------------------------------------
def test_model_deleted_while_loaded(make_server, tmp_path: Path, tiny_sd15_folder: Path) -> None:
    """The loaded model keeps serving the same bytes; once evicted, loading it again answers
    503 naming the model and why; the other model and the worker are unharmed."""
    local = tmp_path / "local-sd15"
    shutil.copytree(tiny_sd15_folder, local)
    models = f"""
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
  local: {{source: {local}}}
"""
    server = make_server(models, max_models_per_device=1, load_retry_s=0)
    with server.client() as c:
        before = c.post("/sd", json=body(model="local", seed=51))
        png(before)
        sdxl_before = None
        shutil.rmtree(local)
        after = c.post("/sd", json=body(model="local", seed=51))
        assert after.content == before.content  # the loaded pipeline needs no file
        sdxl_before = c.post("/sd", json=body(seed=52))  # evicts `local`
        png(sdxl_before)
        gone = c.post("/sd", json=body(model="local", seed=51))
        assert_clean_error(gone, 503, "model 'local' cannot be served now")
        assert workers_alive(server) == [True]
        again = c.post("/sd", json=body(seed=52))
        assert again.content == sdxl_before.content
        shutil.copytree(tiny_sd15_folder, local)  # put back: served again, same bytes
        assert c.post("/sd", json=body(model="local", seed=51)).content == before.content


# ---- the image store full --------------------------------------------------------------------
def test_image_store_full_drops_the_oldest(faulty: LiveServer, reference: LiveServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = faulty.app.state.images
    with faulty.client() as c:
        first = c.post("/generate", json=body(seed=61, image_count=1))
        assert first.status_code == 200, first.text
        size = len(c.get(first.json()["images"][0]).content)
        monkeypatch.setattr(store, "max_bytes", int(size * 2.5))  # room for two of these
        urls = [c.post("/generate", json=body(seed=62 + i)).json()["images"][0] for i in range(3)]
        assert c.get(first.json()["images"][0]).status_code == 404
        assert c.get(urls[0]).status_code == 404
        for i, url in ((1, urls[1]), (2, urls[2])):
            got = c.get(url)
            assert got.status_code == 200
            assert got.content == expected(reference, seed=62 + i)
        assert store._bytes <= store.max_bytes


def test_images_bigger_than_the_store_are_all_answered(faulty: LiveServer, reference: LiveServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A store smaller than one image: every URL of the answer still works (the request's own
    images never push each other out); the next request's images replace them."""
    store = faulty.app.state.images
    monkeypatch.setattr(store, "max_bytes", 10)
    with faulty.client() as c:
        answer = c.post("/generate", json=body(seed=71, image_count=2))
        assert answer.status_code == 200, answer.text
        urls = answer.json()["images"]
        got = [c.get(url) for url in urls]
        assert [g.status_code for g in got] == [200, 200]
        assert [g.content for g in got] == [expected(reference, seed=71), expected(reference, seed=72)]
        openai = c.post("/v1/images/generations", headers=AUTH, json={
            "model": "tiny-sdxl", "prompt": "a lighthouse at dusk", "size": "64x64", "n": 2,
            "response_format": "url"})
        assert openai.status_code == 200, openai.text
        assert [c.get(d["url"]).status_code for d in openai.json()["data"]] == [200, 200]
        assert [c.get(url).status_code for url in urls] == [404, 404]
        assert workers_alive(faulty) == [True]
