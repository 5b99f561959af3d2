"""Image inputs of the job API over real HTTP: image to image (progress counts the steps that
really run), inpainting (pixels far from the mask are the original's, exactly), the hires fix,
and bad pictures answered 422 naming their field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import body
from tests.test_jobs import AUTH, read_events


@pytest.fixture(scope="module")
def image_jobs_server(make_server):
    return make_server(max_batch=1, preview_every=1)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colours: a repainted pixel cannot match its original by chance."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def b64png(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode("ascii")
    return "data:image/png;base64," + text if data_url else text


def run_job(c, **fields) -> tuple[list, Image.Image]:
    answer = c.post("/jobs", json=body(**fields))
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    events = read_events(c, job_id)
    assert events[-1][1] == "done", events[-1]
    image = c.get(f"/jobs/{job_id}/image", headers=AUTH)
    assert image.status_code == 200, image.text
    return events, Image.open(io.BytesIO(image.content))


def test_an_img2img_job_counts_the_steps_it_runs_and_keeps_the_pictures_size(image_jobs_server):
    with image_jobs_server.client() as c:
        # no width/height: the picture's own size; 10 steps at strength 0.55 run int(5.5) = 5
        events, image = run_job(c, init_image=b64png(picture(96, 64), data_url=True), strength=0.55,
                                steps=10, previews=True, width=..., height=...)
    names = [name for _, name, _ in events]
    assert names[0] == "queued" and names.count("started") == 1
    started = next(data for _, name, data in events if name == "started")
    assert started["steps"] == 5
    progress = [data for _, name, data in events if name == "progress"]
    assert progress and all(data["steps"] == 5 for data in progress)
    assert progress[-1]["step"] == 5
    previews = [data for _, name, data in events if name == "preview"]
    assert previews and {data["step"] for data in previews} <= set(range(1, 6))
    assert Image.open(io.BytesIO(base64.b64decode(previews[-1]["png_base64"]))).format == "PNG"
    done = events[-1][2]
    assert (done["width"], done["height"]) == (96, 64)
    assert image.size == (96, 64)


def test_an_img2img_job_at_the_size_asked(image_jobs_server):
    """width/height given: the picture is resized to them (strength default 0.75: 4 x 0.75 = 3)."""
    with image_jobs_server.client() as c:
        events, image = run_job(c, init_image=b64png(picture(96, 64)), steps=4, width=72, height=64)
    assert image.size == (72, 64)
    assert [data["steps"] for _, name, data in events if name == "progress"][-1] == 3


@pytest.mark.parametrize("full_res", [False, True], ids=["whole-picture", "only-masked"])
def test_an_inpaint_job_keeps_every_pixel_far_from_the_mask(image_jobs_server, full_res):
    source = picture(96, 64, seed=1)
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[24:40, 40:56] = 255  # white repaints
    with image_jobs_server.client() as c:
        _, image = run_job(c, init_image=b64png(source), mask=b64png(Image.fromarray(mask)),
                           strength=1.0, steps=3, width=96, height=64, mask_blur=2,
                           inpainting_fill=2, inpaint_full_res=full_res, inpaint_full_res_padding=8)
    assert image.size == (96, 64)
    out = np.asarray(image.convert("RGB"))
    original = np.asarray(source)
    # the blur (sigma 2, a 2*int(5.5)+1 = 11-tap kernel) reaches 5 pixels past the mask
    near = np.zeros_like(mask, dtype=bool)
    near[24 - 6:40 + 6, 40 - 6:56 + 6] = True
    assert np.array_equal(out[~near], original[~near])
    inside = mask == 255
    assert np.mean(np.any(out[inside] != original[inside], axis=-1)) > 0.9  # repainted


def test_a_hires_fix_job(image_jobs_server):
    with image_jobs_server.client() as c:
        events, image = run_job(c, steps=4, width=64, height=64, enable_hr=True, hr_scale=1.5,
                                hr_second_pass_steps=4, denoising_strength=0.5)
    assert image.size == (96, 96)
    assert (events[-1][2]["width"], events[-1][2]["height"]) == (96, 96)
    # 4 steps, then int(4 x 0.5) = 2 of the second pass
    assert [data["steps"] for _, name, data in events if name == "progress"][-1] == 6


@pytest.mark.parametrize("value", [
    "not base64 at all!!",
    base64.b64encode(b"GIF89a but not really an image").decode(),
    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode(),
], ids=["not-base64", "not-an-image", "truncated-png"])
def test_a_bad_picture_is_422_naming_init_image(image_jobs_server, value):
    with image_jobs_server.client() as c:
        answer = c.post("/jobs", json=body(init_image=value))
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("This server doesn't have init_image"), detail
    assert value[:40] not in detail or len(value) < 40  # never echoed whole


@pytest.mark.parametrize(("fields", "field"), [
    ({"mask": b64png(Image.new("L", (64, 64), 255))}, "mask"),
    ({"strength": 0.5}, "strength"),
    ({"init_image": b64png(picture(64, 64)), "strength": 1.5}, "strength"),
    ({"init_image": b64png(picture(64, 64)), "inpainting_fill": 4}, "inpainting_fill"),
    ({"init_image": b64png(picture(64, 64)), "mask": "nope!"}, "mask"),
    ({"init_image": b64png(picture(64, 64)), "enable_hr": True}, "enable_hr"),
    ({"enable_hr": True, "hr_upscaler": "Nope"}, "hr_upscaler"),
])
def test_bad_image_fields_are_422_naming_the_field(image_jobs_server, fields, field):
    with image_jobs_server.client() as c:
        answer = c.post("/jobs", json=body(**fields))
    assert answer.status_code == 422, answer.text
    assert f"doesn't have {field}" in answer.json()["detail"], answer.json()
