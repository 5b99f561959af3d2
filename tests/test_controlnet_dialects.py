"""ControlNet units outside A1111 (issue 21): the `controlnet` extension of the OpenAI dialect
(generations through the openai SDK, edits as multipart parts) and of the job API (with its
progress events), errors in each dialect's shape, and units crossing the Ray wire. Expected
pictures come from diffusers' ControlNet pipelines called directly on the same tiny weights."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
from dataclasses import replace

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import API_KEY
from tests.controlnet_files import controlnet_models, write_nets
from tests.test_controlnet import CONTROL, arr, b64, close, decoded, direct, noise
from tests.test_jobs import read_events

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PICTURE = noise(64, 64, seed=21)
# the fields direct() uses: prompt "a lighthouse", Euler, 5 steps, cfg 5, seed 11, 64x64
EXTRA = {"steps": 5, "seed": 11, "sampler": "Euler", "cfg_scale": 5}


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_nets(tmp_path_factory.mktemp("controlnets"))


@pytest.fixture(scope="module")
def cn_server(make_server, nets):  # noqa: ANN001, ANN201
    return make_server(controlnet_models(nets["folder"]), max_batch=1)


@pytest.fixture()
def http(cn_server):  # noqa: ANN001, ANN201
    with cn_server.client() as c:
        yield c


@pytest.fixture()
def sdk(cn_server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=cn_server.url + "/v1", api_key=API_KEY, max_retries=0)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + b64(image)


# ---- OpenAI: /v1/images/generations ----------------------------------------------------------
def test_openai_sdk_generation_with_a_unit_is_diffusers_controlnet(sdk, nets) -> None:  # noqa: ANN001
    """weight 0.7, window 0.2-0.6 of 5 steps: the extension's rule runs steps 1-3, which
    diffusers' rule selects with end 0.8 (as tests/test_controlnet.py states)."""
    unit = {"model": "cn-xl", "image": data_url(CONTROL), "weight": 0.7, "guidance_start": 0.2,
            "guidance_end": 0.6}
    answer = sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", size="64x64",
                                 response_format="b64_json", extra_body={**EXTRA, "controlnet": [unit]})
    assert len(answer.data) == 1  # the detected map is not answered in this dialect
    got = arr(decoded(answer.data[0].b64_json))
    close(got, direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.7,
                      control_guidance_start=0.2, control_guidance_end=0.8))
    plain = sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", size="64x64",
                                response_format="b64_json", extra_body=EXTRA)
    assert np.abs(got - arr(decoded(plain.data[0].b64_json))).mean() > 1  # the unit did something


def test_openai_two_units_on_sd15_with_enums_as_names(http, nets) -> None:  # noqa: ANN001
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    second = noise(64, 64, seed=9)
    units = [{"model": "cn_sd15", "weight": 0.5, "image": b64(CONTROL), "resize_mode": "Crop and Resize"},
             {"model": "CN_SD15", "weight": 1.3, "image": data_url(second), "control_mode": "Balanced"},
             {"model": "cn_sd15", "enabled": False}]  # switched off: not counted, not checked
    answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sd15", "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json",
        **EXTRA, "controlnet": units})
    assert answer.status_code == 200, answer.text
    multi = MultiControlNetModel([nets["sd15"], nets["sd15"]])
    expected = direct("sd15", multi, image=[CONTROL, second], controlnet_conditioning_scale=[0.5, 1.3])
    close(arr(decoded(answer.json()["data"][0]["b64_json"])), expected)


def test_openai_n_images_with_a_unit_are_the_seeds_alone(http) -> None:  # noqa: ANN001
    def generate(n: int, seed: int) -> list[str]:
        answer = http.post("/v1/images/generations", headers=AUTH, json={
            "model": "tiny-sdxl", "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json",
            "n": n, **EXTRA, "seed": seed, "controlnet": [{"model": "cn-xl", "image": b64(CONTROL)}]})
        assert answer.status_code == 200, answer.text
        return [item["b64_json"] for item in answer.json()["data"]]

    both = generate(2, 11)
    assert len(both) == 2
    assert arr(decoded(both[1])).tolist() == arr(decoded(generate(1, 12)[0])).tolist()


