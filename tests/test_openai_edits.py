"""OpenAI's /v1/images/edits and /v1/images/variations through the real openai SDK, the multipart
body Open WebUI sends, and bad inputs over HTTP, against the real server with the tiny SDXL
pipeline. Pixels are checked against the original picture (numpy) and against the same
request through A1111's img2img (the same core must give the same bytes)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from app.api.openai_images.translate import edit_size
from app.config import Settings
from tests.conftest import API_KEY
from tests.live import LiveServer

AUTH = {"authorization": f"Bearer {API_KEY}"}
EXTRA = {"steps": 4, "seed": 1234, "sampler": "Euler a", "cfg_scale": 6.0}
A1111 = {"steps": 4, "seed": 1234, "sampler_name": "Euler a", "cfg_scale": 6.0}


@pytest.fixture(scope="module")
def server(make_server) -> LiveServer:
    return make_server(openai_model_aliases={"dall-e-2": "tiny-sdxl", "gpt-image-1": "tiny-sdxl"})


@pytest.fixture()
def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture()
def client(server: LiveServer):
    with server.client(headers=AUTH, timeout=120) as c:
        yield c


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def decoded(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def a1111_img2img(client: httpx.Client, image: Image.Image, prompt: str, strength: float,
                  **fields) -> Image.Image:
    answer = client.post("/sdapi/v1/img2img", json={
        "init_images": [b64(image)], "prompt": prompt, "denoising_strength": strength,
        "resize_mode": 1, "width": image.width, "height": image.height, **A1111, **fields})
    assert answer.status_code == 200, answer.text
    return decoded(answer.json()["images"][0])


def error_of(answer: httpx.Response, status: int, param: str | None) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert "Traceback" not in answer.text
    return error


# ---- the openai SDK ----------------------------------------------------------------------------
def test_edit_one_image_is_img2img_of_the_picture(sdk: openai.OpenAI, client: httpx.Client) -> None:
    source = picture(96, 64, 1)
    answer = sdk.images.edit(image=("source.png", png_bytes(source), "image/png"),
                             prompt="a red barn", response_format="b64_json", extra_body=EXTRA)
    assert answer.size == "96x64" and answer.output_format == "png"
    (item,) = answer.data
    edited = decoded(item.b64_json)
    assert edited.size == (96, 64)  # size absent: the picture's own
    expected = a1111_img2img(client, source, "a red barn", 0.75)
    assert np.array_equal(pixels(edited), pixels(expected))


def test_edit_several_images_each_answer_from_its_picture(sdk: openai.OpenAI,
                                                          client: httpx.Client) -> None:
    first, second = picture(64, 64, 2), picture(64, 64, 3)
    answer = sdk.images.edit(image=[("a.png", png_bytes(first), "image/png"),
                                    ("b.png", png_bytes(second), "image/png")],
                             prompt="snow", n=2, response_format="b64_json",
                             extra_body={**EXTRA, "strength": 0.5})
    got = [decoded(item.b64_json) for item in answer.data]
    assert [g.size for g in got] == [(64, 64), (64, 64)]
    assert np.array_equal(pixels(got[0]), pixels(a1111_img2img(client, first, "snow", 0.5)))
    expected_second = a1111_img2img(client, second, "snow", 0.5, seed=1235)  # seeds seed, seed+1
    assert np.array_equal(pixels(got[1]), pixels(expected_second))


def test_edit_with_mask_keeps_every_pixel_away_from_the_transparent_area(sdk: openai.OpenAI) -> None:
    source = picture(64, 64, 4)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (24, 24, 40, 40))  # alpha 0: the area to edit
    answer = sdk.images.edit(image=("source.png", png_bytes(source), "image/png"),
                             mask=("mask.png", png_bytes(mask), "image/png"),
                             prompt="a red square", size="64x64", response_format="b64_json",
                             extra_body=EXTRA)
    (item,) = answer.data
    edited = decoded(item.b64_json)
    assert edited.size == (64, 64)
    got, original = pixels(edited), pixels(source)
    # mask_blur 4: a Gaussian of 21 taps, so pixels more than 10 px from the square cannot change
    far = np.ones((64, 64), bool)
    far[24 - 11:40 + 11, 24 - 11:40 + 11] = False
    assert np.array_equal(got[far], original[far])
    inside = (slice(26, 38), slice(26, 38))
    assert np.abs(got[inside] - original[inside]).mean() > 20  # generated anew, not kept


def test_variation(sdk: openai.OpenAI, client: httpx.Client) -> None:
    source = picture(64, 64, 5)
    answer = sdk.images.create_variation(image=("source.png", png_bytes(source), "image/png"),
                                         model="dall-e-2", response_format="b64_json", extra_body=EXTRA)
    (item,) = answer.data
    varied = decoded(item.b64_json)
    assert varied.size == (64, 64)
    assert np.array_equal(pixels(varied), pixels(a1111_img2img(client, source, "", 0.6)))


def test_edit_answers_urls_by_default(sdk: openai.OpenAI, server: LiveServer) -> None:
    answer = sdk.images.edit(image=("source.png", png_bytes(picture(64, 64, 6)), "image/png"),
                             prompt="fog", output_format="jpeg", extra_body=EXTRA)
    (item,) = answer.data
    assert item.b64_json is None and item.url.endswith(".jpeg")
    fetched = httpx.get(item.url)
    assert fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


# ---- what Open WebUI sends ---------------------------------------------------------------------
def test_open_webui_multipart_body(client: httpx.Client) -> None:
    source = picture(64, 64, 7)
    answer = client.post("/v1/images/edits", files=[("image", ("image.png", png_bytes(source), "image/png"))],
                         data={"model": "tiny-sdxl", "prompt": "make it night", "n": "1", "size": "64x64",
                               "background": "auto", "response_format": "b64_json"})
    assert answer.status_code == 200, answer.text
    (item,) = answer.json()["data"]
    assert decoded(item["b64_json"]).size == (64, 64)


def test_image_as_repeated_brackets_and_base64_text(client: httpx.Client) -> None:
    source = picture(64, 64, 8)
    answer = client.post("/v1/images/edits", files=[("image[]", ("a.png", png_bytes(source), "image/png"))],
                         data={"prompt": "x", "response_format": "b64_json", **EXTRA})
    assert answer.status_code == 200, answer.text
    as_text = client.post("/v1/images/edits", files=[("unused", ("u.txt", b"", "text/plain"))],
                          data={"image": b64(source), "prompt": "x", "response_format": "b64_json", **EXTRA})
    assert as_text.status_code == 200, as_text.text
    assert answer.json()["data"] == as_text.json()["data"]


# ---- bad inputs ----------------------------------------------------------------------------------
def bomb_png(width: int, height: int) -> bytes:
    """A small valid PNG whose header declares width x height pixels."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def post_edit(client: httpx.Client, *, image: bytes | None = None, mask: bytes | None = None,
              **fields) -> httpx.Response:
    files = [("image", ("image.png", png_bytes(picture(64, 64, 9)) if image is None else image,
                        "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    data = {"prompt": "x", **EXTRA, **fields}
    return client.post("/v1/images/edits", files=files, data={k: v for k, v in data.items() if v is not None})


def test_not_an_image(client: httpx.Client) -> None:
    error = error_of(post_edit(client, image=b"this is not a picture"), 400, "image")
    assert "not an image" in error["message"]


def test_mask_of_another_size(client: httpx.Client) -> None:
    mask = png_bytes(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    error = error_of(post_edit(client, mask=mask), 400, "mask")
    assert "32x32" in error["message"] and "64x64" in error["message"]


def test_mask_without_alpha(client: httpx.Client) -> None:
    error = error_of(post_edit(client, mask=png_bytes(Image.new("RGB", (64, 64)))), 400, "mask")
    assert "alpha" in error["message"]


def test_missing_prompt(client: httpx.Client) -> None:
    error = error_of(post_edit(client, prompt=None), 400, "prompt")
    assert error["code"] == "missing_required_parameter"


def test_decompression_bomb(client: httpx.Client) -> None:
    error = error_of(post_edit(client, image=bomb_png(60000, 60000)), 400, "image")
    assert "CRAFTSERVE_MAX_IMAGE_PIXELS" in error["message"]


@pytest.mark.parametrize("n", ["0", "11", "two"])
def test_n_out_of_range(client: httpx.Client, n: str) -> None:
    error_of(post_edit(client, n=n), 400, "n")


def test_no_image(client: httpx.Client) -> None:
    answer = client.post("/v1/images/edits", files=[("other", ("o.png", b"x", "image/png"))],
                         data={"prompt": "x"})
    error_of(answer, 400, "image")


def test_json_body_names_multipart(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/images/edits", json={"prompt": "x", "image": "abc"}), 400, "image")
    assert "multipart/form-data" in error["message"]


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=xyz"])
def test_damaged_multipart_body(client: httpx.Client, content_type: str) -> None:
    answer = client.post("/v1/images/edits", content=b"--xyz\r\nnot a part header\r\n\r\n--xy",
                         headers={"content-type": content_type})
    assert 400 <= answer.status_code < 500, answer.text
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_variation_takes_one_picture(client: httpx.Client) -> None:
    one = ("a.png", png_bytes(picture(64, 64, 10)), "image/png")
    answer = client.post("/v1/images/variations", files=[("image", one), ("image", one)], data=EXTRA)
    error_of(answer, 400, "image")


# ---- the form guard (app/api/guards.py) ------------------------------------------------------
def test_multipart_needs_a_bearer_key(server: LiveServer) -> None:
    files = [("image", ("image.png", png_bytes(picture(64, 64, 11)), "image/png"))]
    with server.client() as c:
        # a browser's form post: no Authorization, or the HTTP Basic it keeps for the server
        for headers in ({}, {"authorization": "Basic " + base64.b64encode(f"u:{API_KEY}".encode()).decode()}):
            error = error_of(c.post("/v1/images/edits", files=files, data={"prompt": "x"}, headers=headers),
                             415, None)
            assert "Bearer" in error["message"]
        # a cross-site page is refused even with a Bearer header
        answer = c.post("/v1/images/edits", files=files, data={"prompt": "x"},
                        headers={**AUTH, "sec-fetch-site": "cross-site"})
        assert answer.status_code == 403
        # multipart stays refused on every other route
        answer = c.post("/v1/images/generations", files=files, data={"prompt": "x"}, headers=AUTH)
        assert answer.status_code == 415
        # a wrong key gets past the guard and is refused by the key check
        answer = c.post("/v1/images/edits", files=files, data={"prompt": "x"},
                        headers={"authorization": "Bearer wrong-key"})
        error_of(answer, 401, None)


# ---- size "auto" -------------------------------------------------------------------------------
@pytest.mark.parametrize(("picture_size", "family", "expected"), [
    ((64, 64), "sdxl", (64, 64)),  # small and a multiple of 8: as it is
    ((100, 60), "sdxl", (96, 64)),  # rounded down to multiples of 8, at least 64
    ((3000, 2000), "sdxl", (1248, 832)),  # 1024/sqrt(6e6) = 0.418: 1254x836, rounded down
    ((3000, 2000), "sd15", (624, 416)),  # 512/sqrt(6e6) = 0.209: 627x418
    ((4000, 100), "sdxl", (2048, 64)),  # the side limit (CRAFTSERVE_A1111_MAX_SIZE) first
])
def test_auto_size(picture_size, family, expected) -> None:
    settings = Settings(a1111_max_size=2048)
    assert edit_size(None, picture_size, family, settings) == expected
    assert edit_size("auto", picture_size, family, settings) == expected
    assert edit_size("512x256", picture_size, family, settings) == (512, 256)
