"""ControlNet units (issue 21) on tiny random ControlNets of both families, through the real
HTTP stack and webuiapi. Expected values come from elsewhere: diffusers' ControlNet pipelines
and ControlNetModel called directly, OpenCV, hashlib, the extension's rules stated by hand."""

from __future__ import annotations

import base64
import hashlib

import cv2
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image, ImageFilter

from tests.conftest import API_KEY
from tests.controlnet_files import controlnet_models, write_nets
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}




CONTROL = noise(64, 64, seed=5)


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_nets(tmp_path_factory.mktemp("controlnets"))


@pytest.fixture(scope="module")
def cn_server(make_server, nets):  # noqa: ANN001, ANN201
    return make_server(controlnet_models(nets["folder"]))


@pytest.fixture()
def http(cn_server):  # noqa: ANN001, ANN201
    with cn_server.client() as c:
        yield c


def unit(**fields) -> dict:
    return {"enabled": True, "module": "none", "model": "cn-xl", "image": b64(CONTROL), **fields}


def txt2img(http, units: list, status: int = 200, **fields) -> dict:  # noqa: ANN001
    body = {"prompt": "a lighthouse", "steps": 5, "width": 64, "height": 64, "seed": 11,
            "sampler_name": "Euler", "cfg_scale": 5, "alwayson_scripts": {"controlnet": {"args": units}},
            **fields}
    answer = http.post("/sdapi/v1/txt2img", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    return answer.json()


def old_hash(path) -> str:  # noqa: ANN001
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def direct(family: str, net, *, steps: int = 5, **kwargs) -> np.ndarray:  # noqa: ANN001
    """diffusers' ControlNet pipeline on the tiny model's weights, called directly."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from app.engine import tiny
    from app.engine.schedulers import make_scheduler
    from app.samplers import resolve_sampler

    base = tiny.build_tiny_sdxl() if family == "sdxl" else tiny.build_tiny_sd15()
    cls = StableDiffusionXLControlNetPipeline if family == "sdxl" else StableDiffusionControlNetPipeline
    pipe = cls.from_pipe(base, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config, 11)
    kwargs.setdefault("image", CONTROL)
    out = pipe("a lighthouse", num_inference_steps=steps, guidance_scale=5, width=64, height=64,
               generator=[torch.Generator("cpu").manual_seed(11)], **kwargs).images[0]
    return arr(out)


def close(got: np.ndarray, expected: np.ndarray) -> None:
    difference = np.abs(got - expected)
    # (the server runs the networks on contiguous tensors; diffusers alone, channels-last ones)
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_model_list_names_each_net_with_a1111s_old_hash(http, nets) -> None:  # noqa: ANN001
    listed = http.get("/controlnet/model_list", headers=AUTH).json()["model_list"]
    expected = {f"cn-xl [{old_hash(nets['folder'] / 'cn-xl' / 'diffusion_pytorch_model.safetensors')}]",
                f"cn_sd15 [{old_hash(nets['folder'] / 'cn_sd15.safetensors')}]"}
    assert set(listed) == expected
    assert http.get("/controlnet/version", headers=AUTH).json() == {"version": 3}
    assert http.get("/controlnet/settings", headers=AUTH).json() == {"control_net_unit_count": 3}
    modules = http.get("/controlnet/module_list", headers=AUTH).json()
    assert {"none", "canny", "invert", "blur_gaussian", "threshold", "scribble_xdog", "tile_resample",
            "lineart_standard", "shuffle", "t2ia_color_grid"} <= set(modules["module_list"])
    assert modules["module_detail"]["canny"]["sliders"][1]["value"] == 100


def test_a_unit_is_diffusers_controlnet_with_the_extensions_step_window(http, nets) -> None:  # noqa: ANN001
    """weight 0.7, window 0.2-0.6 over 5 steps: the extension runs the unit at steps i with
    0.2 <= i/5 <= 0.6, i.e. 1, 2, 3; diffusers keeps i when i/5 >= start and (i+1)/5 <= end,
    so end 0.8 selects the same steps there."""
    got = txt2img(http, [unit(weight=0.7, guidance_start=0.2, guidance_end=0.6)])
    assert len(got["images"]) == 2  # the image, then the detected map
    expected = direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.7,
                      control_guidance_start=0.2, control_guidance_end=0.8)
    close(arr(decoded(got["images"][0])), expected)
    plain = direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.0)
    assert np.abs(arr(decoded(got["images"][0])) - plain).mean() > 1  # the unit did something
    info = got["info"]
    assert "ControlNet 0" in info and "Guidance End: 0.6" in info


def test_two_units_weights_on_sd15_from_a_single_file(http, nets) -> None:  # noqa: ANN001
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    second = noise(64, 64, seed=9)
    got = txt2img(http, [unit(model="cn_sd15", weight=0.5),
                         unit(model="CN_SD15", weight=1.3, image=b64(second), save_detected_map=False)],
                  override_settings={"sd_model_checkpoint": "tiny-sd15"})
    assert len(got["images"]) == 2  # one map: the second unit's is not saved
    multi = MultiControlNetModel([nets["sd15"], nets["sd15"]])
    expected = direct("sd15", multi, image=[CONTROL, second], controlnet_conditioning_scale=[0.5, 1.3])
    close(arr(decoded(got["images"][0])), expected)


def test_control_modes_against_controlnetmodel_called_directly(nets) -> None:  # noqa: ANN001
    """My prompt is more important: residual k times weight x 0.825^(12-k) on both CFG halves;
    ControlNet is more important: the same, on the conditional half only."""
    from app.engine.control_units import ControlUnit
    from app.engine.controlnet import CraftControlNets

    net = nets["sd15"]
    torch.manual_seed(0)
    sample, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 64, 64)
    down, mid = net(sample, 500, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False)
    plain = [*down, mid]
    for mode in (1, 2):
        holder = CraftControlNets([net])
        holder.set_units([net], [ControlUnit("n", "w", weight=0.8, mode=mode)], total=4, cfg=True)
        d, m = holder(sample, torch.tensor(500), hidden, [cond], [1.0], return_dict=False)
        for k, (got, ref) in enumerate(zip([*d, m], plain, strict=True)):
            expected = ref * (0.8 * 0.825 ** (12 - k))
            if mode == 2:
                expected = torch.cat([torch.zeros_like(expected[:1]), expected[1:]])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batched_jobs_keep_the_bytes_they_get_alone(http) -> None:  # noqa: ANN001
    both = txt2img(http, [unit(save_detected_map=False)], batch_size=2)
    second = txt2img(http, [unit(save_detected_map=False)], seed=12)
    assert base64.b64decode(both["images"][1]) == base64.b64decode(second["images"][0])


def test_webuiapi_controlnetunit_and_helpers(cn_server, nets) -> None:  # noqa: ANN001
    host, port = cn_server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    api.set_auth("whoever", API_KEY)
    assert api.controlnet_version() == 3
    assert any(name.startswith("cn-xl [") for name in api.controlnet_model_list())
    assert "canny" in api.controlnet_module_list()
    control = webuiapi.ControlNetUnit(image=CONTROL, module="canny", model="cn-xl", weight=0.9)
    result = api.txt2img(prompt="a lighthouse", steps=3, width=64, height=64, seed=3,
                         sampler_name="Euler", controlnet_units=[control])
    assert len(result.images) == 2
    # processor_res 512: the map answered is the one fitted to 64x64, an edge map still
    fitted = np.asarray(result.images[1].convert("RGB"))
    assert fitted.shape == (64, 64, 3) and set(np.unique(fitted)) == {0, 255}
    at_size = webuiapi.ControlNetUnit(image=CONTROL, module="canny", model="cn-xl", processor_res=64)
    result = api.txt2img(prompt="a lighthouse", steps=3, width=64, height=64, seed=3,
                         sampler_name="Euler", controlnet_units=[at_size])
    # webuiapi's thresholds 64/64, the map detected at the generated size: answered as detected
    expected = cv2.Canny(np.asarray(CONTROL), 64, 64)
    assert (np.asarray(result.images[1].convert("L")) == expected).mean() > 0.999 and expected.any()
    detected = api.controlnet_detect([CONTROL], module="canny", processor_res=128, threshold_a=100,
                                     threshold_b=200)
    expected = cv2.Canny(cv2.resize(np.asarray(CONTROL), (128, 128), interpolation=cv2.INTER_CUBIC), 100, 200)
    got = np.asarray(detected.images[0].convert("L"))
    assert (got == expected).mean() > 0.999 and expected.any()


def _extension_resize(image: np.ndarray, res: int) -> np.ndarray:
    """sd-webui-controlnet's resize: the short side to res, cubic up, area down."""
    height, width = image.shape[:2]
    k = res / min(height, width)
    size = (int(np.round(width * k)), int(np.round(height * k)))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)