@pytest.mark.parametrize(("unit", "param", "words"), [
    ({"model": "nope"}, "controlnet[0].model", "cn-xl ["),
    ({"model": "cn_sd15"}, "controlnet[0].model", "does not fit"),
    ({"module": "depth_zoe"}, "controlnet[0].module", "canny"),
    ({"guidance_start": 0.7, "guidance_end": 0.3}, "controlnet[0].guidance_start", "guidance_end"),
    ({"weight": 3}, "controlnet[0].weight", "2"),
    ({"weight": "heavy"}, "controlnet[0].weight", "a number"),
    ({"processor_res": "nan"}, "controlnet[0].processor_res", "a finite number"),
    ({"image": "bm90IGFuIGltYWdl"}, "controlnet[0].image", "image"),
    ({"image": ""}, "controlnet[0].image", "needs an image"),
    ({"control_mode": 7}, "controlnet[0].control_mode", "Balanced"),
    ({"model": None}, "controlnet[0].model", "names a ControlNet model"),
])
def test_openai_bad_units_are_400_naming_the_param(http, unit, param, words) -> None:  # noqa: ANN001
    fields = {"model": "cn-xl", "image": b64(CONTROL), **unit}
    answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": "a lighthouse", "size": "64x64", **EXTRA, "controlnet": [fields]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]


def test_openai_too_many_units_or_a_unit_not_an_object_is_400(http) -> None:  # noqa: ANN001
    unit = {"model": "cn-xl", "image": "not even base64 !!"}  # refused on the count, before decoding
    answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": "a", "size": "64x64", **EXTRA, "controlnet": [unit] * 4})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "controlnet[3]" and "at most 3" in error["message"]
    answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": "a", "size": "64x64", **EXTRA, "controlnet": ["canny"]})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "controlnet.0"


# ---- OpenAI: /v1/images/edits ----------------------------------------------------------------
# (Image to image with a unit is compared with A1111's img2img, which
# tests/test_controlnet.py compares with diffusers' ControlNet img2img pipeline.)
def a1111_img2img(c, units: list, **fields) -> np.ndarray:  # noqa: ANN001
    answer = c.post("/sdapi/v1/img2img", headers=AUTH, json={
        "prompt": "a lighthouse", "steps": 8, "seed": 11, "sampler_name": "Euler", "cfg_scale": 5,
        "width": 64, "height": 64, "init_images": [b64(PICTURE)], "denoising_strength": 0.75,
        "resize_mode": 1, "alwayson_scripts": {"controlnet": {"args": units}}, **fields})
    assert answer.status_code == 200, answer.text
    return arr(decoded(answer.json()["images"][0]))


def test_openai_sdk_edit_with_a_unit_as_flattened_parts(sdk, http) -> None:  # noqa: ANN001
    """The SDK sends extra_body's list of units as `controlnet[][field]` parts; a unit without
    an image uses the edit's picture (strength 0.75 without a mask: 6 of 8 steps). The same
    units through A1111's img2img give the same pixels."""
    def edit(units: list | None) -> np.ndarray:
        extra = {**EXTRA, "steps": 8, **({"controlnet": units} if units is not None else {})}
        answer = sdk.images.edit(image=("p.png", png_bytes(PICTURE), "image/png"), prompt="a lighthouse",
                                 model="tiny-sdxl", response_format="b64_json", extra_body=extra)
        return arr(decoded(answer.data[0].b64_json))

    got = edit([{"model": "cn-xl"}])
    assert got.tolist() == a1111_img2img(http, [{"model": "cn-xl", "enabled": True}]).tolist()
    assert np.abs(got - edit(None)).mean() > 1  # the unit did something
    # several units: the SDK sends each field's values together (the i-th is unit i's)
    two = [{"model": "cn-xl", "image": b64(CONTROL), "weight": 0.6, "control_mode": 0},
           {"model": "cn-xl", "image": "", "weight": 0.4, "control_mode": 1}]
    assert edit(two).tolist() == a1111_img2img(http, [{**u, "enabled": True} for u in two]).tolist()


