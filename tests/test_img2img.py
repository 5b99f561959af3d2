"""Pictures in, through the real HTTP stack on the tiny model: A1111's img2img (masks, fill modes,
"only masked"), the hires fix and the extras, VisionCraft's /img2img and /upscale through the
published wrapper. Expected values come from elsewhere: diffusers' own image-to-image pipeline
called directly, PIL's resizes, the input picture itself."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from VisionCraftAPI.api import VisionCraftClient
from VisionCraftAPI.exceptions import InvalidParam

from tests.conftest import API_KEY
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}




PICTURE = noise(64, 64, seed=7)
BASE = {"prompt": "a lighthouse at dusk", "steps": 8, "width": 64, "height": 64, "seed": 11,
        "sampler_name": "Euler", "cfg_scale": 5, "init_images": [b64(PICTURE)], "denoising_strength": 0.5}


def img2img(client, **fields) -> dict:  # noqa: ANN001
    answer = client.post("/sdapi/v1/img2img", json={**BASE, **fields}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_img2img_is_diffusers_image_to_image_with_a1111s_strength(client) -> None:  # noqa: ANN001
    """The same pass as diffusers' StableDiffusionXLImg2ImgPipeline on the same weights, the
    same scheduler and seed: int(steps x strength) steps from the noised picture."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from app.engine import tiny
    from app.engine.schedulers import make_scheduler
    from app.samplers import resolve_sampler

    got = decoded(img2img(client)["images"][0])
    pipe = StableDiffusionXLImg2ImgPipeline(**tiny.build_tiny_sdxl().components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config, 11)
    steps_run = []
    expected = pipe("a lighthouse at dusk", image=PICTURE, strength=0.5, num_inference_steps=8,
                    guidance_scale=5, generator=[torch.Generator("cpu").manual_seed(11)],
                    callback_on_step_end=lambda p, i, t, kw: steps_run.append(i) or kw).images[0]
    assert len(steps_run) == 4  # int(8 x 0.5)
    difference = np.abs(arr(got) - arr(expected))
    # (the server runs the networks on contiguous tensors; diffusers alone, channels-last ones)
    assert difference.max() <= 2 and difference.mean() < 0.05
    assert np.abs(arr(got) - arr(PICTURE)).mean() > 5  # it did change the picture


def test_a_picture_gives_the_same_bytes_alone_batched_and_through_visioncraft(client) -> None:  # noqa: ANN001
    alone = img2img(client)
    batched = img2img(client, batch_size=2)
    assert batched["images"][0] == alone["images"][0]
    assert json.loads(batched["info"])["all_seeds"] == [11, 12]
    through_vc = client.post("/img2img", json={
        "token": API_KEY, "image": b64(PICTURE), "prompt": BASE["prompt"], "steps": 8, "strength": 0.5,
        "scheduler": "Euler", "refiner": "tiny-sdxl", "seed": 11, "cfg_scale": 5})
    assert through_vc.status_code == 200, through_vc.text
    expected = arr(decoded(alone["images"][0]))
    assert arr(Image.open(io.BytesIO(through_vc.content))).tolist() == expected.tolist()


def test_the_answer_reports_img2img_fields_and_keeps_pictures_out_unless_asked(client) -> None:  # noqa: ANN001
    answer = img2img(client)
    assert answer["parameters"]["init_images"] is None and answer["parameters"]["mask"] is None
    assert answer["parameters"]["denoising_strength"] == 0.5
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    echoed = img2img(client, include_init_images=True)
    assert echoed["parameters"]["init_images"] == BASE["init_images"]


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_inpainting_changes_only_the_blurred_mask(client) -> None:  # noqa: ANN001
    mask = _mask((64, 64), (24, 24, 40, 40))
    answer = img2img(client, mask=b64(mask), inpaint_full_res=False, inpainting_fill=1,
                     denoising_strength=0.9)
    got = arr(decoded(answer["images"][0]))
    outside = np.ones((64, 64), bool)
    outside[14:50, 14:50] = False  # the box grown by the default blur's reach (10 px)
    assert np.array_equal(got[outside], arr(PICTURE)[outside])
    assert np.abs(got[28:36, 28:36] - arr(PICTURE)[28:36, 28:36]).mean() > 5


