"""ControlNet units in A1111's hires fix (`hr_option`) and with SDXL's refiner (issue 21), on a
tiny random SDXL ControlNet through the real HTTP stack. The expected pictures come from
diffusers called directly: StableDiffusionXLControlNetPipeline (or the plain text-to-image
pipeline) for the first pass, PIL's Lanczos (or torch's bilinear latent upscale) in between,
StableDiffusionXLControlNetImg2ImgPipeline (or the plain image-to-image one) for the second
pass; the refiner's image-to-image pipeline with `denoising_start` after the switch. Control
maps are fitted by OpenCV here, as the extension's "Crop and Resize" states."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import API_KEY
from tests.controlnet_files import save_file, save_folder, tiny_controlnet
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "a lighthouse"
SEED = 11
# 96x64: "Crop and Resize" cuts its centre, so each pass's map shows which size it was fitted to
CONTROL = noise(96, 64, seed=5)
PICTURE = noise(64, 64, seed=3)


# ---- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net():  # noqa: ANN201
    return tiny_controlnet("sdxl")


@pytest.fixture(scope="module")
def sd_net():  # noqa: ANN201
    return tiny_controlnet("sd15", seed=2)


@pytest.fixture(scope="module")
def server(make_server, net, sd_net, refiner_folder, tmp_path_factory):  # noqa: ANN001, ANN201
    folder = tmp_path_factory.mktemp("controlnets")
    save_folder(net, folder / "cn-xl")
    save_file(sd_net, folder / "cn_sd15.safetensors")
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
  tiny-refiner: {{source: "{refiner_folder}", preload: true}}
  tiny-sd15: {{source: "builtin:tiny-sd15"}}
controlnet_dirs: ["{folder}"]
""")


@pytest.fixture()
def http(server):  # noqa: ANN001, ANN201
    with server.client() as c:
        yield c


def unit(**fields) -> dict:
    return {"enabled": True, "module": "none", "model": "cn-xl", "image": b64(CONTROL),
            "resize_mode": "Crop and Resize", "save_detected_map": False, **fields}


HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos", "denoising_strength": 0.5,
         "hr_second_pass_steps": 6}


def txt2img(http, units: list, status: int = 200, route: str = "txt2img", **fields) -> dict:  # noqa: ANN001
    body = {"prompt": PROMPT, "steps": 5, "width": 64, "height": 64, "seed": SEED, "sampler_name": "Euler",
            "cfg_scale": 5, "alwayson_scripts": {"controlnet": {"args": units}}, **fields}
    answer = http.post(f"/sdapi/v1/{route}", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    return answer.json()


def image_of(answer: dict, index: int = 0) -> np.ndarray:
    return arr(decoded(answer["images"][index]))


# ---- diffusers called directly ------------------------------------------------------------------
def crop_and_resize(picture: Image.Image, width: int, height: int) -> Image.Image:
    """The extension's "Crop and Resize": cover the target keeping the aspect (cubic to
    enlarge, area to shrink), cut the centre."""
    source = np.asarray(picture.convert("RGB"))
    h, w = source.shape[:2]
    k = max(width / w, height / h)
    new_w, new_h = int(round(w * k)), int(round(h * k))
    if (new_w, new_h) != (w, h):
        shrink = new_w * new_h < w * h
        method = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        source = cv2.resize(source, (new_w, new_h), interpolation=method)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return Image.fromarray(np.ascontiguousarray(source[top:top + height, left:left + width]))


def euler(pipe):  # noqa: ANN001, ANN201
    from app.engine.schedulers import make_scheduler
    from app.samplers import resolve_sampler

    pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed: int = SEED) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed)]