def test_openai_edit_with_units_as_json_text_and_errors_as_400(http) -> None:  # noqa: ANN001
    files = {"image": ("p.png", png_bytes(PICTURE), "image/png")}
    form = {"prompt": "a lighthouse", "model": "tiny-sdxl", "response_format": "b64_json", "steps": "8",
            "seed": "11", "sampler": "Euler", "cfg_scale": "5"}
    units = json.dumps([{"model": "cn-xl", "image": b64(CONTROL)}])
    answer = http.post("/v1/images/edits", headers=AUTH, files=files, data={**form, "controlnet": units})
    assert answer.status_code == 200, answer.text
    expected = a1111_img2img(http, [{"model": "cn-xl", "image": b64(CONTROL), "enabled": True}])
    assert arr(decoded(answer.json()["data"][0]["b64_json"])).tolist() == expected.tolist()
    answer = http.post("/v1/images/edits", headers=AUTH, files=files, data={**form, "controlnet": "[{oops"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "controlnet", answer.text
    answer = http.post("/v1/images/edits", headers=AUTH, files=files, data={
        **form, "controlnet[0][model]": "cn-xl", "controlnet[0][guidance_end]": "1.5"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "controlnet[0].guidance_end"


# ---- the job API -----------------------------------------------------------------------------
def job_body(**fields) -> dict:
    return {"model": "tiny-sdxl", "prompt": "a lighthouse", "width": 64, "height": 64, **EXTRA, **fields}


def run_job(c, **fields) -> tuple[list, Image.Image]:  # noqa: ANN001
    answer = c.post("/jobs", headers=AUTH, json=job_body(**fields))
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    events = read_events(c, job_id)
    assert events[-1][1] == "done", events[-1]
    image = c.get(f"/jobs/{job_id}/image", headers=AUTH)
    assert image.status_code == 200, image.text
    return events, Image.open(io.BytesIO(image.content))


def test_a_job_with_a_unit_reports_progress_and_is_diffusers_controlnet(http, nets) -> None:  # noqa: ANN001
    unit = {"model": "cn-xl", "module": "none", "image": data_url(CONTROL), "weight": 0.7,
            "guidance_start": 0.2, "guidance_end": 0.6, "control_mode": 0, "resize_mode": 1}
    events, image = run_job(http, controlnet=[unit], previews=True)
    progress = [data for _, name, data in events if name == "progress"]
    assert progress and all(data["steps"] == 5 for data in progress) and progress[-1]["step"] == 5
    assert [data["step"] for data in progress] == sorted(data["step"] for data in progress)
    close(arr(image), direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.7,
                             control_guidance_start=0.2, control_guidance_end=0.8))
    # the same unit through A1111 gives the same picture
    a1111 = http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "a lighthouse", "steps": 5, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler",
        "cfg_scale": 5, "alwayson_scripts": {"controlnet": {"args": [{**unit, "enabled": True}]}}})
    assert a1111.status_code == 200, a1111.text
    assert arr(decoded(a1111.json()["images"][0])).tolist() == arr(image).tolist()


def test_a_job_unit_without_an_image_uses_init_image(http) -> None:  # noqa: ANN001
    _, image = run_job(http, init_image=b64(PICTURE), strength=0.75, steps=8, resize_mode=1,
                       controlnet=[{"model": "cn-xl"}])
    assert arr(image).tolist() == a1111_img2img(http, [{"model": "cn-xl", "enabled": True}]).tolist()


@pytest.mark.parametrize(("fields", "where", "words"), [
    ({"controlnet": [{"model": "nope", "image": "x"}]}, "controlnet[0].image", "base64"),
    ({"controlnet": [{"model": "nope", "image": b64(CONTROL)}]}, "controlnet[0].model", "cn-xl ["),
    ({"controlnet": [{"model": "cn-xl", "image": b64(CONTROL), "weight": -1}]}, "controlnet[0].weight", "0"),
    ({"controlnet": [{"model": "cn-xl"}]}, "controlnet[0].image", "needs an image"),
    ({"controlnet": [{"model": "cn-xl", "image": b64(CONTROL), "resize_mode": "Stretch"}]},
     "controlnet[0].resize_mode", "Just Resize"),
    ({"controlnet": [{"model": "cn-xl", "image": b64(CONTROL), "hr_option": "Sometimes"}], "enable_hr": True,
      "hr_scale": 1.5}, "controlnet[0].hr_option", "Low res only"),
])
def test_bad_job_units_are_422_in_visioncrafts_shape(http, fields, where, words) -> None:  # noqa: ANN001
    answer = http.post("/jobs", headers=AUTH, json=job_body(**fields))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["detail"] == body["error"]["message"]
    assert where in body["detail"] and words in body["detail"], body["detail"]


# ---- Ray: units cross the wire ---------------------------------------------------------------
def test_control_images_cross_the_ray_wire(nets, tmp_path) -> None:  # noqa: ANN001
    """What the ingress sends a replica (JobCall, pickled as Ray pickles it) keeps each job's
    control images: the replica's side of the call, on a real Engine without a cluster,
    makes the picture diffusers makes with that control image."""
    from app.api.generation import ImageRequest, UnitRequest, prepare_controls, to_params
    from app.cluster.replica import job_events
    from app.cluster.wire import DONE, JobCall
    from app.config import Settings
    from app.engine.controlnet_fit import match_controlnets
    from app.engine.engine import Engine
    from app.engine.jobs import Job
    from app.metrics import Metrics
    from app.registry import load_registry
    from tests.conftest import write_models_file

    try:
        from ray import cloudpickle as ray_pickle
    except ImportError:  # the [ray] extra is optional; Ray's cloudpickle is pickle's protocol
        ray_pickle = pickle
    models = write_models_file(tmp_path, f"models:\n  tiny-sdxl: {{source: builtin:tiny-sdxl}}\n"
                                         f"controlnet_dirs: [\"{nets['folder']}\"]\n")
    settings = Settings(models=models, devices="cpu")
    registry = load_registry(settings.models)

    match_controlnets(registry)  # as the replica does

    async def on_both_sides() -> list:
        request = ImageRequest(model="tiny-sdxl", prompt="a lighthouse", sampler="Euler", steps=5,
                               width=64, height=64, cfg_scale=5, seed=11,
                               controlnet=(UnitRequest(model="cn-xl", image=CONTROL, weight=0.7),))
        params = to_params(request, registry, settings)
        controls, _ = await prepare_controls(request, params)
        params = replace(params, control_images=controls[0])
        ingress_job = Job(params=params, client="c", loop=asyncio.get_running_loop(), deadline_s=60)
        call = ray_pickle.loads(ray_pickle.dumps(JobCall.of(ingress_job)))
        assert call.params.control_images is not params.control_images
        engine = Engine(settings, registry, Metrics())
        engine.start()
        try:
            return [event async for event in job_events(engine, call, "replica-x")]
        finally:
            await asyncio.to_thread(engine.stop, 0)

    events = asyncio.run(on_both_sides())
    kind, result = events[-1]
    assert kind == DONE, result
    close(arr(result.image), direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.7))