def test_an_rgba_mask_is_read_from_its_alpha_and_a_mask_of_another_size_is_resized(client) -> None:  # noqa: ANN001
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # half the size, transparent but a box
    rgba.paste((0, 0, 0, 255), (12, 12, 20, 20))
    answer = img2img(client, mask=b64(rgba), inpaint_full_res=False, inpainting_fill=1, mask_blur=0)
    got = arr(decoded(answer["images"][0]))
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False  # the box 24..40 scaled up, Lanczos's lobes (3 source px) around it
    assert np.array_equal(got[outside], arr(PICTURE)[outside])
    assert not np.array_equal(got[26:38, 26:38], arr(PICTURE)[26:38, 26:38])


def test_only_masked_answers_at_the_pictures_size_and_keeps_the_rest(client) -> None:  # noqa: ANN001
    picture = noise(160, 120, seed=3)
    mask = _mask((160, 120), (100, 40, 120, 60))
    answer = img2img(client, init_images=[b64(picture)], mask=b64(mask), mask_blur=0,
                     inpaint_full_res_padding=8, inpainting_fill=1, denoising_strength=0.9)
    got = decoded(answer["images"][0])
    assert got.size == (160, 120)
    outside = np.ones((120, 160), bool)
    outside[40:60, 100:120] = False
    assert np.array_equal(arr(got)[outside], arr(picture)[outside])


def test_the_masked_content_modes_start_from_different_latents(client) -> None:  # noqa: ANN001
    mask = b64(_mask((64, 64), (16, 16, 48, 48)))
    inside = {}
    for fill in (0, 1, 2, 3):
        answer = img2img(client, mask=mask, inpaint_full_res=False, inpainting_fill=fill,
                         denoising_strength=0.6, mask_blur=0)
        inside[fill] = arr(decoded(answer["images"][0]))[20:44, 20:44]
        assert f"Masked content: {['fill', 'original', 'latent noise', 'latent nothing'][fill]}" in \
            json.loads(answer["info"])["infotexts"][0]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.array_equal(inside[a], inside[b]), (a, b)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_each_resize_mode_answers_the_requested_size(client, mode: int) -> None:  # noqa: ANN001
    answer = img2img(client, init_images=[b64(noise(100, 60))], resize_mode=mode, width=64, height=96)
    assert decoded(answer["images"][0]).size == (64, 96)


def test_several_init_images_are_used_in_turn(client) -> None:  # noqa: ANN001
    other = noise(64, 64, seed=8)
    both = img2img(client, init_images=[b64(PICTURE), b64(other)], batch_size=2)
    first_alone = img2img(client)
    second_alone = img2img(client, init_images=[b64(other)], seed=12)
    assert both["images"] == [first_alone["images"][0], second_alone["images"][0]]


# ---- bad input: A1111's shapes ----------------------------------------------------------------
def test_img2img_without_a_picture_is_a1111s_404(client) -> None:  # noqa: ANN001
    for missing in ({"init_images": []}, {"init_images": None}):
        answer = client.post("/sdapi/v1/img2img", json={**BASE, **missing}, headers=AUTH)
        assert answer.status_code == 404
        assert "Init image not found" in answer.json()["detail"]


@pytest.mark.parametrize(("value", "words"), [
    ("not base64 at all!", "base64"),
    (base64.b64encode(b"hello, not a picture").decode(), "image"),
])
def test_a_bad_picture_is_a_422_naming_it(client, value: str, words: str) -> None:  # noqa: ANN001
    for field in ("init_images", "mask"):
        body = {**BASE, field: [value] if field == "init_images" else value}
        answer = client.post("/sdapi/v1/img2img", json=body, headers=AUTH)
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["detail"] and words in answer.json()["detail"].lower()
        assert value[:10] not in answer.text or len(value) < 60  # never echoes a whole picture


