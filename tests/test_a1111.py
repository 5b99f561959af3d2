"""AUTOMATIC1111's /sdapi/v1 against a live server: the real webuiapi client, the bodies Open
WebUI and SillyTavern send (shared/api/dialects.md), the same pixels as /sd, bad input, auth,
progress, interrupt."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
from tests.conftest import API_KEY, TINY_MODELS, body, png
from tests.live import LiveServer
from tests.lora_files import write_peft_lora

OTHER_KEY = "other-key-456"
LIMITED_KEY = "limited-key-789"  # 2 requests an hour
MODELS = """
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
  tiny-sd15: {{source: builtin:tiny-sd15}}
lora_dirs: [{folder}]
"""
SMALL = {"width": 64, "height": 64, "steps": 4}
# A job that runs for seconds on a CPU, so progress and interrupt can be watched while it runs.
LONG = {"prompt": "a long job", "width": 512, "height": 512, "steps": 150, "seed": 1}


def basic(key: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


AUTH = basic(API_KEY)


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("a1111-loras")
    write_peft_lora(build_tiny_sdxl(), folder / "style-peft.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def server(make_server, lora_folder: Path) -> LiveServer:
    return make_server(MODELS.format(folder=lora_folder),
                       api_keys=[f"{API_KEY}  admin", OTHER_KEY, f"{LIMITED_KEY}  2/3600s"])


@pytest.fixture()
def c(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers=AUTH) as client:
        yield client


def webui(server: LiveServer, key: str = API_KEY) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    api.set_auth("whoever", key)
    return api


@pytest.fixture()
def api(server: LiveServer) -> webuiapi.WebUIApi:
    return webui(server)


def decoded(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG"
    return image


def txt2img(c: httpx.Client, **fields: Any) -> dict:
    answer = c.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse at dusk", **SMALL, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def a1111_error(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status, answer.text
    data = answer.json()
    assert set(data) == {"error", "detail", "body", "errors"}, data
    return data


# ---- txt2img through webuiapi ----------------------------------------------------------------
def test_webuiapi_txt2img_batches_and_seeds(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=1234, width=64, height=72,
                         steps=4, cfg_scale=5, batch_size=2, n_iter=2, sampler_name="Euler")
    assert len(result.images) == 4
    assert {image.size for image in result.images} == {(64, 72)}
    info = result.info  # webuiapi parsed the JSON string
    assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    assert info["prompt"] == "a red fox" and info["all_prompts"] == ["a red fox"] * 4
    assert info["negative_prompt"] == "blurry"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 72, 4, 5)
    assert info["sampler_name"] == "Euler" and info["scheduler"] == "Normal"
    assert info["sd_model_name"] == "tiny-sdxl" and info["batch_size"] == 2
    assert info["clip_skip"] == 1 and info["craftserve_not_applied"] == {}
    assert len(info["infotexts"]) == 4 and "Seed: 1236" in info["infotexts"][2]
    assert result.parameters["seed"] == 1234 and result.parameters["n_iter"] == 2
    # each image is the PNG /sd answers: it carries its own seed in A1111's text chunk
    assert "Seed: 1237" in result.images[3].info["parameters"]
    assert len({image.tobytes() for image in result.images}) == 4


@pytest.mark.fullsize  # A1111's defaults: 512², 50 steps
def test_a1111_defaults_where_the_body_is_silent(c: httpx.Client) -> None:
    answer = c.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse"})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    info = json.loads(data["info"])
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (512, 512, 50, 7)
    assert info["sampler_name"] == "Euler" and info["batch_size"] == 1
    assert 0 <= info["seed"] <= 2**32 - 1  # -1: random
    assert decoded(data["images"][0]).size == (512, 512)


def test_random_seed_batches_are_consecutive_and_send_images_false(c: httpx.Client) -> None:
    data = txt2img(c, seed=-1, batch_size=3, send_images=False)
    info = json.loads(data["info"])
    first = info["seed"]
    assert info["all_seeds"] == [(first + i) % 2**32 for i in range(3)]
    assert data["images"] == []


def test_nulls_unknown_fields_and_unapplied_features_are_accepted(c: httpx.Client) -> None:
    blob = base64.b64encode(b"\x89PNG" + bytes(3000)).decode()
    data = txt2img(c, seed=7, styles=None, subseed=None, eta=None, init_images=[blob], mask=blob,
                   restore_faces=True, firstpass_image=blob,
                   alwayson_scripts={"ControlNet": {"args": [{"image": blob}]}, "ADetailer": {"args": []}},
                   foo={"bar": 1},
                   override_settings={"samples_format": "jpg", "sd_vae": "None"})
    info = json.loads(data["info"])
    # ControlNet is served (a unit with no model and no `enabled` is off); other scripts are not
    assert info["craftserve_not_applied"] == {"restore_faces": True, "alwayson_scripts": ["ADetailer"]}
    assert data["parameters"]["restore_faces"] is False  # what ran
    assert blob not in json.dumps(data)  # blobs are never echoed
    plain = txt2img(c, seed=7)
    assert decoded(data["images"][0]).tobytes() == decoded(plain["images"][0]).tobytes()


# ---- one engine: the same pixels as /sd -------------------------------------------------------
@pytest.mark.parametrize(("a1111", "sd"), [
    ({"prompt": "a lighthouse <lora:style-peft:0.7>", "sampler_name": "Euler"},
     {"prompt": "a lighthouse", "sampler": "Euler", "loras": {"style-peft": 0.7}}),
    ({"prompt": "a lighthouse", "sampler_name": "DPM++ 2M", "scheduler": "karras"},
     {"prompt": "a lighthouse", "sampler": "DPM++ 2M Karras"}),
    ({"prompt": "<lora:style-peft:0.5> a lighthouse", "sampler_index": "Euler a",
      "negative_prompt": "fog"},
     {"prompt": "a lighthouse", "sampler": "Euler a", "negative_prompt": "fog",
      "loras": {"style-peft": 0.5}}),
])
def test_same_pixels_as_sd(c: httpx.Client, a1111: dict, sd: dict) -> None:
    common = {"seed": 4321, "width": 64, "height": 72, "steps": 5, "cfg_scale": 6.5}
    data = txt2img(c, **common, **a1111)
    via_sd = png(c.post("/sd", json=body(**common, **sd)))
    assert decoded(data["images"][0]).tobytes() == via_sd.tobytes()


def test_lora_tag_changes_the_image_and_stays_out_of_the_text(c: httpx.Client) -> None:
    plain = txt2img(c, seed=5)
    tagged = txt2img(c, seed=5, prompt="a lighthouse at dusk <lora:style-peft:1>")
    assert decoded(plain["images"][0]).tobytes() != decoded(tagged["images"][0]).tobytes()
    info = json.loads(tagged["info"])
    assert info["prompt"] == "a lighthouse at dusk <lora:style-peft:1>"  # as A1111 reports it
    assert info["infotexts"][0].startswith("a lighthouse at dusk <lora:style-peft:1>\n")
    off = txt2img(c, seed=5, prompt="a lighthouse at dusk <lora:style-peft:1>",
                  disable_extra_networks=True)
    assert decoded(off["images"][0]).tobytes() == decoded(plain["images"][0]).tobytes()


# ---- discovery -------------------------------------------------------------------------------
def test_webuiapi_discovery(api: webuiapi.WebUIApi) -> None:
    models = api.get_sd_models()
    assert [m["title"] for m in models] == ["tiny-sdxl", "tiny-sd15"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert api.util_get_model_names() == ["tiny-sd15", "tiny-sdxl"]
    samplers = api.get_samplers()
    names = [s["name"] for s in samplers]
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = api.util_get_scheduler_names()
    assert {"automatic", "karras", "exponential", "sgm_uniform"} <= set(schedulers)
    loras = api.get_loras()
    assert [lora["name"] for lora in loras] == ["style-peft"]
    assert set(loras[0]) == {"name", "alias", "path", "metadata"}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_sd_vae() == []
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.refresh_checkpoints() is None


def test_refresh_loras_finds_a_new_file(c: httpx.Client, lora_folder: Path) -> None:
    write_peft_lora(build_tiny_sd15(), lora_folder / "late-sd15.safetensors", seed=4)
    assert "late-sd15" not in [lora["name"] for lora in c.get("/sdapi/v1/loras").json()]
    assert c.post("/sdapi/v1/refresh-loras").json() is None
    listed = {lora["name"]: lora for lora in c.get("/sdapi/v1/loras").json()}
    assert listed["late-sd15"]["metadata"]["models"] == ["tiny-sd15"]  # the models it fits
    assert "late-sd15" in c.get("/sd/loras-sd").json()  # one registry for every dialect


# ---- options ---------------------------------------------------------------------------------
def test_options_round_trip_as_open_webui_does(c: httpx.Client, api: webuiapi.WebUIApi) -> None:
    options = c.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny-sdxl"  # the first model of models.yaml
    try:
        options["sd_model_checkpoint"] = "tiny-sd15"
        options["samples_format"] = "png"  # a key this server does not use: kept
        answer = c.post("/sdapi/v1/options", json=options)
        assert answer.status_code == 200 and answer.json() is None
        now = c.get("/sdapi/v1/options").json()
        assert now["sd_model_checkpoint"] == "tiny-sd15" and now["samples_format"] == "png"
        assert api.util_get_current_model() == "tiny-sd15"
        info = json.loads(txt2img(c)["info"])
        assert info["sd_model_name"] == "tiny-sd15"
        # a per-request override wins, and (restore_afterwards) leaves the options alone
        info = json.loads(txt2img(c, override_settings={"sd_model_checkpoint": "tiny-sdxl [0123abcd]"})[
            "info"])
        assert info["sd_model_name"] == "tiny-sdxl"
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd15"
        # a checkpoint that does not exist: an error naming it, the previous choice stays
        wrong = a1111_error(c.post("/sdapi/v1/options", json={**now, "sd_model_checkpoint": "nope-xl",
                                                               "samples_format": "jpg"}), 422)
        assert "nope-xl" in wrong["detail"] and "tiny-sd15" in wrong["detail"]
        after = c.get("/sdapi/v1/options").json()
        assert after["sd_model_checkpoint"] == "tiny-sd15" and after["samples_format"] == "png"
        api.util_set_model("tiny-sdxl")  # webuiapi POSTs {"sd_model_checkpoint": ...} only
        assert api.get_options()["sd_model_checkpoint"] == "tiny-sdxl"
    finally:
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"})


def test_override_kept_when_restore_afterwards_is_false(c: httpx.Client) -> None:
    try:
        txt2img(c, override_settings={"sd_model_checkpoint": "tiny-sd15"},
                override_settings_restore_afterwards=False)
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd15"
    finally:
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"})


# ---- what Open WebUI and SillyTavern send ------------------------------------------------------
def test_open_webui_a1111_mode(server: LiveServer) -> None:
    with server.client() as raw:
        headers = {"authorization": "Basic " + base64.b64encode(f"user:{API_KEY}".encode()).decode()}
        assert raw.get("/sdapi/v1/options", headers=headers).status_code == 200  # connection check
        models = raw.get("/sdapi/v1/sd-models", headers=headers).json()
        assert [m["title"] for m in models] == ["tiny-sdxl", "tiny-sd15"]
        answer = raw.post("/sdapi/v1/txt2img", headers=headers, json={
            "prompt": "a lighthouse", "batch_size": 2, "width": 64, "height": 64, "steps": 4,
            "negative_prompt": "fog"})
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert [decoded(i).size for i in data["images"]] == [(64, 64), (64, 64)]
        assert json.loads(data["info"])["negative_prompt"] == "fog"


def sillytavern_body(**fields: Any) -> dict:
    return {
        "url": "http://127.0.0.1:7860", "auth": f"user:{API_KEY}", "prompt": "a lighthouse",
        "negative_prompt": "lowres", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 4,
        "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
        "hr_upscaler": "Latent", "hr_scale": 2.0, "denoising_strength": 0.7,
        "hr_second_pass_steps": 0, "seed": -1,
        "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
        "clip_skip": 1, "save_images": False, "send_images": True, **fields,
    }


def test_sillytavern(server: LiveServer) -> None:
    with server.client(headers=basic(API_KEY, "user")) as st:
        answer = st.post("/sdapi/v1/txt2img", json=sillytavern_body())
        assert answer.status_code == 200, answer.text
        assert decoded(answer.json()["images"][0]).size == (64, 64)
        info = json.loads(answer.json()["info"])
        assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
        for route in ("upscalers", "latent-upscale-modes", "sd-vae", "samplers", "schedulers"):
            assert st.get(f"/sdapi/v1/{route}").status_code == 200
        assert "forge_preset" not in st.get("/sdapi/v1/options").json()


def test_clip_skip_is_applied_as_a1111_does(server: LiveServer) -> None:
    with server.client(headers=AUTH) as c:
        # SDXL: A1111 always takes the penultimate layer, so clip skip changes nothing there.
        body = sillytavern_body(seed=9, clip_skip=2,
                                override_settings={"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"})
        answer = c.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert info["clip_skip"] == 2
        assert info["craftserve_not_applied"] == {}
        assert answer.json()["parameters"]["override_settings"]["CLIP_stop_at_last_layers"] == 2
        same = c.post("/sdapi/v1/txt2img", json=sillytavern_body(seed=9)).json()
        assert decoded(same["images"][0]).tobytes() == decoded(answer.json()["images"][0]).tobytes()
        # SD 1.x: the second layer from the end, so another image, and "Clip skip: 2" in its text.
        sd15 = {"sd_model_checkpoint": "tiny-sd15", "sd_vae": "Automatic"}
        one = c.post("/sdapi/v1/txt2img", json=sillytavern_body(seed=9, override_settings=sd15))
        two = c.post("/sdapi/v1/txt2img", json=sillytavern_body(
            seed=9, override_settings={**sd15, "CLIP_stop_at_last_layers": 2}))
        assert one.status_code == two.status_code == 200, two.text
        assert decoded(one.json()["images"][0]).tobytes() != decoded(two.json()["images"][0]).tobytes()
        assert "Clip skip: 2" in json.loads(two.json()["info"])["infotexts"][0]
        assert "Clip skip" not in json.loads(one.json()["info"])["infotexts"][0]
        bad = a1111_error(c.post("/sdapi/v1/txt2img", json=sillytavern_body(clip_skip=99)), 422)
        assert "clip_skip" in bad["detail"]


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "named"), [
    ({"prompt": "a cat <lora:style-peft>"}, "<lora:style-peft>"),
    ({"prompt": "a cat <lora:style-peft:>"}, "no weight"),
    ({"prompt": "a cat <lora:style-peft:strong>"}, "'strong' is not a number"),
    ({"prompt": "a cat <lora:style-peft:0.5:0.2>"}, "one weight"),
    ({"prompt": "a cat <lora::1>"}, "<lora::1>"),
    ({"prompt": "a cat <lora:style-peft:inf>"}, "-10 to 10"),
    ({"prompt": "a cat <lora:no-such-lora:0.8>"}, "no-such-lora"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 10000}, "CRAFTSERVE_A1111_MAX_IMAGES"),
    ({"batch_size": 4, "n_iter": 3}, "12 images"),
    ({"n_iter": 0}, "n_iter"),
    ({"width": 99999}, "CRAFTSERVE_A1111_MAX_SIZE"),
    ({"height": 8}, "height"),
    ({"steps": 151}, "CRAFTSERVE_A1111_MAX_STEPS"),
    ({"cfg_scale": 0}, "cfg_scale"),
    ({"seed": 2**40}, "seed"),
    ({"sampler_name": "Euler Z"}, "Euler Z"),
    ({"scheduler": "polyexponential"}, "polyexponential"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, "nope"),
    ({"override_settings": {"sd_vae": "vae-ft-mse.safetensors"}}, "VAE"),
])
def test_bad_input_is_a_named_error(c: httpx.Client, fields: dict, named: str) -> None:
    data = a1111_error(c.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL, **fields}), 422)
    assert named in data["detail"], data
    assert data["errors"] == data["detail"] and data["error"] in ("InvalidParameter", "NotServed")


def test_validation_errors_in_a1111_shape(c: httpx.Client) -> None:
    data = a1111_error(c.post("/sdapi/v1/txt2img", json={"steps": "many"}), 422)
    assert data["error"] == "RequestValidationError" and "steps" in data["detail"]
    assert data["errors"][0]["loc"] == ["body", "steps"]
    data = a1111_error(c.post("/sdapi/v1/txt2img", content=b"{not json",
                              headers={"content-type": "application/json"}), 422)
    assert "JSON" in data["detail"]
    assert a1111_error(c.post("/sdapi/v1/options", json=["a", "list"]), 422)["error"] == \
        "RequestValidationError"
    assert a1111_error(c.get("/sdapi/v1/no-such-route"), 404)["error"] == "NotFound"


def test_base64_in_unexpected_places_is_refused_without_echo(c: httpx.Client) -> None:
    blob = "data:image/png;base64," + base64.b64encode(bytes(300_000)).decode()
    for fields in ({"prompt": blob}, {"negative_prompt": blob}, {"sampler_name": blob},
                   {"scheduler": blob}, {"override_settings": {"sd_model_checkpoint": blob}},
                   {"override_settings": {"sd_vae": blob}}):
        answer = c.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
        data = a1111_error(answer, 422)
        assert len(answer.content) < 2000, (fields.keys(), data["detail"][:200])
    huge = a1111_error(c.post("/sdapi/v1/options", json={"sd_model_checkpoint": blob}), 422)
    assert "characters" in huge["detail"]
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sdxl"
    too_much = {f"key{i}": blob for i in range(5)}
    assert a1111_error(c.post("/sdapi/v1/options", json=too_much), 422)["error"] == "InvalidParameter"
    assert "key0" not in c.get("/sdapi/v1/options").json()


# ---- auth ------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", [("post", "/sdapi/v1/txt2img"), ("get", "/sdapi/v1/sd-models"),
                                   ("get", "/sdapi/v1/options"), ("get", "/sdapi/v1/progress"),
                                   ("post", "/sdapi/v1/interrupt")])
def test_missing_or_wrong_key_is_401_basic(server: LiveServer, route: tuple[str, str]) -> None:
    method, path = route
    with server.client() as raw:
        for headers in ({}, basic("wrong-key"), {"Authorization": "Basic"},
                        {"Authorization": "Basic !!notbase64"}, {"Authorization": "Bearer nope"},
                        {"Authorization": "Token " + API_KEY}):
            answer = raw.request(method, path, headers=headers, json={"prompt": "x"})
            data = a1111_error(answer, 401)
            assert answer.headers["www-authenticate"] == "Basic"
            assert data["error"] == "Unauthorized" and API_KEY not in answer.text
    status, head, _ = raw_get(server, "/sdapi/v1/options", "Authorization: Basic ")
    assert status == 401 and "www-authenticate: basic" in head.lower()


def test_basic_with_any_user_bearer_and_key_only(server: LiveServer) -> None:
    with server.client() as raw:
        for headers in (basic(API_KEY, "alice"), basic(API_KEY, ""),
                        {"Authorization": f"Bearer {API_KEY}"},
                        {"Authorization": "Basic " + base64.b64encode(API_KEY.encode()).decode()}):
            assert raw.get("/sdapi/v1/sd-models", headers=headers).status_code == 200, headers


def test_rate_limit_counts_txt2img_per_key(server: LiveServer, c: httpx.Client) -> None:
    with server.client(headers=basic(LIMITED_KEY)) as limited:
        for _ in range(2):
            txt2img(limited)
        answer = limited.post("/sdapi/v1/txt2img", json={"prompt": "a", **SMALL})
        data = a1111_error(answer, 429)
        assert data["error"] == "RateLimited" and int(answer.headers["retry-after"]) > 0
        assert "2 requests per 3600 seconds" in data["detail"]
        assert limited.get("/sdapi/v1/options").status_code == 200  # status routes do not count
        assert limited.get("/sdapi/v1/progress").status_code == 200
    txt2img(c)  # other keys are unaffected


def raw_get(server: LiveServer, path: str, header_line: str) -> tuple[int, str, str]:
    """GET with a header as some clients write it (httpx refuses `Basic ` with its trailing
    space): (status, head, body)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{header_line}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, content = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), head, content


