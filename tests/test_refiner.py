"""SDXL's refiner (issue 21): A1111's refiner_checkpoint / refiner_switch_at, and the OpenAI and
job API extensions, on two tiny SDXL models through the real HTTP stack. The expected pictures
come from diffusers called directly: the base pipeline with `denoising_end`, the refiner's
image-to-image pipeline with `denoising_start` (or alone, where the refiner runs the whole
pass), on the same weights loaded by diffusers itself."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import API_KEY
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "a lighthouse"
SEED = 11




PICTURE = noise(64, 64, seed=3)


@pytest.fixture(scope="module")
def server(make_server, refiner_folder):  # noqa: ANN001, ANN201
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
  tiny-refiner: {{source: "{refiner_folder}", preload: true}}
  tiny-sd15: {{source: "builtin:tiny-sd15"}}
""", preview_every=1)


@pytest.fixture()
def http(server):  # noqa: ANN001, ANN201
    with server.client() as c:
        yield c


def txt2img(http, status: int = 200, route: str = "txt2img", **fields) -> dict:  # noqa: ANN001
    body = {"prompt": PROMPT, "steps": 6, "width": 64, "height": 64, "seed": SEED, "sampler_name": "Euler",
            "cfg_scale": 5, **fields}
    answer = http.post(f"/sdapi/v1/{route}", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    return answer.json()


def img2img(http, status: int = 200, **fields) -> dict:  # noqa: ANN001
    return txt2img(http, status, route="img2img", init_images=[b64(PICTURE)], **fields)


# ---- diffusers called directly ------------------------------------------------------------------
def _euler(pipe):  # noqa: ANN001, ANN202
    """A1111's Euler as the sampler table builds it (diffusers' EulerDiscreteScheduler, linspace
    timesteps: 999, 799.2, 599.4, 399.6, 199.8, 0 for 6 steps)."""
    from app.engine.schedulers import make_scheduler
    from app.samplers import resolve_sampler

    pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def base_pipes() -> tuple:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from app.engine.tiny import build_tiny_sdxl

    base = build_tiny_sdxl()
    return _euler(base), _euler(StableDiffusionXLImg2ImgPipeline.from_pipe(base))


def refiner_pipe(folder: Path):  # noqa: ANN201
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _euler(StableDiffusionXLImg2ImgPipeline.from_pretrained(folder))


def direct_txt2img(folder: Path, switch: float, seed: int = SEED, steps: int = 6) -> np.ndarray:
    base, _ = base_pipes()
    latents = base(PROMPT, num_inference_steps=steps, guidance_scale=5, width=64, height=64,
                   generator=_generators([seed]), denoising_end=switch, output_type="latent").images
    out = refiner_pipe(folder)(PROMPT, image=latents, num_inference_steps=steps, guidance_scale=5,
                               denoising_start=switch, generator=_generators([seed])).images[0]
    return arr(out)


def close(got: np.ndarray, expected: np.ndarray) -> None:
    difference = np.abs(got - expected)
    # the server's CPU forwards are batch-invariant (app.engine.determinism), diffusers' are not
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def differs(got: np.ndarray, other: np.ndarray) -> None:
    assert np.abs(got - other).mean() > 1


# ---- A1111 --------------------------------------------------------------------------------------
def test_txt2img_hands_the_base_latents_to_the_refiner_at_the_switch(http, refiner_folder) -> None:  # noqa: ANN001
    """6 Euler steps: timesteps 999 ... 0 by 199.8; switch 0.6 cuts at 400, so the base runs
    three and the refiner (its UNet, its second text encoder, its VAE) three."""
    got = txt2img(http, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.6)
    image = arr(decoded(got["images"][0]))
    close(image, direct_txt2img(refiner_folder, 0.6))
    plain = arr(decoded(txt2img(http)["images"][0]))
    differs(image, plain)
    info = json.loads(got["info"])
    assert "Refiner: tiny-refiner, Refiner switch at: 0.6" in info["infotexts"][0]
    assert got["parameters"]["refiner_checkpoint"] == "tiny-refiner"
    assert got["parameters"]["refiner_switch_at"] == 0.6
    assert "refiner_checkpoint" not in info["craftserve_not_applied"]


def test_a_title_names_the_refiner_and_none_is_no_refiner(http) -> None:  # noqa: ANN001
    by_name = txt2img(http, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.6)["images"][0]
    by_title = txt2img(http, refiner_checkpoint="Tiny-Refiner.safetensors [0123abcd]",
                       refiner_switch_at=0.6)["images"][0]
    assert by_title == by_name
    plain = txt2img(http)["images"][0]
    for off in ("None", "", None):
        got = txt2img(http, refiner_checkpoint=off, refiner_switch_at=0.6)
        assert got["images"][0] == plain
        assert "Refiner" not in json.loads(got["info"])["infotexts"][0]
    # A1111: a switch at 1 never switches, and the job's own model is no refiner
    assert txt2img(http, refiner_checkpoint="tiny-refiner", refiner_switch_at=1)["images"][0] == plain
    assert txt2img(http, refiner_checkpoint="tiny-sdxl", refiner_switch_at=0.5)["images"][0] == plain


def test_no_switch_is_a1111s_none_the_refiner_from_the_first_step(http, refiner_folder) -> None:  # noqa: ANN001
    """A1111's API without refiner_switch_at switches before the first step: the picture is
    the refiner's own text to image."""
    from diffusers import StableDiffusionXLPipeline

    got = arr(decoded(txt2img(http, refiner_checkpoint="tiny-refiner")["images"][0]))
    alone = _euler(StableDiffusionXLPipeline.from_pretrained(refiner_folder))
    expected = alone(PROMPT, num_inference_steps=6, guidance_scale=5, width=64, height=64,
                     generator=_generators([SEED])).images[0]
    close(got, arr(expected))


def test_img2img_hands_over_within_its_strength(http, refiner_folder) -> None:  # noqa: ANN001
    """strength 0.7 of 6 steps runs the last 4 timesteps (599.4 ... 0); switch 0.6 cuts at 400:
    one on the base, three on the refiner."""
    got = arr(decoded(img2img(http, denoising_strength=0.7, refiner_checkpoint="tiny-refiner",
                              refiner_switch_at=0.6)["images"][0]))
    _, base_i2i = base_pipes()
    latents = base_i2i(PROMPT, image=PICTURE, strength=0.7, num_inference_steps=6, guidance_scale=5,
                       generator=_generators([SEED]), denoising_end=0.6, output_type="latent").images
    expected = refiner_pipe(refiner_folder)(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                                            denoising_start=0.6, generator=_generators([SEED])).images[0]
    close(got, arr(expected))


def test_img2img_starting_past_the_switch_is_the_refiners_alone(http, refiner_folder) -> None:  # noqa: ANN001
    """strength 0.3 of 6 steps starts at timestep 0, below switch 0.5's cut (500): A1111
    switches before the first step, so the refiner runs the whole pass from the picture."""
    got = arr(decoded(img2img(http, denoising_strength=0.3, refiner_checkpoint="tiny-refiner",
                              refiner_switch_at=0.5)["images"][0]))
    expected = refiner_pipe(refiner_folder)(PROMPT, image=PICTURE, strength=0.3, num_inference_steps=6,
                                            guidance_scale=5, generator=_generators([SEED])).images[0]
    close(got, arr(expected))


def test_hires_fix_refines_its_second_pass(http, refiner_folder) -> None:  # noqa: ANN001
    """A1111's default ("Hires fix: which pass to enable refiner for" = second pass): the first
    pass is the base's alone, Lanczos to 128, then the second pass (strength 0.6 of 6: timesteps
    399.6, 199.8, 0) split at switch 0.8 (cut 200): one on the base, two on the refiner."""
    got = txt2img(http, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.6,
                  refiner_checkpoint="tiny-refiner", refiner_switch_at=0.8)
    image = decoded(got["images"][0])
    assert image.size == (128, 128)
    base, base_i2i = base_pipes()
    first = base(PROMPT, num_inference_steps=6, guidance_scale=5, width=64, height=64,
                 generator=_generators([SEED])).images[0]
    upscaled = first.resize((128, 128), Image.LANCZOS)
    latents = base_i2i(PROMPT, image=upscaled, strength=0.6, num_inference_steps=6, guidance_scale=5,
                       generator=_generators([SEED]), denoising_end=0.8, output_type="latent").images
    expected = refiner_pipe(refiner_folder)(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                                            denoising_start=0.8, generator=_generators([SEED])).images[0]
    close(arr(image), arr(expected))
    assert "Hires upscaler: Lanczos" in got["info"] and "Refiner: tiny-refiner" in got["info"]


def test_a_latent_hires_pass_starting_past_the_switch_is_the_refiners_alone(http, refiner_folder) -> None:  # noqa: ANN001
    """Latent upscale (A1111's "Latent": bilinear, no antialias), second pass strength 0.6 of
    6 (timesteps 399.6, 199.8, 0) below switch 0.5's cut (500): the refiner runs that pass
    alone from the upscaled latents, at the pass's strength."""
    got = txt2img(http, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6,
                  refiner_checkpoint="tiny-refiner", refiner_switch_at=0.5)
    base, _ = base_pipes()
    first = base(PROMPT, num_inference_steps=6, guidance_scale=5, width=64, height=64,
                 generator=_generators([SEED]), output_type="latent").images
    upscaled = torch.nn.functional.interpolate(first, size=(16, 16), mode="bilinear", antialias=False)
    expected = refiner_pipe(refiner_folder)(PROMPT, image=upscaled, strength=0.6, num_inference_steps=6,
                                            guidance_scale=5, generator=_generators([SEED])).images[0]
    close(arr(decoded(got["images"][0])), arr(expected))


def test_a_batch_keeps_each_seeds_bytes(http) -> None:  # noqa: ANN001
    fields = {"refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.6}
    batch = txt2img(http, batch_size=2, **fields)
    assert json.loads(batch["info"])["all_seeds"] == [SEED, SEED + 1]
    alone = [txt2img(http, seed=seed, **fields)["images"][0] for seed in (SEED, SEED + 1)]
    assert batch["images"] == alone


def test_the_batch_key_holds_the_refiner() -> None:
    from dataclasses import replace

    from app.engine.jobs import GenParams, Refiner
    from app.samplers import resolve_sampler

    params = GenParams(model="m", prompt="a", negative_prompt="", sampler=resolve_sampler("Euler"), steps=6,
                       width=64, height=64, cfg_scale=5, loras=(), seed=1, refiner=Refiner("r", 0.6))
    assert replace(params, seed=2, prompt="b").batch_key() == params.batch_key()
    for other in (replace(params, refiner=None), replace(params, refiner=Refiner("r", 0.7)),
                  replace(params, refiner=Refiner("q", 0.6))):
        assert other.batch_key() != params.batch_key()


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"refiner_checkpoint": "tiny-sd15"}, "refiner_checkpoint", ["must be an SDXL model", "SD 1.x",
                                                                 "tiny-refiner, tiny-sdxl"]),
    ({"refiner_checkpoint": "nope"}, "refiner_checkpoint", ["Available: tiny-refiner, tiny-sdxl"]),
    ({"refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 1.5}, "refiner_switch_at",
     ["between 0 and 1"]),
    ({"refiner_checkpoint": "tiny-refiner", "refiner_switch_at": -0.1}, "refiner_switch_at",
     ["between 0 and 1"]),
    ({"refiner_checkpoint": "tiny-refiner", "override_settings": {"sd_model_checkpoint": "tiny-sd15"}},
     "refiner_checkpoint", ["continues SDXL latents", "tiny-sd15"]),
], ids=["sd15-refiner", "unknown", "switch-above-1", "switch-below-0", "sd15-model"])
def test_bad_refiners_are_422_naming_field_value_and_rule(http, fields: dict, field: str,
                                                          words: list[str]) -> None:  # noqa: ANN001
    detail = txt2img(http, 422, **fields)["detail"]
    assert f"doesn't have {field}" in detail
    for word in words:
        assert word in detail, detail