def test_a_decompression_bomb_is_refused_before_it_is_decoded(client) -> None:  # noqa: ANN001
    bomb = io.BytesIO()
    Image.new("L", (20000, 20000), 0).save(bomb, format="PNG", optimize=True)
    bomb_text = base64.b64encode(bomb.getvalue()).decode()
    answer = client.post("/sdapi/v1/img2img", json={**BASE, "init_images": [bomb_text]}, headers=AUTH)
    assert answer.status_code == 422, answer.text
    assert "MAX_IMAGE_PIXELS" in answer.json()["detail"]


@pytest.mark.parametrize(("field", "value"), [
    ("denoising_strength", 1.5), ("resize_mode", 4), ("inpainting_fill", 7), ("mask_blur", -1),
])
def test_img2img_knobs_out_of_range(client, field: str, value) -> None:  # noqa: ANN001
    answer = client.post("/sdapi/v1/img2img", json={**BASE, field: value}, headers=AUTH)
    assert answer.status_code == 422
    assert field in answer.json()["detail"]


# ---- hires fix ---------------------------------------------------------------------------------
TXT = {"prompt": "a lighthouse", "steps": 6, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
       "enable_hr": True}


def txt2img(client, **fields) -> dict:  # noqa: ANN001
    answer = client.post("/sdapi/v1/txt2img", json={**TXT, **fields}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos", "Nearest", None])
def test_hires_fix_answers_the_scaled_size(client, upscaler) -> None:  # noqa: ANN001
    answer = txt2img(client, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=4,
                     denoising_strength=0.5)
    assert decoded(answer["images"][0]).size == (96, 96)
    text = json.loads(answer["info"])["infotexts"][0]
    assert f"Hires upscaler: {upscaler or 'Latent'}" in text and "Hires steps: 4" in text


def test_hires_fix_resize_to_both_sides_crops_to_them(client) -> None:  # noqa: ANN001
    answer = txt2img(client, hr_resize_x=128, hr_resize_y=96, hr_upscaler="Lanczos")
    assert decoded(answer["images"][0]).size == (128, 96)
    one_side = txt2img(client, hr_resize_x=96, hr_upscaler="Latent")
    assert decoded(one_side["images"][0]).size == (96, 96)


def test_hires_fix_changes_the_picture_and_its_own_prompt_counts(client) -> None:  # noqa: ANN001
    plain = client.post("/sdapi/v1/txt2img", json={**TXT, "enable_hr": False}, headers=AUTH).json()
    hires = txt2img(client, hr_scale=1.0, hr_upscaler="Lanczos", denoising_strength=0.7)
    assert plain["images"][0] != hires["images"][0]
    other_prompt = txt2img(client, hr_scale=1.0, hr_upscaler="Lanczos", denoising_strength=0.7,
                           hr_prompt="a storm at sea")
    assert other_prompt["images"][0] != hires["images"][0]
    assert "Hires prompt" in json.loads(other_prompt["info"])["infotexts"][0]


def test_an_unknown_upscaler_names_itself_and_the_served_ones(client) -> None:  # noqa: ANN001
    answer = client.post("/sdapi/v1/txt2img", json={**TXT, "hr_upscaler": "4x-Imaginary"}, headers=AUTH)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert "4x-Imaginary" in detail and "Latent (bicubic)" in detail and "Lanczos" in detail


def test_hires_past_the_size_limit_is_refused(client) -> None:  # noqa: ANN001
    answer = client.post("/sdapi/v1/txt2img", json={**TXT, "width": 1024, "height": 1024, "hr_scale": 4},
                         headers=AUTH)
    assert answer.status_code == 422
    assert "A1111_MAX_SIZE" in answer.json()["detail"]


def test_upscaler_listings_are_what_is_served(client) -> None:  # noqa: ANN001
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers", headers=AUTH).json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes", headers=AUTH).json()]
    assert modes == ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                     "Latent (nearest)", "Latent (nearest-exact)"]


