"""The published VisionCraft wrapper (PyPI VisionCraftAPI 1.0.8), unchanged, against a live
craftserve: `client.API_HOST = url` is the only setting changed.

The wrapper is async (aiohttp); each call runs in its own event loop. It reads an error body's
`error.message` (else `detail`) and maps it: "users can ... per N <unit>" → RateLimitExceeded,
"doesn't have <param>" or 422 → InvalidParam(param), 403 → InvalidAPIKey, 404 →
EndpointNotFound, anything else → HTTPError.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
from PIL import Image
from VisionCraftAPI.api import VisionCraftClient
from VisionCraftAPI.exceptions import (
    EndpointNotFound,
    HTTPError,
    InvalidAPIKey,
    InvalidParam,
    RateLimitExceeded,
)

from app.samplers import a1111_sampler_names, comfy_sampler_ids
from tests.conftest import API_KEY
from tests.live import LiveServer
from tests.lora_files import write_garbage_lora

MODELS = """
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
lora_dirs: [{folder}]
"""
LIMITED_KEY = "limited-key-0001"
SMALL = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7}


@pytest.fixture(scope="module")
def server(make_server, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    folder = tmp_path_factory.mktemp("vc-client")
    write_garbage_lora(folder / "broken.safetensors")
    keys = folder / "keys.txt"
    keys.write_text(f"# a key with its own limit\n{LIMITED_KEY}  2/3600s\n", encoding="utf-8")
    return make_server(MODELS.format(folder=folder), api_keys=[API_KEY], api_keys_file=keys)


def client(server: LiveServer, key: str = API_KEY) -> VisionCraftClient:
    wrapper = VisionCraftClient(api_key=key)
    wrapper.API_HOST = server.url  # the one setting a user changes
    return wrapper


def run(call: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(call)


def fetch(url: str) -> Image.Image:
    answer = httpx.get(url, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(answer.content))


def test_discovery_routes_the_wrapper_calls(server: LiveServer) -> None:
    vc = client(server)
    assert run(vc.get_xl_models()) == ["tiny-sdxl"]
    assert run(vc.get_models()) == []  # no SD 1.x model served
    assert run(vc.get_samplers()) == a1111_sampler_names()
    assert run(vc.get_xl_samplers()) == comfy_sampler_ids()
    assert run(vc.get_xl_loras()) == [] and run(vc.get_loras()) == []  # "broken" is not listed


def test_generate_xl_image_answers_urls(server: LiveServer) -> None:
    urls = run(client(server).generate_xl_image(
        "a lighthouse at dusk", model="tiny-sdxl", sampler="dpmpp_2m", image_count=2, **SMALL,
    ))
    assert len(urls) == 2 and len(set(urls)) == 2
    images = [fetch(url) for url in urls]
    assert [i.size for i in images] == [(64, 64), (64, 64)]
    seeds = [int(i.text["parameters"].split("Seed: ")[1].split(",")[0]) for i in images]
    assert seeds[1] == (seeds[0] + 1) % 2**32  # one request, consecutive seeds
    assert "Sampler: DPM++ 2M" in images[0].text["parameters"]


def test_generate_image_answers_urls(server: LiveServer) -> None:
    # The SD 1.x method (POST /generate); it also sends `upscale`, which is ignored.
    urls = run(client(server).generate_image(
        "a red fox", model="tiny-sdxl", sampler="Euler a", negative_prompt="blurry", **SMALL,
    ))
    (image,) = [fetch(url) for url in urls]
    assert image.size == (64, 64)
    assert "Negative prompt: blurry" in image.text["parameters"]


def test_wrong_key_is_invalid_api_key(server: LiveServer) -> None:
    with pytest.raises(InvalidAPIKey) as err:
        run(client(server, "not-a-key").generate_xl_image("x", model="tiny-sdxl", sampler="euler",
                                                          **SMALL))
    assert err.value.message == "Invalid API key"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"steps": 31}, "steps", "less than or equal to 30"),
        ({"width": 2048}, "width", "less than or equal to 1024"),
        ({"cfg_scale": 0}, "cfg_scale", "greater than or equal to 1"),
        ({"image_count": 6}, "image_count", "less than or equal to 5"),
        ({"model": "sdxl-turbo"}, "model", "Available: tiny-sdxl"),
        ({"sampler": "Euler b"}, "sampler", "Did you mean"),
        ({"loras": {"nope": 0.5}}, "lora", "doesn't have lora 'nope'"),
        ({"loras": {"broken": 0.5}}, "loras", "lora 'broken'"),  # a file that cannot be used
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
    ],
)
def test_bad_parameters_are_invalid_param_naming_it(
    server: LiveServer, fields: dict, param: str, words: str
) -> None:
    request = {"prompt": "a lighthouse", "model": "tiny-sdxl", "sampler": "euler", **SMALL, **fields}
    vc = client(server)
    with pytest.raises(InvalidParam) as err:
        run(vc.generate_xl_image(**request))
    assert words in err.value.message
    assert err.value.param == param
    with pytest.raises(InvalidParam) as again:  # the SD 1.x method answers the same way
        run(vc.generate_image(**{**request, "image_count": fields.get("image_count", 1)}))
    assert again.value.param == err.value.param


def test_unknown_routes_are_endpoint_not_found(server: LiveServer) -> None:
    vc = client(server)
    with pytest.raises(EndpointNotFound) as err:
        run(vc.create_midjourney_task("a cat"))  # POST /midjourney: not a craftserve route
    assert err.value.status_code == 404
    with pytest.raises(EndpointNotFound):
        run(vc.get_llm_models())


def test_past_the_keys_limit_is_rate_limit_exceeded(server: LiveServer) -> None:
    limited, other = client(server, LIMITED_KEY), client(server)
    for _ in range(2):
        assert len(run(limited.generate_xl_image("x", model="tiny-sdxl", sampler="euler",
                                                 **SMALL))) == 1
    with pytest.raises(RateLimitExceeded) as err:
        run(limited.generate_xl_image("x", model="tiny-sdxl", sampler="euler", **SMALL))
    assert "users can make 2 requests per 3600 seconds" in err.value.message
    assert err.value.retry_after == 3600  # the wrapper reads the period
    with pytest.raises(RateLimitExceeded):
        run(limited.generate_image("x", model="tiny-sdxl", sampler="euler", **SMALL))
    # another key is unaffected, and discovery never counts
    assert len(run(other.generate_xl_image("x", model="tiny-sdxl", sampler="euler", **SMALL))) == 1
    assert run(limited.get_xl_models()) == ["tiny-sdxl"]


def test_other_errors_are_http_errors_with_the_message(server: LiveServer) -> None:
    # A method of a route that exists but is GET-only: 405, which the wrapper reports as is.
    answer = httpx.get(f"{server.url}/sd", timeout=30)
    assert answer.status_code == 405
    assert answer.json()["error"]["message"] == answer.json()["detail"]
    with pytest.raises(HTTPError) as err:
        client(server)._HTTPClient__check_exception(data=answer.json(), status_code=405)
    assert err.value.status_code == 405 and not isinstance(err.value, EndpointNotFound)