class Pipes:
    """The tiny SDXL's four pipelines on one set of weights, as diffusers makes them."""

    def __init__(self, controlnet) -> None:  # noqa: ANN001
        from diffusers import (
            StableDiffusionXLControlNetImg2ImgPipeline,
            StableDiffusionXLControlNetPipeline,
            StableDiffusionXLImg2ImgPipeline,
        )

        from app.engine.tiny import build_tiny_sdxl

        base = build_tiny_sdxl()
        self.txt2img = euler(base)
        self.img2img = euler(StableDiffusionXLImg2ImgPipeline.from_pipe(base))
        self.cn_txt2img = euler(StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=controlnet))
        self.cn_img2img = euler(StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(base,
                                                                                   controlnet=controlnet))

    def first(self, control: Image.Image | None, *, steps: int = 5, output_type: str = "pil",
              seed: int = SEED, **kwargs):  # noqa: ANN003, ANN201
        common = {"num_inference_steps": steps, "guidance_scale": 5, "width": 64, "height": 64,
                  "generator": generators(seed), "output_type": output_type, **kwargs}
        if control is None:
            return self.txt2img(PROMPT, **common).images
        return self.cn_txt2img(PROMPT, image=control, **common).images

    def second(self, image, control: Image.Image | None, *, strength: float = 0.5, steps: int = 6,  # noqa: ANN001, ANN201
               seed: int = SEED, **kwargs):  # noqa: ANN003
        common = {"image": image, "strength": strength, "num_inference_steps": steps, "guidance_scale": 5,
                  "generator": generators(seed), **kwargs}
        if control is None:
            return self.img2img(PROMPT, **common).images
        return self.cn_img2img(PROMPT, control_image=control, **common).images


@pytest.fixture(scope="module")
def pipes(net) -> Pipes:  # noqa: ANN001
    return Pipes(net)


def refiner_pipe(folder: Path):  # noqa: ANN201
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return euler(StableDiffusionXLImg2ImgPipeline.from_pretrained(folder))


def close(got: np.ndarray, expected: np.ndarray) -> None:
    difference = np.abs(got - expected)
    # the server's CPU forwards are batch-invariant (app.engine.determinism), diffusers' are not
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def differs(got: np.ndarray, other: np.ndarray) -> None:
    assert got.shape == other.shape and np.abs(got - other).mean() > 1


LOW, HIGH = crop_and_resize(CONTROL, 64, 64), crop_and_resize(CONTROL, 128, 128)
# Window 0 to 0.4. First pass, 5 steps: the extension runs the unit at i/5 <= 0.4 (i = 0, 1, 2),
# diffusers while (i+1)/5 <= end: end 0.6. Second pass, int(6 x 0.5) = 3 steps of its own:
# i/3 <= 0.4 (i = 0, 1), diffusers' end 0.7. (Counted over the first pass's 5, the second pass
# would run it at all three.)
WINDOW = {"weight": 0.8, "guidance_end": 0.4}
FIRST_WINDOW = {"controlnet_conditioning_scale": 0.8, "control_guidance_end": 0.6}
SECOND_WINDOW = {"controlnet_conditioning_scale": 0.8, "control_guidance_end": 0.7}


# ---- the hires fix ------------------------------------------------------------------------------
def test_both_guides_each_pass_with_its_map_fitted_to_that_pass(http, pipes) -> None:  # noqa: ANN001
    got = txt2img(http, [unit(**WINDOW)], **HIRES)
    first = pipes.first(LOW, **FIRST_WINDOW)[0]
    expected = pipes.second(first.resize((128, 128), Image.LANCZOS), HIGH, **SECOND_WINDOW)[0]
    assert decoded(got["images"][0]).size == (128, 128)
    close(image_of(got), arr(expected))
    assert len(got["images"]) == 1  # save_detected_map false


def test_the_default_hr_option_is_both(http) -> None:  # noqa: ANN001
    both = txt2img(http, [unit(hr_option="Both", **WINDOW)], **HIRES)
    default = txt2img(http, [unit(**WINDOW)], **HIRES)
    assert both["images"][0] == default["images"][0]
    as_index = txt2img(http, [unit(hr_option=2, **WINDOW)], **HIRES)
    high = txt2img(http, [unit(hr_option="high res only", **WINDOW)], **HIRES)
    assert as_index["images"][0] == high["images"][0] != both["images"][0]


def test_low_res_only_leaves_the_second_pass_plain_image_to_image(http, pipes) -> None:  # noqa: ANN001
    got = txt2img(http, [unit(hr_option="Low res only", **WINDOW)], **HIRES)
    first = pipes.first(LOW, **FIRST_WINDOW)[0]
    expected = pipes.second(first.resize((128, 128), Image.LANCZOS), None)[0]
    close(image_of(got), arr(expected))


def test_high_res_only_starts_from_plain_text_to_image(http, pipes) -> None:  # noqa: ANN001
    got = txt2img(http, [unit(hr_option="High res only", **WINDOW)], **HIRES)
    first = pipes.first(None)[0]
    expected = pipes.second(first.resize((128, 128), Image.LANCZOS), HIGH, **SECOND_WINDOW)[0]
    close(image_of(got), arr(expected))
    plain = txt2img(http, [], **HIRES)
    differs(image_of(got), image_of(plain))