def test_inpainting_with_a_refiner_is_refused_naming_it(http) -> None:  # noqa: ANN001
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    detail = img2img(http, 422, mask=b64(mask), refiner_checkpoint="tiny-refiner",
                     refiner_switch_at=0.5)["detail"]
    assert "refiner_checkpoint" in detail and "inpainting with a refiner" in detail


def test_one_model_a_device_is_refused_naming_the_setting(tmp_path: Path, refiner_folder: Path) -> None:
    from app.api.generation import ImageRequest, RefinerRequest, to_params
    from app.config import Settings
    from app.errors import InvalidParameter
    from app.registry import load_registry
    from tests.conftest import write_models_file

    models = write_models_file(tmp_path, f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl"}}
  tiny-refiner: {{source: "{refiner_folder}"}}
""")
    settings = Settings(models=models, max_models_per_device=1, api_keys=[API_KEY])
    request = ImageRequest(model="tiny-sdxl", prompt=PROMPT, refiner=RefinerRequest("tiny-refiner", 0.6))
    with pytest.raises(InvalidParameter, match="CRAFTSERVE_MAX_MODELS_PER_DEVICE"):
        to_params(request, load_registry(models), settings)
    roomy = Settings(models=models, max_models_per_device=2, api_keys=[API_KEY])
    assert to_params(request, load_registry(models), roomy).refiner is not None


# ---- OpenAI and the job API ---------------------------------------------------------------------
def test_openai_takes_refiner_as_an_extension(http, refiner_folder) -> None:  # noqa: ANN001
    body = {"model": "tiny-sdxl", "prompt": PROMPT, "size": "64x64", "steps": 6, "cfg_scale": 5,
            "sampler": "Euler", "seed": SEED, "response_format": "b64_json", "refiner": "tiny-refiner",
            "refiner_switch_at": 0.6}
    answer = http.post("/v1/images/generations", json=body, headers=AUTH)
    assert answer.status_code == 200, answer.text
    close(arr(decoded(answer.json()["data"][0]["b64_json"])), direct_txt2img(refiner_folder, 0.6))
    bad = http.post("/v1/images/generations", json={**body, "refiner": "tiny-sd15"}, headers=AUTH)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "refiner"


def test_a_job_counts_both_models_steps(http, refiner_folder) -> None:  # noqa: ANN001
    from tests.test_jobs import read_events

    answer = http.post("/jobs", json={"token": API_KEY, "model": "tiny-sdxl", "prompt": PROMPT, "steps": 6,
                                      "width": 64, "height": 64, "seed": SEED, "sampler": "Euler",
                                      "cfg_scale": 5, "refiner": "tiny-refiner", "refiner_switch_at": 0.6})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    events = read_events(http, job_id)
    assert events[-1][1] == "done", events[-1]
    progress = [data for _, name, data in events if name == "progress"]
    # 3 steps on the base, then 3 on the refiner
    assert (progress[-1]["step"], progress[-1]["steps"]) == (6, 6)
    image = http.get(f"/jobs/{job_id}/image", headers=AUTH)
    close(arr(Image.open(io.BytesIO(image.content))), direct_txt2img(refiner_folder, 0.6))
    bad = http.post("/jobs", json={"token": API_KEY, "model": "tiny-sdxl", "prompt": PROMPT,
                                   "refiner": "tiny-refiner", "refiner_switch_at": 2})
    assert bad.status_code == 422 and "refiner_switch_at" in bad.text


def test_prompt_syntax_is_encoded_by_the_refiners_own_encoders(http) -> None:  # noqa: ANN001
    """A weighted prompt needs A1111 encoding (app.engine.prompts), done here for each model
    with its own encoders: at weight 1 that is the pipelines' own encoding, so the picture is
    the plain prompt's (the refiner's second text encoder differs from the base's: encoding
    its part with the base's would show); at 1.5 it is another picture."""
    fields = {"refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.6}
    plain = arr(decoded(txt2img(http, **fields)["images"][0]))
    close(arr(decoded(txt2img(http, prompt="(a lighthouse:1.0)", **fields)["images"][0])), plain)
    weighted = arr(decoded(txt2img(http, prompt="(a lighthouse:1.5)", **fields)["images"][0]))
    assert np.abs(weighted - plain).max() > 2