def _on_padded(image: np.ndarray, op) -> np.ndarray:  # noqa: ANN001
    """op on the picture edge-padded to multiples of 64, the padding cut off after."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, (-height) % 64), (0, (-width) % 64), (0, 0)), mode="edge")
    return op(padded)[:height, :width]


def _xdog(x: np.ndarray, a: float) -> np.ndarray:
    g1 = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    return np.where(2 * (255 - dog.astype(np.int32)) > a, 255, 0).astype(np.uint8)


def _lineart_standard(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    return (intensity * 127).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("module", "a", "expected"), [
    ("threshold", 120, lambda x, a: np.where(np.min(_extension_resize(x, 96), axis=2) > a, 255, 0)),
    ("scribble_xdog", 20, lambda x, a: _on_padded(_extension_resize(x, 96), lambda p: _xdog(p, a))),
    ("lineart_standard", -1, lambda x, a: _on_padded(_extension_resize(x, 96), _lineart_standard)),
    ("blur_gaussian", 3.0, lambda x, a: cv2.GaussianBlur(_extension_resize(x, 96), (0, 0), a)),
    ("invert", -1, lambda x, a: 255 - x),
    ("tile_resample", 2.5, lambda x, a: cv2.resize(x, (int(x.shape[1] / a), int(x.shape[0] / a)),
                                                    interpolation=cv2.INTER_AREA)),
    ("tile_resample", 1.05, lambda x, a: x),
    # the extension converts the RGB picture as if it were BGR
    ("recolor_luminance", 0.7, lambda x, a: (((cv2.cvtColor(x, cv2.COLOR_BGR2LAB)[:, :, 0] / 255.0) ** a)
                                             * 255).clip(0, 255).astype(np.uint8)),
    ("recolor_intensity", 1.6, lambda x, a: ((x.max(axis=2) / 255.0) ** a * 255).clip(0, 255)
                                            .astype(np.uint8)),
])
def test_detect_weight_free_modules_as_the_extension(http, module: str, a: float, expected) -> None:  # noqa: ANN001
    """/controlnet/detect on a 100x70 picture at processor_res 96 (not a multiple of 64, so the
    padding shows at the borders) against the extension's processing redone here: threshold on
    every channel, xdog and lineart_standard on the padded picture, the blur unpadded, invert,
    tile_resample and recolor at the picture's own size (no resolution)."""
    picture = np.asarray(noise(100, 70, seed=21).filter(ImageFilter.GaussianBlur(2)))
    answer = http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": module, "controlnet_input_images": [b64(Image.fromarray(picture))],
        "controlnet_processor_res": 96, "controlnet_threshold_a": a})
    assert answer.status_code == 200, answer.text
    got = arr(decoded(answer.json()["images"][0])).astype(np.int16)
    want = np.asarray(expected(picture, a))
    want = (np.stack([want] * 3, axis=2) if want.ndim == 2 else want).astype(np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()


def test_serverless_worker_body_with_legacy_fields(http) -> None:  # noqa: ANN001
    """No `enabled`, `input_image`, `lowvram`, `guidance`, a bare model stem, enums as strings."""
    legacy = {"input_image": b64(CONTROL), "module": "none", "model": "CN-XL", "lowvram": True,
              "guidance": 1.0, "resize_mode": "Just Resize", "control_mode": "Balanced", "weight": 0.7}
    got = txt2img(http, [legacy])
    modern = txt2img(http, [unit(weight=0.7, resize_mode=0, control_mode=0)])
    assert got["images"][0] == modern["images"][0]


def test_resize_modes_fit_the_map_as_stated() -> None:
    from app.engine.preprocessors import fit

    wide = noise(128, 64, seed=3)
    crop = fit(wide, 64, 64, 1)  # cover: 128x64 -> 128x64 (k=1), centre 64 columns
    assert (arr(crop) == arr(wide)[:, 32:96]).all()
    filled = arr(fit(wide, 64, 64, 2))  # inside: 64x32 in the middle, the border lines' median around
    shrunk = cv2.resize(np.asarray(wide), (64, 32), interpolation=cv2.INTER_AREA)
    pixels = np.asarray(wide)
    border = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    assert (filled[16:48] == shrunk).all()
    assert (filled[:16] == border.astype(np.uint8)).all() and (filled[48:] == border.astype(np.uint8)).all()
    stretched = arr(fit(wide, 64, 64, 0))
    assert (stretched == cv2.resize(np.asarray(wide), (64, 64), interpolation=cv2.INTER_AREA)).all()


@pytest.mark.parametrize(("fields", "where", "words"), [
    ({"model": "nope"}, "args[0].model", "cn-xl ["),
    ({"model": "cn_sd15"}, "args[0].model", "does not fit"),
    ({"module": "depth_zoe"}, "args[0].module", "canny"),
    ({"guidance_start": 0.7, "guidance_end": 0.3}, "args[0].guidance_start", "guidance_end"),
    ({"weight": 3}, "args[0].weight", "2"),
    ({"image": "bm90IGFuIGltYWdl"}, "args[0].image", ""),
    ({"control_mode": 7}, "args[0].control_mode", "Balanced"),
])
def test_bad_units_are_422_in_a1111s_shape(http, fields, where, words) -> None:  # noqa: ANN001
    body = txt2img(http, [unit(**fields)], status=422)
    assert set(body) >= {"error", "detail"}
    assert where in body["detail"] and words in body["detail"], body["detail"]


def test_more_units_than_the_setting_is_422(http) -> None:  # noqa: ANN001
    body = txt2img(http, [unit()] * 4, status=422)
    assert "args[3]" in body["detail"] and "at most 3" in body["detail"]


def test_a_unit_without_an_image_in_txt2img_is_422_and_img2img_uses_its_picture(http) -> None:  # noqa: ANN001
    body = txt2img(http, [unit(image="")], status=422)
    assert "args[0].image" in body["detail"]
    picture = noise(64, 64, seed=8)
    request = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 3,
               "sampler_name": "Euler", "init_images": [b64(picture)], "denoising_strength": 0.6}
    without = http.post("/sdapi/v1/img2img", headers=AUTH, json={
        **request, "alwayson_scripts": {"ControlNet": {"args": [unit(image="")]}}})
    assert without.status_code == 200, without.text
    explicit = http.post("/sdapi/v1/img2img", headers=AUTH, json={
        **request, "alwayson_scripts": {"ControlNet": {"args": [unit(image=b64(picture))]}}})
    assert without.json()["images"][0] == explicit.json()["images"][0]
    plain = http.post("/sdapi/v1/img2img", headers=AUTH, json=request)
    assert plain.json()["images"][0] != without.json()["images"][0]