def test_anonymous_server_ignores_any_authorization(make_server) -> None:
    server = make_server(TINY_MODELS, api_keys=[], allow_anonymous=True)
    status, _, content = raw_get(server, "/sdapi/v1/sd-models", "Authorization: Basic ")
    assert status == 200 and "tiny-sdxl" in content
    with server.client() as raw:
        for headers in ({"Authorization": "Basic"}, {}, basic("whatever"),
                        {"Authorization": "Basic %%%"}, {"Authorization": "Digest x"}):
            answer = raw.post("/sdapi/v1/txt2img", headers=headers, json={"prompt": "a", **SMALL})
            assert answer.status_code == 200, answer.text
            assert raw.get("/sdapi/v1/options", headers=headers).status_code == 200


# ---- progress, interrupt, skip ---------------------------------------------------------------
class Background:
    """A blocking call on a thread: its result, or the exception it raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 120) -> Background:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not return"
        return self


def wait_for(api: webuiapi.WebUIApi, done: Callable[[dict], bool], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        progress = api.get_progress()
        if done(progress) or time.monotonic() > deadline:
            assert done(progress), progress
            return progress
        time.sleep(0.02)


def test_progress_and_interrupt_with_webuiapi(server: LiveServer, api: webuiapi.WebUIApi) -> None:
    assert api.get_progress()["state"]["job_count"] == 0
    job = Background(lambda: api.txt2img(**LONG))
    progress = wait_for(api, lambda p: p["state"]["sampling_step"] >= 2)
    state = progress["state"]
    assert state["job_count"] == 1 and state["sampling_steps"] == 150
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert progress["current_image"] is None and state["job"].startswith("job-")
    started = time.monotonic()
    assert api.interrupt() == {}
    job.join()
    assert time.monotonic() - started < 10
    assert isinstance(job.error, RuntimeError) and job.error.args[0] == 409, job.error
    assert json.loads(job.error.args[1])["error"] == "Interrupted"
    api.util_wait_for_ready(check_interval=0.05)  # progress 0 and job_count 0: idle again


def test_interrupt_stops_waiting_jobs_too(server: LiveServer, api: webuiapi.WebUIApi) -> None:
    first = Background(lambda: api.txt2img(**LONG))
    wait_for(api, lambda p: p["state"]["sampling_step"] >= 1)
    second = Background(lambda: api.txt2img(**{**LONG, "seed": 2, "steps": 149}))  # not batchable
    wait_for(api, lambda p: p["state"]["job_count"] == 2)
    api.interrupt()
    for job in (first.join(), second.join()):
        assert isinstance(job.error, RuntimeError) and job.error.args[0] == 409, job.error
    assert api.get_progress()["state"]["job_count"] == 0


def test_skip_stops_the_running_job(server: LiveServer, api: webuiapi.WebUIApi) -> None:
    job = Background(lambda: api.txt2img(**LONG))
    wait_for(api, lambda p: p["state"]["sampling_step"] >= 1)
    assert api.skip() is None
    assert job.join().error is not None and job.error.args[0] == 409


def test_another_keys_interrupt_does_not_touch_my_job(server: LiveServer,
                                                      api: webuiapi.WebUIApi) -> None:
    other = webui(server, OTHER_KEY)
    mine = Background(lambda: api.txt2img(**{**LONG, "steps": 40}))
    wait_for(api, lambda p: p["state"]["sampling_step"] >= 1)
    assert other.get_progress()["state"]["job_count"] == 0  # it sees none of my jobs
    assert other.interrupt() == {} and other.skip() is None
    assert api.get_progress()["state"]["interrupted"] is False
    mine.join()
    assert mine.error is None, mine.error
    assert mine.result.images[0].size == (512, 512)
    assert mine.result.info["steps"] == 40


# ---- OpenAPI ---------------------------------------------------------------------------------
def test_openapi_documents_the_routes_and_their_errors(server: LiveServer) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    paths = doc["paths"]
    for route in ("txt2img", "options", "progress", "interrupt", "skip", "sd-models", "samplers",
                  "schedulers", "loras", "sd-vae", "upscalers", "latent-upscale-modes", "scripts",
                  "embeddings", "refresh-checkpoints", "refresh-loras"):
        assert f"/sdapi/v1/{route}" in paths, route
    txt2img = paths["/sdapi/v1/txt2img"]["post"]
    for status in ("200", "401", "409", "422", "503"):
        assert status in txt2img["responses"], status
    assert txt2img["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/A1111Error")
    request = doc["components"]["schemas"]["A1111Txt2ImgRequest"]["properties"]
    assert {"prompt", "override_settings", "batch_size", "n_iter", "alwayson_scripts"} <= set(request)
    assert {"craftserve_basic", "craftserve_bearer"} <= set(doc["components"]["securitySchemes"])
    options = paths["/sdapi/v1/options"]["get"]["responses"]["200"]["content"]["application/json"]
    assert options["schema"]["$ref"].endswith("/A1111Options")