def test_a_latent_upscale_hands_the_controlnet_img2img_pipeline_latents(http, pipes) -> None:  # noqa: ANN001
    """A1111's "Latent" (bilinear, no antialias) to 16x16 latents, which the ControlNet
    image-to-image pipeline takes as its `image`."""
    got = txt2img(http, [unit(weight=0.8)], **{**HIRES, "hr_upscaler": "Latent"})
    latents = pipes.first(LOW, output_type="latent", controlnet_conditioning_scale=0.8)
    upscaled = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear", antialias=False)
    expected = pipes.second(upscaled, HIGH, controlnet_conditioning_scale=0.8)[0]
    close(image_of(got), arr(expected))


def test_two_units_each_guide_the_passes_their_option_names(http, pipes) -> None:  # noqa: ANN001
    """Unit 0 guides the first pass only, unit 1 the second only: each pass runs one net."""
    other = noise(64, 96, seed=9)
    got = txt2img(http, [unit(hr_option="Low res only", weight=0.6),
                         unit(hr_option="High res only", weight=1.2, image=b64(other))], **HIRES)
    first = pipes.first(LOW, controlnet_conditioning_scale=0.6)[0]
    expected = pipes.second(first.resize((128, 128), Image.LANCZOS), crop_and_resize(other, 128, 128),
                            controlnet_conditioning_scale=1.2)[0]
    close(image_of(got), arr(expected))


