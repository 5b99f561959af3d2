"""SDXL's refiner in its own layout (issue 21): a StableDiffusionXLImg2ImgPipeline with no first
text encoder (only encoder 2, OpenCLIP bigG in the real one), requires_aesthetics_score true and
a UNet whose addition embedding takes 5 time ids (size, crop, aesthetic score), as
stabilityai/stable-diffusion-xl-refiner-1.0 ships. Built tiny and random here and saved as a
diffusers folder; served as a refiner only. Expected pictures come from diffusers called
directly: the tiny base with `denoising_end`, then the refiner folder loaded by diffusers itself
with `denoising_start` (its own encoder and diffusers' default aesthetic scores, 6.0 / 2.5, as
A1111 conditions the refiner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import API_KEY
from tests.test_refiner import (
    PICTURE,
    PROMPT,
    SEED,
    _euler,
    _generators,
    arr,
    base_pipes,
    close,
    decoded,
    differs,
    img2img,
    txt2img,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIME_EMBED = 8


def build_tiny_refiner():  # noqa: ANN201
    """The refiner's layout at tiny size: encoder 2 only (its hidden states alone are the
    cross-attention context; its projected pooled output plus 5 time ids the addition
    embedding), aesthetic-score time ids."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from app.engine import tiny

    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=5 * TIME_EMBED + tiny._TEXT_DIM,
        cross_attention_dim=tiny._TEXT_DIM, norm_num_groups=32,
    )
    tokenizer = tiny.tiny_tokenizer()
    return StableDiffusionXLImg2ImgPipeline(
        vae=tiny._vae(), text_encoder=None, text_encoder_2=tiny._text_encoder(True, len(tokenizer)),
        tokenizer=None, tokenizer_2=tokenizer, unet=unet, scheduler=tiny._scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("refiner-layout") / "tiny-xl-refiner"
    build_tiny_refiner().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(make_server, refiner_folder):  # noqa: ANN001, ANN201
    return make_server(f"""
models:
  tiny-xl-refiner: {{source: "{refiner_folder}", preload: true}}
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
""", preview_every=1)


@pytest.fixture()
def http(server):  # noqa: ANN001, ANN201
    with server.client() as c:
        yield c


def refiner_pipe(folder: Path):  # noqa: ANN201
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    return _euler(pipe)


def test_the_folder_is_the_refiners_layout(refiner_folder) -> None:  # noqa: ANN001
    index = json.loads((refiner_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None]
    from app.registry import _model_spec, _ModelEntry

    spec = _model_spec("r", _ModelEntry(source=str(refiner_folder)), refiner_folder.parent,
                       refiner_folder.parent / "models.yaml")
    assert spec.family == "sdxl" and spec.refiner_only


def test_txt2img_hands_over_to_the_refiner_layout(http, refiner_folder) -> None:  # noqa: ANN001
    """6 Euler steps, switch 0.6: three on the base, three on the refiner, which encodes the
    prompt with its one encoder and conditions on aesthetic scores 6 / 2.5."""
    got = txt2img(http, refiner_checkpoint="tiny-xl-refiner", refiner_switch_at=0.6)
    image = arr(decoded(got["images"][0]))
    base, _ = base_pipes()
    latents = base(PROMPT, num_inference_steps=6, guidance_scale=5, width=64, height=64,
                   generator=_generators([SEED]), denoising_end=0.6, output_type="latent").images
    refiner = refiner_pipe(refiner_folder)
    expected = refiner(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                       denoising_start=0.6, generator=_generators([SEED])).images[0]
    close(image, arr(expected))
    # (the UNet takes exactly 5 time ids: without the aesthetic score the call would fail; the
    # tiny UNet is too insensitive to the score's value for another value to show)
    differs(image, arr(decoded(txt2img(http)["images"][0])))
    assert "Refiner: tiny-xl-refiner" in json.loads(got["info"])["infotexts"][0]


def test_img2img_past_the_switch_is_the_refiner_layouts_alone(http, refiner_folder) -> None:  # noqa: ANN001
    """strength 0.3 of 6 steps starts below switch 0.5's cut: the refiner runs the pass alone,
    from the picture."""
    got = arr(decoded(img2img(http, denoising_strength=0.3, refiner_checkpoint="tiny-xl-refiner",
                              refiner_switch_at=0.5)["images"][0]))
    expected = refiner_pipe(refiner_folder)(PROMPT, image=PICTURE, strength=0.3, num_inference_steps=6,
                                            guidance_scale=5, generator=_generators([SEED])).images[0]
    close(got, arr(expected))


def test_a1111_syntax_is_encoded_by_the_refiners_one_encoder(http, refiner_folder) -> None:  # noqa: ANN001
    """A weight of 1 in A1111 syntax goes through the prompt encoder (encoder 2 alone): the
    same picture as the plain prompt."""
    plain = txt2img(http, refiner_checkpoint="tiny-xl-refiner", refiner_switch_at=0.6)["images"][0]
    syntax = txt2img(http, prompt=f"({PROMPT}:1)", refiner_checkpoint="tiny-xl-refiner",
                     refiner_switch_at=0.6)["images"][0]
    close(arr(decoded(syntax)), arr(decoded(plain)))


def test_prompt_encoder_matches_the_refiners_own_encoding(refiner_folder) -> None:  # noqa: ANN001
    from app.engine.prompts import PromptEncoder

    pipe = refiner_pipe(refiner_folder)
    encoded = PromptEncoder(pipe, "sdxl").encode(PROMPT)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert encoded.hidden.shape == hidden.shape == (1, 77, 32)
    torch.testing.assert_close(encoded.hidden, hidden)
    torch.testing.assert_close(encoded.pooled, pooled)


def test_the_refiner_is_no_jobs_model(http) -> None:  # noqa: ANN001
    answer = txt2img(http, 422, override_settings={"sd_model_checkpoint": "tiny-xl-refiner"})
    text = json.dumps(answer)
    assert "tiny-xl-refiner" in text and "refiner" in text.replace("tiny-xl-refiner", "")
    answer = http.post("/v1/images/generations", json={"prompt": PROMPT, "model": "tiny-xl-refiner",
                                                       "size": "64x64"}, headers=AUTH)
    assert answer.status_code == 400, answer.text  # the OpenAI dialect's invalid_request_error
    assert "tiny-xl-refiner" in answer.text and "serves only as a refiner" in answer.text


def test_listed_where_refiners_are_and_not_the_default(http) -> None:  # noqa: ANN001
    titles = [m["model_name"] for m in http.get("/sdapi/v1/sd-models", headers=AUTH).json()]
    assert "tiny-xl-refiner" in titles
    # VisionCraft's /img2img `refiner` is the model that runs the whole pass: a refiner-only
    # model runs none alone, so it is not offered there
    refiners = http.get("/img2img/refiners", headers=AUTH).json()
    assert "tiny-xl-refiner" not in refiners and "tiny-sdxl" in refiners
    # the first model of models.yaml is the refiner, yet a request naming none gets tiny-sdxl
    got = txt2img(http)
    assert "Model: tiny-sdxl" in json.loads(got["info"])["infotexts"][0]
