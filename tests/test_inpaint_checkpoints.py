"""Dedicated inpainting checkpoints (9-channel UNet: latents, mask, masked picture's latents) serve
as models of their own, SDXL and SD 1.x, as original-layout single files and as diffusers folders.

The tiny inpainting models are the builtin tiny ones' UNet configs with `in_channels=9`. The
single files are pointed at the 4-channel (text-to-image) config folders, as the bundled configs
are: the file's own channel count must win. Expected values come from elsewhere: diffusers'
inpainting pipeline called directly on the same weights, the input picture itself, the file's
tensors read with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from app.checkpoints import CheckpointError, inspect_checkpoint
from app.engine.lora_fit import architecture_of, match_loras
from app.engine.single_file import load_single_file
from app.registry import RegistryError, load_registry
from tests.conftest import API_KEY, write_models_file
from tests.original_layout import save_safetensors, write_checkpoint, write_config_folder
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAMILIES = ("sdxl", "sd15")
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


# --------------------------------------------------------------------------- tiny models


def tiny_inpainting(family: str):
    """The builtin tiny model of `family` with a 9-channel UNet (its config, in_channels=9,
    fresh random weights) in diffusers' inpainting pipeline."""
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )

    from app.engine import tiny

    base = tiny.build_tiny_sdxl() if family == "sdxl" else tiny.build_tiny_sd15()
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    parts = {**base.components, "unet": unet}
    if family == "sdxl":
        return StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False)
    parts.update(safety_checker=None, feature_extractor=None)
    return StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per family: the inpainting pipeline, its single file, its diffusers folder, and the
    text-to-image config folder the single file is pointed at."""
    from app.engine import tiny

    root = tmp_path_factory.mktemp("inpaint")
    out: dict = {"root": root}
    for family in FAMILIES:
        pipe = tiny_inpainting(family)
        pipe.set_progress_bar_config(disable=True)
        plain = tiny.build_tiny_sdxl() if family == "sdxl" else tiny.build_tiny_sd15()
        folder = root / f"{family}-folder"
        pipe.save_pretrained(folder)
        out[family] = {
            "pipe": pipe,
            "scheduler_config": dict(pipe.scheduler.config),
            "file": write_checkpoint(pipe, family, root / f"inpaint-{family}.safetensors"),
            "folder": folder,
            "config": write_config_folder(plain, root / f"{family}-t2i-config"),
        }
    return out


def models_yaml(made: dict) -> str:
    lines = ["models:"]
    for family in FAMILIES:
        lines += [f"  file-{family}:", f"    source: {made[family]['file']}",
                  f"    config: {made[family]['config']}",
                  f"  folder-{family}:", f"    source: {made[family]['folder']}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def served(made: dict, make_server):  # noqa: ANN201
    # cpu_exact_batches off: the networks run as diffusers runs them, so its pipeline called
    # directly is the expected value to the last bit
    return make_server(models_yaml(made), allow_downloads=False, cpu_exact_batches=False,
                       max_models_per_device=4)


# --------------------------------------------------------------------------- helpers




def post(served, route: str, model: str, **fields) -> dict:  # noqa: ANN001
    body = {"prompt": "a lighthouse at dusk", "steps": 6, "width": 64, "height": 64, "seed": 21,
            "sampler_name": "Euler", "cfg_scale": 5,
            "override_settings": {"sd_model_checkpoint": model}, **fields}
    with served.client() as c:
        answer = c.post(route, json=body, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


MODELS = [f"{kind}-{family}" for family in FAMILIES for kind in ("file", "folder")]


# --------------------------------------------------------------------------- reading the file


@pytest.mark.parametrize("family", FAMILIES)
def test_a_9_channel_file_is_an_inpainting_model_of_its_family(made: dict, family: str) -> None:
    info = inspect_checkpoint(made[family]["file"])
    assert (info.family, info.in_channels) == (family, 9)
    registry = load_registry(write_models_file(made["root"], models_yaml(made)))
    assert registry.models[f"file-{family}"].in_channels == 9
    assert registry.models[f"folder-{family}"].family == family


def test_an_8_channel_file_is_still_refused_naming_it(made: dict, tmp_path: Path) -> None:
    """instruct-pix2pix / depth UNets take 8 channels: not served, and the message says what
    the file is and what is served."""
    with safe_open(str(made["sd15"]["file"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    tensors[CONV_IN] = tensors[CONV_IN][:, :8].contiguous()
    path = tmp_path / "pix2pix.safetensors"
    save_safetensors(tensors, path)
    with pytest.raises(CheckpointError, match=r"pix2pix.safetensors is an instruct-pix2pix / depth "
                                              r"checkpoint: its UNet takes 8 input channels"):
        inspect_checkpoint(path)
    with pytest.raises(RegistryError, match=r"models\.p\.source: cannot be served: .*8 input channels"):
        load_registry(write_models_file(tmp_path, f"models:\n  p: {{source: {path}}}\n"))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loader_builds_the_inpainting_pipeline_with_the_files_weights(made: dict, family: str) -> None:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    spec = load_registry(write_models_file(made["root"], models_yaml(made))).models[f"file-{family}"]
    pipe = load_single_file(spec, torch.float32)
    want = StableDiffusionXLInpaintPipeline if family == "sdxl" else StableDiffusionInpaintPipeline
    assert type(pipe) is want
    assert pipe.unet.config.in_channels == 9
    original = made[family]["pipe"].unet.state_dict()
    loaded = pipe.unet.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    if family == "sd15":
        assert pipe.safety_checker is None


def test_a_lora_on_conv_in_fits_the_inpainting_unet_only(made: dict, tmp_path: Path) -> None:
    """LoRA fit is settled by real layer shapes: a conv_in LoRA made for 9 input channels fits
    the inpainting single file (whose config folder says 4) and not the plain tiny model."""
    state = {"unet.conv_in.lora_A.weight": torch.zeros(4, 9, 3, 3),
             "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    path = tmp_path / "conv-in.safetensors"
    save_file(state, str(path))
    text = (f"models:\n  inpaint: {{source: {made['sdxl']['file']}, config: {made['sdxl']['config']}}}\n"
            f"  plain: {{source: builtin:tiny-sdxl}}\nloras:\n  conv: {{path: {path}}}\n")
    registry = load_registry(write_models_file(tmp_path, text))
    arch = architecture_of(registry.models["inpaint"])
    assert arch is not None and arch.layers["unet"]["conv_in"] == (32, 9, 3, 3)
    match_loras(registry)
    fits = registry.loras["conv"].fits
    assert fits["inpaint"] is None
    assert fits["plain"] and "conv_in" in fits["plain"] and "[32, 4, 3, 3]" in fits["plain"]


def test_the_served_class_follows_the_unet_not_the_saved_class(made: dict, tmp_path: Path) -> None:
    """A folder saved from another pipeline class serves by what its UNet takes: a 4-channel
    model saved as an inpainting pipeline loads as text to image, a 9-channel one saved as a
    text-to-image pipeline inpaints; the same modules either way (no copy)."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    from app.engine import tiny
    from app.engine.img2img import base_pipeline
    from app.engine.pipelines import load_model

    StableDiffusionXLInpaintPipeline(**tiny.build_tiny_sdxl().components).save_pretrained(tmp_path / "m")
    spec = load_registry(write_models_file(tmp_path, f"models:\n  m: {{source: {tmp_path / 'm'}}}\n"))
    loaded = load_model(spec.models["m"], torch.device("cpu"), allow_downloads=False, lora_cache_size=1)
    assert type(loaded.pipe) is StableDiffusionXLPipeline and loaded.family == "sdxl"
    inpainting = made["sdxl"]["pipe"]
    odd = StableDiffusionXLPipeline(**inpainting.components)
    served = base_pipeline(odd, "sdxl")
    assert type(served) is StableDiffusionXLInpaintPipeline and served.unet is inpainting.unet
    assert base_pipeline(inpainting, "sdxl") is inpainting


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.parametrize("model", MODELS)
def test_txt2img_is_the_inpainting_pipeline_on_a_fully_masked_blank(made: dict, served, model: str) -> None:  # noqa: ANN001
    """A1111's txt2img on an inpainting model: diffusers' inpainting pipeline with the whole
    picture masked, at full strength, on the same weights, scheduler and seed."""
    from app.engine.schedulers import make_scheduler
    from app.samplers import resolve_sampler

    got = decoded(post(served, "/sdapi/v1/txt2img", model)["images"][0])
    assert got.size == (64, 64)
    case = made[model.split("-")[1]]
    pipe = case["pipe"]
    pipe.scheduler = make_scheduler(resolve_sampler("Euler"), case["scheduler_config"], 21)
    expected = pipe("a lighthouse at dusk", image=Image.new("RGB", (64, 64), (0, 0, 0)),
                    mask_image=Image.new("L", (64, 64), 255), strength=1.0, num_inference_steps=6,
                    guidance_scale=5, width=64, height=64,
                    generator=[torch.Generator("cpu").manual_seed(21)]).images[0]
    assert np.array_equal(arr(got), arr(expected))