def test_sd15_latent_hires_with_both(http, sd_net) -> None:  # noqa: ANN001
    """SD 1.5's ControlNet pipelines, the latent upscale between them."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    from app.engine.tiny import build_tiny_sd15

    got = txt2img(http, [unit(model="cn_sd15", weight=0.7)], **{**HIRES, "hr_upscaler": "Latent"},
                  override_settings={"sd_model_checkpoint": "tiny-sd15"})
    base = build_tiny_sd15()
    first = euler(StableDiffusionControlNetPipeline.from_pipe(base, controlnet=sd_net))
    second = euler(StableDiffusionControlNetImg2ImgPipeline.from_pipe(base, controlnet=sd_net))
    latents = first(PROMPT, image=LOW, num_inference_steps=5, guidance_scale=5, width=64, height=64,
                    generator=generators(), output_type="latent", controlnet_conditioning_scale=0.7).images
    upscaled = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear", antialias=False)
    expected = second(PROMPT, image=upscaled, control_image=HIGH, strength=0.5, num_inference_steps=6,
                      guidance_scale=5, generator=generators(), controlnet_conditioning_scale=0.7).images[0]
    close(image_of(got), arr(expected))


class SoftNet(torch.nn.Module):
    """A ControlNet whose residual k is scaled by 0.825^(12-k), as the extension's soft
    injection (SDXL: the first 10 of SD's 13 factors)."""

    def __init__(self, net) -> None:  # noqa: ANN001
        super().__init__()
        self.net = net

    def __getattr__(self, name: str):  # noqa: ANN204 - config, dtype, ... of the net
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        down, mid = self.net(*args, **kwargs)
        factors = [0.825 ** float(12 - k) for k in range(13)][:len(down) + 1]
        return [d * f for d, f in zip(down, factors, strict=False)], mid * factors[len(down)]


def test_canny_in_the_hires_pass_gets_the_extensions_soft_weights(http, net) -> None:  # noqa: ANN001
    """The extension forces soft injection on canny maps in the hires pass: a Balanced unit runs
    there as "My prompt is more important". The map is detected once (canny at processor_res
    128: the short side cubic-resized to 128, OpenCV's Canny 100/200), at the second pass's
    size already (fitting an edge map to another size: tests/test_control_fit.py)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    square = noise(64, 64, seed=5)
    got = txt2img(http, [unit(module="canny", image=b64(square), hr_option="High res only",
                              processor_res=128)], **HIRES)
    edges = cv2.Canny(cv2.resize(np.asarray(square), (128, 128), interpolation=cv2.INTER_CUBIC), 100, 200)
    hires_map = Image.fromarray(np.stack([edges] * 3, axis=2))
    soft = Pipes(net)
    # diffusers calls the net with conditioning_scale (1.0 here) and reads its config: a wrapper
    # in a ControlNetModel's place
    wrapper = SoftNet(net)
    wrapper.__class__ = type("SoftControlNet", (SoftNet, ControlNetModel), {})
    soft.cn_img2img = euler(StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(soft.txt2img,
                                                                               controlnet=wrapper))
    first = soft.first(None)[0]
    expected = soft.second(first.resize((128, 128), Image.LANCZOS), hires_map,
                           controlnet_conditioning_scale=1.0)[0]  # (its default: 0.8)
    close(image_of(got), arr(expected))


def test_a_batch_with_the_hires_fix_and_units_keeps_each_seeds_bytes(http) -> None:  # noqa: ANN001
    units = [unit(**WINDOW)]
    batch = txt2img(http, units, batch_size=2, **HIRES)
    assert json.loads(batch["info"])["all_seeds"] == [SEED, SEED + 1]
    alone = [txt2img(http, units, seed=seed, **HIRES)["images"][0] for seed in (SEED, SEED + 1)]
    assert batch["images"] == alone


def test_hr_option_is_part_of_the_batch_key_only_with_the_hires_fix(server) -> None:  # noqa: ANN001
    from app.api.generation import HiresRequest, ImageRequest, UnitRequest, to_params

    app = server.app
    registry, settings = app.state.registry, app.state.settings

    def key(option: str, hires: bool) -> tuple:
        request = ImageRequest(model="tiny-sdxl", prompt=PROMPT, steps=5, width=64, height=64, seed=1,
                               controlnet=(UnitRequest(model="cn-xl", image=CONTROL, hr_option=option),),
                               hires=HiresRequest(upscaler="Lanczos") if hires else None)
        return to_params(request, registry, settings).batch_key()

    options = ("Both", "Low res only", "High res only")
    assert len({key(option, True) for option in options}) == 3
    assert len({key(option, False) for option in options}) == 1  # one pass: every unit guides it


def test_a_bad_hr_option_is_422_naming_it(http) -> None:  # noqa: ANN001
    body = txt2img(http, [unit(hr_option="Sometimes")], status=422, **HIRES)
    assert "args[0].hr_option" in body["detail"] and "Low res only" in body["detail"], body["detail"]


def test_the_job_api_takes_units_in_the_hires_fix_as_a1111(http) -> None:  # noqa: ANN001
    from tests.test_jobs import read_events

    a1111 = txt2img(http, [unit(hr_option="High res only", weight=0.8)],
                    **{**HIRES, "hr_second_pass_steps": 0})
    answer = http.post("/jobs", headers=AUTH, json={
        "model": "tiny-sdxl", "prompt": PROMPT, "width": 64, "height": 64, "steps": 5, "seed": SEED,
        "sampler": "Euler", "cfg_scale": 5, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos",
        "denoising_strength": 0.5,
        "controlnet": [{"model": "cn-xl", "image": "data:image/png;base64," + b64(CONTROL), "weight": 0.8,
                        "resize_mode": 1, "hr_option": "High res only"}]})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    events = read_events(http, job_id)
    assert events[-1][1] == "done", events[-1]
    picture = http.get(f"/jobs/{job_id}/image", headers=AUTH)
    assert picture.status_code == 200, picture.text
    assert arr(Image.open(io.BytesIO(picture.content))).tolist() == image_of(a1111).tolist()


# ---- the refiner --------------------------------------------------------------------------------
def test_units_guide_the_base_part_before_the_refiner(http, pipes, refiner_folder) -> None:  # noqa: ANN001
    """6 Euler steps, switch 0.6 (cut at 400): the base runs 999, 799.2, 599.4 with the unit,
    the refiner the rest without it. Window from 0.2, over the whole pass as the extension
    counts: the unit runs at i/6 >= 0.2 (from i = 2); diffusers keeps i/6 >= start alike."""
    got = txt2img(http, [unit(weight=0.8, guidance_start=0.2)], steps=6,
                  refiner_checkpoint="tiny-refiner", refiner_switch_at=0.6)
    latents = pipes.first(LOW, steps=6, output_type="latent", denoising_end=0.6,
                          controlnet_conditioning_scale=0.8, control_guidance_start=0.2)
    expected = refiner_pipe(refiner_folder)(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                                            denoising_start=0.6, generator=generators()).images[0]
    close(image_of(got), arr(expected))
    assert "Refiner: tiny-refiner" in got["info"] and "ControlNet 0" in got["info"]
    without = txt2img(http, [], steps=6, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.6)
    differs(image_of(got), image_of(without))


def _latents_after(pipe, steps_run: int, **kwargs) -> torch.Tensor:  # noqa: ANN001
    """The latents a pipeline holds after its first `steps_run` steps (its step callback)."""
    kept: list[torch.Tensor] = []

    def keep(pipeline, step, timestep, callback_kwargs):  # noqa: ANN001, ANN202
        if step + 1 == steps_run:
            kept.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    pipe(PROMPT, callback_on_step_end=keep, output_type="latent", **kwargs)
    return kept[0]


def test_img2img_units_guide_the_base_steps_before_the_switch(http, pipes, refiner_folder) -> None:  # noqa: ANN001
    """strength 0.7 of 6: timesteps 599.4, 399.6, 199.8, 0; switch 0.7 cuts at 300: the base
    runs two with the unit (diffusers' ControlNet img2img pipeline has no denoising_end: its
    latents after two steps), the refiner two from there."""
    got = txt2img(http, [unit(weight=0.8)], route="img2img", steps=6, init_images=[b64(PICTURE)],
                  denoising_strength=0.7, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.7)
    latents = _latents_after(pipes.cn_img2img, 2, image=PICTURE, control_image=LOW, strength=0.7,
                             num_inference_steps=6, guidance_scale=5, generator=generators(),
                             controlnet_conditioning_scale=0.8)
    expected = refiner_pipe(refiner_folder)(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                                            denoising_start=0.7, generator=generators()).images[0]
    close(image_of(got), arr(expected))


def test_hires_with_a_refiner_units_guide_the_base_part_of_each_pass(http, pipes, refiner_folder) -> None:  # noqa: ANN001
    """The refiner refines the second pass (strength 0.6 of 6: 399.6, 199.8, 0; switch 0.8 cuts
    at 200): the first pass is the base's with the unit, the second's first step the base's
    with the unit's hires map, the last two the refiner's."""
    got = txt2img(http, [unit(weight=0.8)], steps=6, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                  denoising_strength=0.6, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.8)
    first = pipes.first(LOW, steps=6, controlnet_conditioning_scale=0.8)[0]
    latents = _latents_after(pipes.cn_img2img, 1, image=first.resize((128, 128), Image.LANCZOS),
                             control_image=HIGH, strength=0.6, num_inference_steps=6, guidance_scale=5,
                             generator=generators(), controlnet_conditioning_scale=0.8)
    expected = refiner_pipe(refiner_folder)(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                                            denoising_start=0.8, generator=generators()).images[0]
    close(image_of(got), arr(expected))


def test_a_refined_batch_with_units_keeps_each_seeds_bytes(http) -> None:  # noqa: ANN001
    fields = {"refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.6, "steps": 6}
    batch = txt2img(http, [unit()], batch_size=2, **fields)
    alone = [txt2img(http, [unit()], seed=seed, **fields)["images"][0] for seed in (SEED, SEED + 1)]
    assert batch["images"] == alone


def test_generation_params_carry_the_hires_maps_for_the_units_that_use_them(server) -> None:  # noqa: ANN001
    """Units for the first pass only get no hires map; the others get theirs at the second
    pass's size (each side of the hires size rounded up to 8)."""
    import asyncio

    from app.api.generation import HiresRequest, ImageRequest, UnitRequest, prepare_controls, to_params

    app = server.app
    request = ImageRequest(model="tiny-sdxl", prompt=PROMPT, steps=5, width=64, height=64, seed=1,
                           hires=HiresRequest(scale=1.5, upscaler="Lanczos"),
                           controlnet=(UnitRequest(model="cn-xl", image=CONTROL, hr_option="Low res only"),
                                       UnitRequest(model="cn-xl", image=CONTROL, resize_mode=0)))
    params = to_params(request, app.state.registry, app.state.settings)
    controls, _ = asyncio.run(prepare_controls(request, params))
    images = controls[0]
    assert images.hires[0] is None
    assert images.hires[1].size == (96, 96)
    just_resized = cv2.resize(np.asarray(CONTROL), (96, 96), interpolation=cv2.INTER_CUBIC)
    assert (arr(images.hires[1]) == just_resized).all()
    assert replace(params, control_images=None).batch_key() == params.batch_key()