# ---- extras --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "resample"), [("Lanczos", Image.LANCZOS), ("Nearest", Image.NEAREST)])
def test_extra_single_image_is_pils_resize(client, name: str, resample) -> None:  # noqa: ANN001
    picture = noise(40, 30, seed=2)
    answer = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64(picture), "upscaler_1": name, "upscaling_resize": 2}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    got = decoded(answer.json()["image"])
    assert arr(got).tolist() == arr(picture.resize((80, 60), resample)).tolist()
    assert "Postprocess upscaler: " + name in answer.json()["html_info"]


def test_extras_to_a_size_crops_it_and_batches_take_a_list(client) -> None:  # noqa: ANN001
    picture = noise(40, 30, seed=2)
    answer = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64(picture), "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 100,
        "upscaling_resize_h": 100}, headers=AUTH)
    assert decoded(answer.json()["image"]).size == (100, 100)
    # by the larger ratio (100/30): 133x100, the middle 100 columns
    expected = picture.resize((133, 100), Image.LANCZOS).crop((16, 0, 116, 100))
    assert arr(decoded(answer.json()["image"])).tolist() == arr(expected).tolist()
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64(picture), "name": "a.png"}, {"data": b64(noise(20, 20)), "name": "b"}],
        "upscaler_1": "Nearest", "upscaling_resize": 3}, headers=AUTH)
    assert batch.status_code == 200, batch.text
    assert [decoded(i).size for i in batch.json()["images"]] == [(120, 90), (60, 60)]


def test_extras_refuse_unknown_upscalers_and_latent_modes(client) -> None:  # noqa: ANN001
    for name in ("Foo", "Latent"):
        answer = client.post("/sdapi/v1/extra-single-image", json={
            "image": b64(PICTURE), "upscaler_1": name}, headers=AUTH)
        assert answer.status_code == 422 and name in answer.json()["detail"]
    empty = client.post("/sdapi/v1/extra-single-image", json={"upscaler_1": "Lanczos"}, headers=AUTH)
    assert empty.status_code == 422 and "image" in empty.json()["detail"]


# ---- VisionCraft through the published wrapper ---------------------------------------------------
def _wrapper(server) -> VisionCraftClient:  # noqa: ANN001
    client = VisionCraftClient(API_KEY)
    client.API_HOST = server.url
    return client


def test_the_visioncraft_wrapper_does_image_to_image_and_upscaling(server) -> None:  # noqa: ANN001
    vc = _wrapper(server)
    schedulers = asyncio.run(vc.get_i2i_schedulers())
    refiners = asyncio.run(vc.get_i2i_refiners())
    assert "Euler a" in schedulers and refiners == ["tiny-sdxl"]
    buffer = io.BytesIO()
    noise(96, 64).save(buffer, format="PNG")
    data = asyncio.run(vc.image2image(buffer.getvalue(), "a cat", scheduler="Euler a", refiner="tiny-sdxl",
                                      steps=4, strength=0.6))
    assert Image.open(io.BytesIO(data)).size == (96, 64)  # the picture's own size
    models = asyncio.run(vc.get_upscale_models())
    assert "Lanczos" in models
    big = asyncio.run(vc.image_upscaling(buffer.getvalue(), "Lanczos", resize=4))
    upscaled = Image.open(io.BytesIO(big))
    assert upscaled.size == (384, 256)
    assert arr(upscaled).tolist() == arr(noise(96, 64).resize((384, 256), Image.LANCZOS)).tolist()
    with pytest.raises(InvalidParam):
        asyncio.run(vc.image_upscaling(buffer.getvalue(), "No-Such-Upscaler"))
    with pytest.raises(InvalidParam):
        asyncio.run(vc.image2image("bm90IGFuIGltYWdl", "a cat", scheduler="Euler a", refiner="tiny-sdxl"))


