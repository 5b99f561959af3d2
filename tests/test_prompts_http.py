"""A1111 prompt syntax through the real HTTP stack: refused weights on every route, long
prompts, batches of jobs whose prompts encode to different lengths, textual inversion files."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from app.engine.tiny import build_tiny_sdxl
from tests.conftest import API_KEY, body, png
from tests.live import LiveServer
from tests.lora_files import write_peft_lora
from tests.test_engine import queued_behind_one

MODELS = """
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
  tiny-sd15: {{source: builtin:tiny-sd15, preload: true}}
lora_dirs: [{loras}]
embedding_dirs: [{folder}]
"""
BEARER = {"Authorization": f"Bearer {API_KEY}"}
LONG = " ".join(["x"] * 75)  # 75 tokens of the tiny tokenizer: exactly one chunk


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(7)
    save_file({"emb_params": torch.randn(2, 32, generator=generator)}, folder / "easyneg.safetensors")
    save_file({"clip_l": torch.randn(3, 32, generator=generator),
               "clip_g": torch.randn(3, 32, generator=generator)}, folder / "xlneg.safetensors")
    (folder / "pickled.pt").write_bytes(b"not read")
    save_file({"something": torch.zeros(2)}, folder / "foreign.safetensors")
    return folder


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prompt-loras")
    write_peft_lora(build_tiny_sdxl(), folder / "te-lora.safetensors", seed=2, text_encoder=True)
    return folder


@pytest.fixture(scope="module")
def server(make_server, folder: Path, loras: Path) -> LiveServer:
    return make_server(MODELS.format(folder=folder, loras=loras), max_batch=4, batch_window_ms=200)


@pytest.fixture(scope="module")
def plain_server(make_server, loras: Path) -> LiveServer:
    """The same models and LoRAs without embeddings, and batches of one."""
    return make_server(MODELS.replace("embedding_dirs: [{folder}]\n", "").format(loras=loras),
                       max_batch=1)


def image(c: httpx.Client, **fields) -> bytes:
    answer = c.post("/sd", json=body(**fields))
    png(answer)
    return answer.content


# ---- refused weights, on every route -------------------------------------------------------
@pytest.mark.parametrize(("field", "text", "fragment"), [
    ("prompt", "a (cat:1e400)", "(cat:1e400)"),
    ("prompt", "a (cat:nan) b", "(cat:nan)"),
    ("negative_prompt", "(blurry:101)", "(blurry:101)"),
    ("prompt", "(" * 500 + "x", "x"),
])
def test_refused_weights_are_422_naming_the_fragment(server: LiveServer, field: str, text: str,
                                                     fragment: str) -> None:
    with server.client() as c:
        answer = c.post("/sd", json=body(**{field: text}))
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert f"doesn't have {field} {fragment!r}" in detail and "-100 to 100" in detail
        a1111 = c.post("/sdapi/v1/txt2img", headers=BEARER,
                       json={"prompt": "a cat", "steps": 4, "width": 64, "height": 64, field: text})
        assert a1111.status_code == 422, a1111.text
        assert fragment in a1111.json()["detail"]
        if field == "prompt":
            openai = c.post("/v1/images/generations", headers=BEARER,
                            json={"prompt": text, "model": "tiny-sdxl", "size": "64x64", "steps": 2})
            assert openai.status_code == 400, openai.text  # OpenAI's status for a bad value
            assert openai.json()["error"]["param"] == "prompt"
            assert fragment in openai.json()["error"]["message"]


# ---- the syntax and long prompts change the image --------------------------------------------
def test_weights_and_the_76th_token_change_the_image(server: LiveServer) -> None:
    with server.client() as c:
        plain = image(c, prompt="a lighthouse at dusk")
        assert image(c, prompt="a (lighthouse:1.4) at dusk") != plain
        assert image(c, prompt="a lighthouse at dusk \\(x\\)") != plain
        # Up to 75 tokens one chunk; the 76th (dropped before) now makes another.
        assert image(c, prompt=LONG + " y") != image(c, prompt=LONG + " z")
        assert image(c, prompt=LONG + " y", model="tiny-sd15") != image(c, prompt=LONG + " z",
                                                                         model="tiny-sd15")


def test_plain_prompts_keep_their_bytes(server: LiveServer, plain_server: LiveServer) -> None:
    # A plain prompt goes the pipeline's own way; the PNG is the same whatever else is served.
    with server.client() as c, plain_server.client() as p:
        for model in ("tiny-sdxl", "tiny-sd15"):
            fields = {"model": model, "prompt": "a lighthouse, at dusk", "negative_prompt": "fog"}
            assert image(c, **fields) == image(p, **fields)


# ---- batches: jobs whose prompts encode to different lengths --------------------------------
def test_jobs_of_different_chunk_counts_batch_and_keep_their_bytes(
        server: LiveServer, plain_server: LiveServer) -> None:
    # With a LoRA that changes the text encoders: prompts are encoded while it is active. The
    # first job, plain, is encoded by the pipeline when alone and by app.engine.prompts here.
    lora = {"te-lora": 0.8}
    jobs = [body(seed=11, prompt="a lighthouse", negative_prompt="fog", loras=lora),
            body(seed=12, prompt="a (lighthouse:1.3), [fog]", negative_prompt="fog", loras=lora),
            body(seed=13, prompt=LONG + " y", negative_prompt="fog", loras=lora),
            body(seed=14, prompt="a lighthouse", negative_prompt=LONG + ", blurry", loras=lora)]
    together = queued_behind_one(server, jobs)
    with plain_server.client() as solo:
        alone = [solo.post("/sd", json=j) for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert a.headers["x-batch-size"] == "4" and b.headers["x-batch-size"] == "1"
        assert a.content == b.content


# ---- textual inversion ---------------------------------------------------------------------
def test_embeddings_are_listed_by_family(server: LiveServer) -> None:
    # pickled.pt (a pickle) and foreign.safetensors (no embedding keys) are not served.
    with server.client() as c:
        listed = c.get("/sd/embeddings").json()
        a1111 = c.get("/sdapi/v1/embeddings", headers=BEARER).json()
    assert listed == [{"name": "easyneg", "family": "sd15", "vectors": 2},
                      {"name": "xlneg", "family": "sdxl", "vectors": 3}]
    # A1111's shape: `loaded` those of the current checkpoint's family (tiny-sdxl), `skipped` others.
    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert a1111 == {"loaded": {"xlneg": {**entry, "shape": 64, "vectors": 3}},
                     "skipped": {"easyneg": {**entry, "shape": 32, "vectors": 2}}}


def test_an_embedding_changes_the_image_in_its_family_only(
        server: LiveServer, plain_server: LiveServer) -> None:
    with server.client() as c, plain_server.client() as p:
        for model, own, other in (("tiny-sd15", "easyneg", "xlneg"), ("tiny-sdxl", "xlneg", "easyneg")):
            fields = {"model": model, "prompt": "a lighthouse", "negative_prompt": f"{own}, fog"}
            assert image(c, **fields) != image(p, **fields)
            # The other family's file is not used: its name stays plain text.
            fields = {"model": model, "prompt": f"a lighthouse, {other}"}
            assert image(c, **fields) == image(p, **fields)


def test_clip_skip_on_every_dialect(server: LiveServer) -> None:
    with server.client() as c:
        one = image(c, model="tiny-sd15")
        two = c.post("/sd", json=body(model="tiny-sd15", clip_skip=2))
        assert png(two).text["parameters"].count("Clip skip: 2") == 1
        assert two.content != one
        # SDXL: the penultimate layer whatever the clip skip, as A1111: the same pixels.
        pixels = [png(c.post("/sd", json=body(model="tiny-sdxl", **skip))).tobytes()
                  for skip in ({"clip_skip": 2}, {})]
        assert pixels[0] == pixels[1]
        bad = c.post("/sd", json=body(clip_skip=13))
        assert bad.status_code == 422 and "clip_skip" in bad.json()["detail"]
        openai = c.post("/v1/images/generations", headers=BEARER, json={
            "prompt": "a lighthouse at dusk", "model": "tiny-sd15", "size": "64x64", "steps": 4,
            "seed": 1234, "clip_skip": 2, "response_format": "b64_json"})
        assert openai.status_code == 200, openai.text
        bad = c.post("/v1/images/generations", headers=BEARER, json={
            "prompt": "a cat", "model": "tiny-sd15", "size": "64x64", "clip_skip": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "clip_skip"
        assert bad.json()["error"]["type"] == "invalid_request_error"