def test_a_unit_body_reads_as_the_a1111_unit() -> None:
    """The shared reader: the same unit in both dialects' spellings gives the same request."""
    from app.api.controlnet_units import read_unit_list
    from app.config import Settings

    settings = Settings(api_keys=["k"])
    text = base64.b64encode(png_bytes(CONTROL)).decode()
    legacy = {"input_image": text, "model": "m", "guidance": 0.5, "guessmode": True, "resize_mode": 3,
              "lowvram": True}
    modern = {"image": text, "model": "m", "guidance_end": 0.5, "control_mode": 2, "resize_mode": 0}
    (a,) = asyncio.run(read_unit_list("args", [legacy], settings, listed_means_enabled=False))
    (b,) = asyncio.run(read_unit_list("controlnet", [modern], settings, listed_means_enabled=True))
    fields = ("model", "guidance_end", "control_mode", "resize_mode", "weight", "guidance_start")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields] == ["m", 0.5, 2, 0, 1.0, 0.0]
    assert np.array_equal(np.asarray(a.image), np.asarray(CONTROL))
    off = asyncio.run(read_unit_list("args", [{"model": "None"}], settings, listed_means_enabled=False))
    assert off == ()


# ---- the infotext: the extension's `ControlNet N` entries in every dialect's PNG text ---------
def _entry(title: str) -> str:
    """The extension's entry for INFO_UNITS[0], written out by hand."""
    return (f'ControlNet 0: "Module: canny, Model: {title}, Weight: 0.7, Resize Mode: Resize and Fill, '
            'Processor Res: 128, Threshold A: 50, Threshold B: -1, Guidance Start: 0.2, Guidance End: 0.6, '
            'Pixel Perfect: False, Control Mode: ControlNet is more important"')