def test_img2img_with_a_unit_is_diffusers_controlnet_img2img(http, nets) -> None:  # noqa: ANN001
    """A1111 img2img at strength 0.75 (6 of 8 steps) with a unit of weight 0.7 is diffusers'
    StableDiffusionXLControlNetImg2ImgPipeline called directly (its conditioning scale given:
    that pipeline's default is 0.8, not the 1.0 of its text-to-image sibling)."""
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    from app.engine import tiny
    from app.engine.schedulers import make_scheduler
    from app.samplers import resolve_sampler

    picture = noise(64, 64, seed=8)
    answer = http.post("/sdapi/v1/img2img", headers=AUTH, json={
        "prompt": "a lighthouse", "steps": 8, "seed": 11, "sampler_name": "Euler", "cfg_scale": 5,
        "width": 64, "height": 64, "init_images": [b64(picture)], "denoising_strength": 0.75,
        "alwayson_scripts": {"controlnet": {"args": [unit(weight=0.7, save_detected_map=False)]}}})
    assert answer.status_code == 200, answer.text
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(tiny.build_tiny_sdxl(),
                                                                controlnet=nets["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config, 11)
    expected = pipe("a lighthouse", image=picture, control_image=CONTROL, num_inference_steps=8,
                    strength=0.75, guidance_scale=5, controlnet_conditioning_scale=0.7,
                    generator=[torch.Generator("cpu").manual_seed(11)]).images[0]
    close(arr(decoded(answer.json()["images"][0])), arr(expected))


def test_detect_without_image_or_with_unknown_module_is_422(http) -> None:  # noqa: ANN001
    answer = http.post("/controlnet/detect", headers=AUTH, json={"controlnet_module": "canny"})
    assert answer.status_code == 422 and "controlnet_input_images" in answer.json()["detail"]
    answer = http.post("/controlnet/detect", headers=AUTH,
                       json={"controlnet_module": "depth_leres", "controlnet_input_images": [b64(CONTROL)]})
    assert answer.status_code == 422 and "depth_leres" in answer.json()["detail"]


def test_detect_takes_a_rate_limit_token(make_server, nets) -> None:  # noqa: ANN001
    """Detection is work (a preprocessor net may take seconds): it counts against the key's
    rate limit as the generation routes do; the listings do not."""
    server = make_server(controlnet_models(nets["folder"]), api_keys=[API_KEY, "limited-key 1/3600s"])
    with server.client(headers={"Authorization": "Bearer limited-key"}) as limited:
        body = {"controlnet_module": "canny", "controlnet_input_images": [b64(CONTROL)],
                "controlnet_processor_res": 64}
        assert limited.post("/controlnet/detect", json=body).status_code == 200
        answer = limited.post("/controlnet/detect", json=body)
        assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 0, answer.text
        assert limited.get("/controlnet/module_list").status_code == 200
