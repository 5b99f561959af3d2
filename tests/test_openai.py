"""OpenAI images (`/v1`) through the real openai SDK and the bodies Open WebUI and LibreChat send
(../shared/api/dialects.md), against the real server with the tiny SDXL pipeline."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from app.api import openai_images
from app.api.errors import ErrorInfo
from app.api.openai_images import translate as openai_translate
from tests.conftest import API_KEY, body, png
from tests.live import LiveServer
from tests.test_engine import HeldWorker, wait_for

ALIASES = {"dall-e-3": "tiny-sdxl", "gpt-image-1": "tiny-sdxl", "dall-e-2": "tiny-sdxl"}
# /sd's body() in /v1 terms: the extensions carry what OpenAI has no field for.
EXTRA = {"steps": 4, "seed": 1234}
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(make_server) -> LiveServer:
    return make_server(openai_model_aliases=ALIASES)


@pytest.fixture()
def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture()
def client(server: LiveServer):
    with server.client(headers=AUTH) as c:
        yield c


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def from_b64(item) -> Image.Image:
    return decoded(base64.b64decode(item.b64_json if hasattr(item, "b64_json") else item["b64_json"]))


def seed_of(image: Image.Image) -> int:
    return int(image.text["parameters"].split("Seed: ")[1].split(",")[0])


def error_of(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in answer.text
    return error


# ---- the openai SDK ----------------------------------------------------------------------------
def test_b64_json_gives_the_same_pixels_as_sd(sdk: openai.OpenAI, server: LiveServer) -> None:
    answer = sdk.images.generate(
        model="tiny-sdxl", prompt="a lighthouse at dusk", size="64x64", response_format="b64_json",
        extra_body={**EXTRA, "sampler": "Euler a", "cfg_scale": 6.5, "negative_prompt": "fog"},
    )
    assert answer.size == "64x64" and answer.output_format == "png" and answer.created > 0
    (item,) = answer.data
    assert item.url is None and item.revised_prompt is None
    via_v1 = from_b64(item)
    with server.client() as c:
        via_sd = png(c.post("/sd", json=body(sampler="Euler a", cfg_scale=6.5, negative_prompt="fog")))
    assert via_v1.size == (64, 64)
    assert np.array_equal(np.asarray(via_v1), np.asarray(via_sd))
    assert via_v1.text["parameters"] == via_sd.text["parameters"]


def test_url_answer_is_fetched_with_or_without_the_key(sdk: openai.OpenAI, server: LiveServer) -> None:
    answer = sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", size="64x72", extra_body=EXTRA)
    (item,) = answer.data
    assert item.b64_json is None
    assert item.url.startswith(server.url + "/v1/images/files/") and item.url.endswith(".png")
    plain = httpx.get(item.url, timeout=30)
    with_key = httpx.get(item.url, headers=AUTH, timeout=30)
    assert plain.content == with_key.content
    image = png(plain)
    assert image.size == (64, 72) and seed_of(image) == 1234
    assert httpx.get(item.url[:-4] + ".jpeg", timeout=30).status_code == 404  # the type is kept
    gone = httpx.get(server.url + "/v1/images/files/not-a-key.png", timeout=30)
    assert error_of(gone, 404)["message"].startswith("no such image")


def test_n_images_have_seeds_seed_plus_i(sdk: openai.OpenAI, server: LiveServer) -> None:
    answer = sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse at dusk", size="64x64", n=3,
                                 response_format="b64_json", extra_body={"steps": 4, "seed": 500})
    images = [from_b64(item) for item in answer.data]
    assert [seed_of(i) for i in images] == [500, 501, 502]
    with server.client() as c:
        alone = png(c.post("/sd", json=body(seed=502)))
    assert np.array_equal(np.asarray(images[2]), np.asarray(alone))


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_answers(sdk: openai.OpenAI, output_format: str, pil_format: str) -> None:
    sizes = {}
    for compression in (30, 95):
        answer = sdk.images.generate(
            model="tiny-sdxl", prompt="a lighthouse", size="64x64", response_format="b64_json",
            output_format=output_format, output_compression=compression, extra_body=EXTRA,
        )
        assert answer.output_format == output_format
        data = base64.b64decode(answer.data[0].b64_json)
        image = decoded(data)
        assert image.format == pil_format and image.size == (64, 64)
        comment = image.getexif().get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\0") and "Seed: 1234" in comment[8:].decode("utf-16-be")
        sizes[compression] = len(data)
    assert sizes[30] < sizes[95]
    by_url = sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", size="64x64",
                                 output_format=output_format, extra_body=EXTRA)
    url = by_url.data[0].url
    assert url.endswith(f".{output_format}")
    fetched = httpx.get(url, timeout=30)
    assert fetched.headers["content-type"] == f"image/{output_format}"
    assert decoded(fetched.content).format == pil_format
    assert httpx.get(url[: -len(output_format)] + "png", timeout=30).status_code == 404


def test_models_list_and_retrieve(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == "tiny-sdxl" and set(ids[1:]) == set(ALIASES)
    assert all(m.object == "model" and m.owned_by == "craftserve" and m.created > 0 for m in models.data)
    assert sdk.models.retrieve("dall-e-3").id == "dall-e-3"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


def test_aliases_and_absent_model_use_served_models(sdk: openai.OpenAI, server: LiveServer) -> None:
    first = sdk.images.generate(model="dall-e-3", prompt="a lighthouse", size="64x64",
                                response_format="b64_json", extra_body=EXTRA)
    absent = sdk.images.generate(prompt="a lighthouse", size="64x64", response_format="b64_json",
                                 extra_body=EXTRA)
    assert "Model: tiny-sdxl" in from_b64(first.data[0]).text["parameters"]
    assert first.data[0].b64_json == absent.data[0].b64_json


def test_errors_are_sdk_exceptions(sdk: openai.OpenAI, server: LiveServer) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.images.generate(model="tiny-sdxl", prompt="a lighthouse", size="0x0")  # the key first
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    assert auth.value.response.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in ({}, {"authorization": "Bearer"}):
        anonymous = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a"},
                               headers=headers, timeout=30)
        assert "Missing API key" in error_of(anonymous, 401)["message"]
    # every route takes the key the same ways: HTTP Basic's password is one (user:pass here)
    wrong = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a"},
                       headers={"authorization": "Basic dXNlcjpwYXNz"}, timeout=30)
    assert error_of(wrong, 401)["message"] == "Invalid API key"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.images.generate(model="sdxl-turbo", prompt="a lighthouse")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert "tiny-sdxl" in missing.value.message and "dall-e-3" in missing.value.message
    for size in ("0x0", "99999x1", "abc", "64x", "1024*1024", "", "６４x６４"):
        with pytest.raises(openai.BadRequestError) as bad_size:
            sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", size=size)
        assert bad_size.value.param == "size", size
        assert bad_size.value.response.headers["x-should-retry"] == "false"
    for n in (0, 100, -1):
        with pytest.raises(openai.BadRequestError) as bad_n:
            sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", n=n)
        assert bad_n.value.param == "n" and "CRAFTSERVE_OPENAI_MAX_IMAGES" in bad_n.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "base64"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"n": True}, "n"),
        ({"n": "two"}, "n"),
        ({"steps": 151}, "steps"),
        ({"steps": 0}, "steps"),
        ({"cfg_scale": 0}, "cfg_scale"),
        ({"seed": -2}, "seed"),
        ({"stream": True}, "stream"),
        ({"sampler": "Euler b"}, "sampler"),
        ({"loras": {"nope": 0.5}}, "loras"),
        ({"loras": {"nope": "heavy"}}, "loras"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"size": 1024}, "size"),
    ],
)
def test_bad_fields_are_400_naming_the_param(client: httpx.Client, fields: dict, param: str) -> None:
    answer = client.post("/v1/images/generations", json={"model": "tiny-sdxl", "prompt": "a", **fields})
    error = error_of(answer, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert answer.headers["x-should-retry"] == "false"


def test_missing_prompt_and_malformed_json(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/images/generations", json={"model": "tiny-sdxl"}), 400)
    assert error["param"] == "prompt" and error["code"] == "missing_required_parameter"
    malformed = client.post("/v1/images/generations", content=b'{"prompt": ',
                            headers={"content-type": "application/json"})
    assert error_of(malformed, 400)["code"] == "invalid_json"
    assert error_of(client.get("/v1/images/generations"), 405)["type"] == "invalid_request_error"
    assert error_of(client.post("/v1/images/masks", json={}), 404)["message"] == "Not Found"


def test_base64_in_unexpected_places_is_refused_briefly(client: httpx.Client) -> None:
    blob = base64.b64encode(bytes(range(256)) * 400).decode()  # ~136 kB
    for fields, param, status in [
        ({"size": blob}, "size", 400),
        ({"model": "data:image/png;base64," + blob}, "model", 400),  # longer than any name
        ({"sampler": blob}, "sampler", 400),
        ({"loras": {blob: 1.0}}, "loras", 400),
        ({"prompt": blob}, "prompt", 400),
        ({"negative_prompt": blob}, "negative_prompt", 400),
    ]:
        answer = client.post("/v1/images/generations", json={"model": "tiny-sdxl", "prompt": "a", **fields})
        error = error_of(answer, status)
        assert error["param"] == param
        assert len(answer.content) < 1000, answer.text[:300]
    # Where nothing reads a field, a blob is just ignored.
    answer = client.post("/v1/images/generations", json={
        "model": "tiny-sdxl", "prompt": "a", "size": "64x64", "user": blob, "image": blob,
        "response_format": "b64_json", **EXTRA})
    assert answer.status_code == 200, answer.text[:300]


def test_renderer_tells_the_sdk_what_to_retry() -> None:
    def headers(status: int, kind: str, extra: dict | None = None):
        return openai_images.render_error(None, ErrorInfo(status, "m", kind, headers=extra or {})).headers

    assert headers(500, "internal")["x-should-retry"] == "false"
    assert headers(503, "model_unavailable", {"Retry-After": "60"})["x-should-retry"] == "false"
    assert headers(503, "out_of_memory")["x-should-retry"] == "false"
    full = headers(503, "queue_full", {"Retry-After": "3"})
    assert "x-should-retry" not in full and full["retry-after"] == "3"
    assert "x-should-retry" not in headers(429, "rate_limited", {"Retry-After": "9"})
    assert headers(404, "model_not_found")["x-should-retry"] == "false"


def test_full_queue_is_503_with_retry_after(make_server) -> None:
    """The queue every key shares is full: another key than the one waiting gets 503 (the
    waiting key is past its own share first: 429, tests/test_quota.py)."""
    server = make_server(max_queue=1, max_batch=1, api_keys=[API_KEY, "second-key"])
    held = HeldWorker(server.app.state.engine.workers[0])
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="second-key", max_retries=0)
    try:
        with server.client() as c, ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: held.worker.running)
            waiting = pool.submit(c.post, "/sd", json=body(seed=2))
            wait_for(lambda: len(server.app.state.engine.queue) == 1)
            with pytest.raises(openai.InternalServerError) as full:
                sdk.images.generate(model="tiny-sdxl", prompt="a", size="64x64", extra_body=EXTRA)
            held.release()
            png(running.result())
            png(waiting.result())
    finally:
        held.restore()
    assert full.value.status_code == 503 and full.value.code == "queue_full"
    assert int(full.value.response.headers["retry-after"]) >= 1
    assert "x-should-retry" not in full.value.response.headers
    assert full.value.body["type"] == "server_error"


def test_rate_limit_is_429_for_that_key_only(make_server) -> None:
    other = "second-key"
    server = make_server(rate_limit="2/60s", api_keys=[API_KEY, other])
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    for _ in range(2):
        sdk.images.generate(model="tiny-sdxl", prompt="a", size="64x64", extra_body=EXTRA)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.images.generate(model="tiny-sdxl", prompt="a", size="64x64", extra_body=EXTRA)
    assert limited.value.code == "rate_limit_exceeded"
    assert "2 requests per 60 seconds" in limited.value.message
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert sdk.models.list().data  # discovery does not count
    other_sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=other, max_retries=0)
    assert other_sdk.images.generate(model="tiny-sdxl", prompt="a", size="64x64", extra_body=EXTRA).data


# ---- one engine for every dialect --------------------------------------------------------------
def test_sd_and_v1_jobs_batch_together(make_server) -> None:
    server = make_server(max_batch=4, batch_window_ms=200)
    held = HeldWorker(server.app.state.engine.workers[0])
    v1_body = {"model": "tiny-sdxl", "prompt": "a red boat", "size": "64x64", "response_format": "b64_json",
               "steps": 4, "seed": 77, "sampler": "Euler"}
    try:
        with server.client() as c, ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: held.worker.running)
            via_sd = pool.submit(c.post, "/sd", json=body(seed=78, sampler="Euler"))
            via_v1 = pool.submit(c.post, "/v1/images/generations", json=v1_body, headers=AUTH)
            wait_for(lambda: len(server.app.state.engine.queue) == 2)
            held.release()
            png(blocker.result())
            sd_answer, v1_answer = via_sd.result(), via_v1.result()
    finally:
        held.restore()
    assert sd_answer.headers["x-batch-size"] == "2"
    assert len(held.ran) == 2 and len(held.ran[1]) == 2  # one pipeline call for both jobs
    assert v1_answer.status_code == 200, v1_answer.text
    assert seed_of(from_b64(v1_answer.json()["data"][0])) == 77


# ---- what real clients send --------------------------------------------------------------------
def test_open_webui_openai_mode_body(client: httpx.Client, server: LiveServer) -> None:
    # Open WebUI: {model, prompt, n, size?, response_format: "b64_json"} + admin extras, Bearer.
    answer = client.post("/v1/images/generations", json={
        "model": "dall-e-2", "prompt": "a lighthouse at dusk", "n": 1, "size": "64x64",
        "response_format": "b64_json", "steps": 4})
    assert answer.status_code == 200, answer.text
    (item,) = answer.json()["data"]
    assert from_b64(item).size == (64, 64)
    # Without response_format it reads data[i].url and fetches it with the same auth header.
    answer = client.post("/v1/images/generations", json={
        "model": "tiny-sdxl", "prompt": "a lighthouse at dusk", "n": 2, "size": "64x64", "steps": 4})
    urls = [item["url"] for item in answer.json()["data"]]
    assert len(set(urls)) == 2
    assert all(png(client.get(url)).size == (64, 64) for url in urls)


@pytest.mark.fullsize  # 1024²
def test_librechat_dalle3_tool_body(client: httpx.Client, monkeypatch) -> None:
    # LibreChat's DALL-E 3 tool (DALLE_REVERSE_PROXY): the openai node SDK with these fields;
    # it reads data[0].url, takes the file extension from the URL and downloads it without auth.
    monkeypatch.setattr(openai_translate, "DEFAULT_STEPS", 2)  # the body sets no steps: keep it quick
    answer = client.post("/v1/images/generations", json={
        "model": "dall-e-3", "quality": "standard", "style": "vivid", "size": "1024x1024",
        "prompt": "Photo of a lighthouse at dusk, detailed", "n": 1})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["size"] == "1024x1024" and set(data) >= {"created", "data", "output_format"}
    url = data["data"][0]["url"]
    assert url.rsplit("/", 1)[1].endswith(".png")
    image = png(httpx.get(url, timeout=60))
    assert image.size == (1024, 1024) and "Steps: 2" in image.text["parameters"]


@pytest.mark.fullsize  # 1024²
def test_librechat_gpt_image_tool_body(client: httpx.Client, monkeypatch) -> None:
    # LibreChat's OpenAI image tool (IMAGE_GEN_OAI_BASEURL) asks gpt-image-1 with size "auto",
    # sends no response_format and reads data[0].b64_json.
    monkeypatch.setattr(openai_translate, "DEFAULT_STEPS", 2)
    answer = client.post("/v1/images/generations", json={
        "model": "gpt-image-1", "prompt": "a lighthouse at dusk", "n": 1, "background": "auto",
        "output_format": "png", "quality": "auto", "size": "auto", "moderation": "low"})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["size"] == "1024x1024" and data["output_format"] == "png"
    assert from_b64(data["data"][0]).size == (1024, 1024)


# ---- the OpenAPI document ------------------------------------------------------------------------
def test_openapi_documents_the_v1_shapes(server: LiveServer) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    generate = spec["paths"]["/v1/images/generations"]["post"]
    assert {"200", "400", "401", "404", "503"} <= set(generate["responses"])
    error_ref = generate["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/OpenAIErrorBody")
    request_ref = generate["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    fields = spec["components"]["schemas"][request_ref.rsplit("/", 1)[1]]["properties"]
    wanted = {"prompt", "model", "n", "size", "response_format", "output_format", "steps", "loras"}
    assert wanted <= set(fields)
    assert "/v1/models" in spec["paths"] and "/v1/images/files/{key}.{ext}" in spec["paths"]