INFO_UNITS = [
    {"model": "CN-XL", "module": "Canny", "image": b64(CONTROL), "weight": 0.7, "guidance_start": 0.2,
     "guidance_end": 0.6, "control_mode": "ControlNet is more important", "resize_mode": 2,
     "processor_res": 128, "threshold_a": 50},
    {"model": "cn-xl", "image": b64(PICTURE), "weight": 1.25, "control_mode": 1, "pixel_perfect": True},
]
SECOND_ENTRY = ('ControlNet 1: "Module: none, Model: {title}, Weight: 1.25, Resize Mode: Crop and Resize, '
                'Processor Res: -1, Threshold A: -1, Threshold B: -1, Guidance Start: 0, Guidance End: 1, '
                'Pixel Perfect: True, Control Mode: My prompt is more important"')


def _title(nets: dict) -> str:
    from tests.test_controlnet import old_hash

    return f"cn-xl [{old_hash(nets['folder'] / 'cn-xl' / 'diffusion_pytorch_model.safetensors')}]"


def _entries_of(text: str) -> list[str]:
    """The `ControlNet N: "..."` entries of an infotext's last line, in order."""
    import re

    return re.findall(r'ControlNet \d+: "[^"]*"', text.splitlines()[-1])


def test_openai_and_job_pngs_carry_the_controlnet_entries(http, nets) -> None:  # noqa: ANN001
    """The `parameters` text chunk (read with PIL) of an OpenAI answer and of a job's image has
    one entry per unit, as the extension writes them, before the version; A1111's infotext and
    PNG say the same, and png-info reads the entry back as one field."""
    title = _title(nets)
    expected = [_entry(title), SECOND_ENTRY.format(title=title)]
    answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json",
        **EXTRA, "controlnet": INFO_UNITS})
    assert answer.status_code == 200, answer.text
    openai_text = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).info[
        "parameters"]
    assert _entries_of(openai_text) == expected, openai_text
    assert openai_text.splitlines()[-1].endswith(expected[-1] + ", Version: craftserve " + _version())

    _, image = run_job(http, controlnet=INFO_UNITS)
    assert _entries_of(image.info["parameters"]) == expected, image.info["parameters"]

    a1111 = http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "a lighthouse", "steps": 5, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler",
        "cfg_scale": 5, "alwayson_scripts": {"controlnet": {"args": [{**u, "enabled": True}
                                                                    for u in INFO_UNITS]}}})
    assert a1111.status_code == 200, a1111.text
    info = json.loads(a1111.json()["info"])
    png_text = Image.open(io.BytesIO(base64.b64decode(a1111.json()["images"][0]))).info["parameters"]
    assert _entries_of(info["infotexts"][0]) == expected == _entries_of(png_text)
    assert info["infotexts"][0] == png_text
    assert info["extra_generation_params"]["ControlNet 0"] == expected[0].split(": ", 1)[1]
    read = http.post("/sdapi/v1/png-info", headers=AUTH, json={"image": a1111.json()["images"][0]})
    assert read.status_code == 200, read.text
    assert read.json()["parameters"]["ControlNet 1"] == expected[1].split(": ", 1)[1][1:-1]


def _version() -> str:
    from app import __version__

    return __version__


def test_a_request_without_units_has_no_controlnet_entry(http) -> None:  # noqa: ANN001
    answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json",
        **EXTRA})
    text = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).info["parameters"]
    assert "ControlNet" not in text and "Steps: 5" in text