@pytest.mark.parametrize("model", MODELS)
def test_img2img_with_a_mask_keeps_every_pixel_outside_the_blurred_mask(served, model: str) -> None:  # noqa: ANN001
    picture = noise(64, 64, seed=3)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    answer = post(served, "/sdapi/v1/img2img", model, init_images=[b64(picture)], mask=b64(mask),
                  inpaint_full_res=False, inpainting_fill=1, denoising_strength=0.9)
    got = arr(decoded(answer["images"][0]))
    assert got.shape == (64, 64, 3)
    outside = np.ones((64, 64), bool)
    outside[14:50, 14:50] = False  # the box grown by the default blur's reach (mask_blur 4: 10 px)
    assert np.array_equal(got[outside], arr(picture)[outside])
    assert np.abs(got[28:36, 28:36] - arr(picture)[28:36, 28:36]).mean() > 5
    assert json.loads(answer["info"])["sd_model_name"] == model


@pytest.mark.parametrize("model", MODELS)
def test_the_served_weights_are_the_files(made: dict, served, model: str) -> None:  # noqa: ANN001
    """The loaded UNet's conv_in (9 input channels) holds exactly the file's tensor."""
    post(served, "/sdapi/v1/txt2img", model, steps=1)  # loaded
    loaded = next(w.models[model] for w in served.app.state.engine.workers if model in w.models)
    weight = loaded.pipe.unet.conv_in.weight.detach().cpu()
    kind, family = model.split("-")
    if kind == "file":
        path, key = made[family]["file"], CONV_IN
    else:
        path, key = made[family]["folder"] / "unet" / "diffusion_pytorch_model.safetensors", "conv_in.weight"
    with safe_open(str(path), "pt") as f:
        stored = f.get_tensor(key)
    assert stored.shape[1] == 9
    assert torch.equal(weight, stored)


@pytest.mark.parametrize(("model", "upscaler"), [("file-sdxl", "Latent"), ("folder-sd15", "Lanczos")])
def test_the_hires_fix_runs_on_an_inpainting_model(served, model: str, upscaler: str) -> None:  # noqa: ANN001
    """Both passes go through the inpainting pipeline (the second one fully masked, from the
    upscaled first pass), latent or pixel upscale."""
    answer = post(served, "/sdapi/v1/txt2img", model, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler,
                  hr_second_pass_steps=3, denoising_strength=0.5)
    assert decoded(answer["images"][0]).size == (96, 96)
    assert f"Hires upscaler: {upscaler}" in json.loads(answer["info"])["infotexts"][0]