def test_visioncraft_img2img_bad_input(client) -> None:  # noqa: ANN001
    good = {"token": API_KEY, "image": b64(PICTURE), "prompt": "a", "steps": 4}
    for fields, named in (({"strength": 0.05}, "strength"), ({"steps": 51}, "steps"),
                          ({"refiner": "nope"}, "refiner"), ({"image": "%%%"}, "image"),
                          ({"resize": 3, "model": "Lanczos"}, "resize")):
        route = "/upscale" if "resize" in fields else "/img2img"
        answer = client.post(route, json={**good, **fields})
        assert answer.status_code == 422, (fields, answer.text)
        assert named in answer.json()["error"]["message"]


# ---- a model upscaler from models.yaml's upscaler_dirs, over HTTP -------------------------------
@pytest.fixture(scope="module")
def upscaler_server(make_server, tmp_path_factory):  # noqa: ANN001, ANN201
    from tests.test_upscalers import save_safetensors, tiny_esrgan

    folder = tmp_path_factory.mktemp("upscalers")
    save_safetensors(tiny_esrgan(2, seed=3), folder / "2x-Tiny.safetensors")
    return make_server(f"""
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
upscaler_dirs: [{folder}]
""")


def test_a_model_upscaler_serves_the_extras_and_the_hires_fix(upscaler_server) -> None:  # noqa: ANN001
    from tests.test_upscalers import as_image, run_directly, tiny_esrgan

    with upscaler_server.client() as client:
        listed = client.get("/sdapi/v1/upscalers", headers=AUTH).json()
        tiny = next(u for u in listed if u["name"] == "2x-Tiny")
        assert tiny["scale"] == 2.0 and tiny["model_path"].endswith("2x-Tiny.safetensors")
        assert "2x-Tiny" in client.get("/models-upscale").json()
        picture = noise(24, 16, seed=4)
        answer = client.post("/sdapi/v1/extra-single-image", json={
            "image": b64(picture), "upscaler_1": "2x-Tiny", "upscaling_resize": 2}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        expected = as_image(run_directly(tiny_esrgan(2, seed=3), picture))
        assert np.abs(arr(decoded(answer.json()["image"])) - arr(expected)).max() <= 1
        hires = client.post("/sdapi/v1/txt2img", json={**TXT, "hr_upscaler": "2x-Tiny"}, headers=AUTH)
        assert hires.status_code == 200, hires.text
        assert decoded(hires.json()["images"][0]).size == (128, 128)


# ---- batching across clients and dialects -------------------------------------------------------
OTHER_KEY = "other-key-0000001"


@pytest.fixture(scope="module")
def two_key_server(make_server):  # noqa: ANN001, ANN201
    return make_server(api_keys=[API_KEY, OTHER_KEY], batch_window_ms=200)


def test_two_clients_inpainting_jobs_share_one_call_and_keep_their_bytes(two_key_server) -> None:  # noqa: ANN001
    """A VisionCraft /img2img job of one key and an A1111 img2img job of another, each with its
    own picture and mask, run as one batch; each answer is what that job gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_engine import HeldWorker, wait_for

    first, second = noise(64, 64, seed=21), noise(64, 64, seed=22)
    mask_a, mask_b = _mask((64, 64), (8, 8, 30, 30)), _mask((64, 64), (30, 20, 60, 50))
    vc = {"token": API_KEY, "image": b64(first), "mask": b64(mask_a), "prompt": "a door", "steps": 8,
          "strength": 0.7, "scheduler": "Euler", "refiner": "tiny-sdxl", "seed": 5}
    a1111 = {"prompt": "a window", "init_images": [b64(second)], "mask": b64(mask_b), "steps": 8,
             "denoising_strength": 0.7, "sampler_name": "Euler", "width": 64, "height": 64, "seed": 9,
             "inpaint_full_res": False, "inpainting_fill": 1, "mask_blur": 4}
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    server = two_key_server
    with server.client() as c:
        alone_vc = c.post("/img2img", json=vc)
        alone_a1111 = c.post("/sdapi/v1/img2img", json=a1111, headers=other)
        assert alone_vc.status_code == 200, alone_vc.text
        assert alone_a1111.status_code == 200, alone_a1111.text
        held = HeldWorker(server.app.state.engine.workers[0])
        try:
            with ThreadPoolExecutor(3) as pool:
                blocker = pool.submit(c.post, "/img2img", json={**vc, "seed": 1})
                wait_for(lambda: held.worker.running)
                together_vc = pool.submit(c.post, "/img2img", json=vc)
                together_a1111 = pool.submit(c.post, "/sdapi/v1/img2img", json=a1111, headers=other)
                wait_for(lambda: len(server.app.state.engine.queue) == 2)
                held.release()
                assert blocker.result().status_code == 200
                batched_vc, batched_a1111 = together_vc.result(), together_a1111.result()
        finally:
            held.restore()
    assert len(held.ran[-1]) == 2 and len(set(held.ran[-1])) == 2  # one call, two clients
    assert batched_vc.headers["X-Batch-Size"] == "2"
    assert batched_vc.content == alone_vc.content
    assert batched_a1111.json()["images"] == alone_a1111.json()["images"]


# ---- the caps, over HTTP in each dialect --------------------------------------------------------
@pytest.fixture(scope="module")
def capped_server(make_server):  # noqa: ANN001, ANN201
    return make_server(max_image_bytes=60_000, max_image_pixels=200 * 200)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_caps_and_urls_are_refused_in_every_dialect_naming_the_setting(capped_server) -> None:  # noqa: ANN001
    import openai

    too_many_bytes = noise(180, 180)  # ~97 kB of PNG noise, under the pixel cap
    too_many_pixels = Image.new("RGB", (300, 300))  # a few hundred bytes, over the pixel cap
    assert len(_png_bytes(too_many_bytes)) > 60_000 and len(_png_bytes(too_many_pixels)) < 60_000
    cases = [(too_many_bytes, "MAX_IMAGE_BYTES"), (too_many_pixels, "MAX_IMAGE_PIXELS"),
             ("http://example.com/picture.png", "ALLOW_IMAGE_URLS")]
    sdk = openai.OpenAI(base_url=capped_server.url + "/v1", api_key=API_KEY, max_retries=0)
    with capped_server.client() as c:
        for picture, setting in cases:
            value = picture if isinstance(picture, str) else b64(picture)
            a1111 = c.post("/sdapi/v1/img2img", json={**BASE, "init_images": [value]}, headers=AUTH)
            assert a1111.status_code == 422 and setting in a1111.json()["detail"], a1111.text
            assert a1111.json()["error"] == "InvalidParameter"
            vc = c.post("/img2img", json={"token": API_KEY, "image": value, "prompt": "a"})
            assert vc.status_code == 422 and setting in vc.json()["error"]["message"], vc.text
            up = c.post("/upscale", json={"token": API_KEY, "image": value, "model": "Lanczos"})
            assert up.status_code == 422 and setting in up.json()["detail"], up.text
            job = c.post("/jobs", json={"token": API_KEY, "model": "tiny-sdxl", "prompt": "a",
                                        "init_image": value})
            assert job.status_code == 422 and setting in job.json()["detail"], job.text
            if not isinstance(picture, str):
                with pytest.raises(openai.BadRequestError) as err:
                    sdk.images.edit(image=("p.png", _png_bytes(picture), "image/png"), prompt="a",
                                    model="tiny-sdxl")
                assert setting in str(err.value) and err.value.body["param"] == "image"
        assert c.get("/health").status_code == 200  # and it keeps serving