# ---- preprocessing stays within the image pixel limit ----------------------------------------
# A 16x1024 picture at resolution 2048: its short side x128, so 2048x131072 (268 million pixels)
# where CRAFTSERVE_MAX_IMAGE_PIXELS is 4096^2 = 16777216 by default.
THIN = Image.new("RGB", (16, 1024), (90, 140, 200))
LIMIT = 4096 * 4096


@pytest.fixture()
def no_resize(monkeypatch):  # noqa: ANN001, ANN201
    """Any preprocessing resize fails the request (a 500): a refusal must come before it."""
    from app.engine import preprocessors

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the picture was resized")

    monkeypatch.setattr(preprocessors, "short_side_resize", refuse)


def _says_the_limit(message: str, size: str) -> None:
    assert size in message and str(LIMIT) in message and "CRAFTSERVE_MAX_IMAGE_PIXELS" in message, message


def test_detect_refuses_a_working_picture_past_the_pixel_limit(http, no_resize) -> None:  # noqa: ANN001
    answer = http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(THIN)],
        "controlnet_processor_res": 2048})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "controlnet_processor_res" in detail
    _says_the_limit(detail, "2048x131072")


def test_detect_within_the_limit_answers_the_working_size(http) -> None:  # noqa: ANN001
    """64x4096 at resolution 256: short side x4, 256x16384 (4194304 pixels, within the limit)."""
    picture = Image.new("RGB", (64, 4096), (10, 200, 30))
    answer = http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": "threshold", "controlnet_threshold_a": 5,
        "controlnet_input_images": [b64(picture)],
        "controlnet_processor_res": 256})
    assert answer.status_code == 200, answer.text
    detected = decoded(answer.json()["images"][0])
    assert detected.size == (256, 16384)
    assert detected.getpixel((100, 9000)) == (255, 255, 255)  # every channel above 5


def test_units_past_the_limit_are_refused_in_every_dialect(http, no_resize) -> None:  # noqa: ANN001
    unit = {"model": "cn-xl", "module": "canny", "image": b64(THIN), "processor_res": 2048}
    a1111 = http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "a", "steps": 2, "width": 64, "height": 64,
        "alwayson_scripts": {"controlnet": {"args": [{**unit, "enabled": True}]}}})
    assert a1111.status_code == 422, a1111.text
    assert "alwayson_scripts.controlnet.args[0].processor_res" in a1111.json()["detail"]
    _says_the_limit(a1111.json()["detail"], "2048x131072")

    openai_answer = http.post("/v1/images/generations", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": "a", "size": "64x64", **EXTRA, "controlnet": [unit]})
    assert openai_answer.status_code == 400, openai_answer.text
    error = openai_answer.json()["error"]
    assert error["param"] == "controlnet[0].processor_res"
    _says_the_limit(error["message"], "2048x131072")

    job = http.post("/jobs", headers=AUTH, json=job_body(controlnet=[unit]))
    assert job.status_code == 422, job.text
    assert "controlnet[0].processor_res" in job.json()["detail"]


def test_a_pixel_perfect_unit_and_an_init_picture_are_bounded_too(http, no_resize) -> None:  # noqa: ANN001
    """Pixel perfect at 1024x1024 with Crop and Resize: the 16x1024 picture's short side once
    fitted is 16 x 64 = 1024, so 1024x65536. Without an image, img2img's picture is the one."""
    unit = {"model": "cn-xl", "module": "canny", "image": b64(THIN), "pixel_perfect": True, "enabled": True}
    answer = http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "a", "steps": 2, "width": 1024, "height": 1024,
        "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert answer.status_code == 422, answer.text
    assert "args[0].pixel_perfect" in answer.json()["detail"]
    _says_the_limit(answer.json()["detail"], "1024x65536")

    answer = http.post("/sdapi/v1/img2img", headers=AUTH, json={
        "prompt": "a", "steps": 2, "width": 64, "height": 64, "init_images": [b64(THIN)],
        "alwayson_scripts": {"controlnet": {"args": [{**unit, "image": "", "pixel_perfect": False,
                                                       "processor_res": 2048}]}}})
    assert answer.status_code == 422, answer.text
    _says_the_limit(answer.json()["detail"], "2048x131072")
