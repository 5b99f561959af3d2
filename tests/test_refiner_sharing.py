"""A refiner-only model using the VAE and second text encoder of a loaded SDXL model (issue 21,
app.engine.sharing), as diffusers' documented refiner usage passes the base's `vae` and
`text_encoder_2`. The tiny refiner here is built around tiny-sdxl's own VAE and encoder 2 (as
stabilityai's refiner ships the base's), so the server shares them; a second server with sharing
switched off is the reference: every picture must be byte-identical with and without sharing,
including a batch, the hires fix, the refiner running a pass alone and a LoRA on the base that
changes encoder 2 (LoRAs belong to the job's model only). Identity (`is`) and the freeing of the
refiner's own copies (weak references) are checked on the live worker."""

from __future__ import annotations

import gc
import json
import logging
import weakref
from pathlib import Path

import pytest
import torch

from app.engine.sharing import same_module
from tests.test_refiner import arr, decoded, differs, img2img, txt2img

ROOT = Path(__file__).resolve().parent.parent
TIME_EMBED = 8
SWITCH = {"refiner_checkpoint": "tiny-xl-refiner", "refiner_switch_at": 0.6}
LORA_PROMPT = "a lighthouse <lora:tiny-style:1>"


def build_refiner_of_tiny_sdxl(*, own_encoder: bool = False):  # noqa: ANN201
    """The refiner's layout (Img2Img, no first text encoder, aesthetic scores) around tiny-sdxl's
    own VAE and encoder 2 (equal weights: tiny-sdxl is built from a fixed seed), with a UNet of
    its own; `own_encoder`: encoder 2 moved by seeded noise (a fine-tuned encoder)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from app.engine import tiny

    base = tiny.build_tiny_sdxl()
    torch.manual_seed(9)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=5 * TIME_EMBED + tiny._TEXT_DIM,
        cross_attention_dim=tiny._TEXT_DIM, norm_num_groups=32,
    )
    encoder = base.text_encoder_2
    if own_encoder:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for weight in encoder.parameters():
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.05)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=encoder, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharing")
    out = {"shared": root / "tiny-xl-refiner", "own": root / "tiny-xl-refiner-own"}
    build_refiner_of_tiny_sdxl().save_pretrained(out["shared"])
    build_refiner_of_tiny_sdxl(own_encoder=True).save_pretrained(out["own"])
    return out


def models_yaml(folders: dict[str, Path], refiner: str = "shared", extra: str = "") -> str:
    return f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
  tiny-xl-refiner: {{source: "{folders[refiner]}", preload: true}}
{extra}lora_dirs: ["{ROOT / 'loras'}"]
"""


@pytest.fixture(scope="module")
def shared(make_server, folders):  # noqa: ANN001, ANN201
    return make_server(models_yaml(folders))


@pytest.fixture(scope="module")
def unshared(make_server, folders):  # noqa: ANN001, ANN201
    """The same models with sharing switched off: the refiner keeps its own copies."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("app.engine.worker.share", lambda models, worker="": 0)
        server = make_server(models_yaml(folders))
    return server


def worker_models(server):  # noqa: ANN001, ANN201
    return server.app.state.engine.workers[0].models


def test_the_refiner_uses_the_bases_modules_and_frees_its_own(shared, unshared) -> None:  # noqa: ANN001
    models = worker_models(shared)
    base, refiner = models["tiny-sdxl"], models["tiny-xl-refiner"]
    assert refiner.pipe.vae is base.pipe.vae
    assert refiner.pipe.text_encoder_2 is base.pipe.text_encoder_2
    assert [slot.encoder for slot in refiner.prompts.slots] == [base.pipe.text_encoder_2]
    assert refiner.shared == {"vae": "tiny-sdxl", "text_encoder_2": "tiny-sdxl"}
    assert refiner.pipe.unet is not base.pipe.unet and refiner.pipe.tokenizer_2 is not base.pipe.tokenizer_2
    # the reference server's refiner kept its own, equal copies
    own = worker_models(unshared)
    assert own["tiny-xl-refiner"].pipe.vae is not own["tiny-sdxl"].pipe.vae
    assert same_module(own["tiny-xl-refiner"].pipe.vae, own["tiny-sdxl"].pipe.vae)
    assert own["tiny-xl-refiner"].shared == {}


CASES = {
    "txt2img": lambda http: txt2img(http, **SWITCH),
    "batch": lambda http: txt2img(http, batch_size=2, **SWITCH),
    "img2img-refiner-alone": lambda http: img2img(http, denoising_strength=0.3, **{**SWITCH,
                                                                                  "refiner_switch_at": 0.5}),
    "hires": lambda http: txt2img(http, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                                  denoising_strength=0.6, **{**SWITCH, "refiner_switch_at": 0.8}),
    # tiny-style has LoRA layers in encoder 2: the base's pass uses them, the refiner's must not
    "lora": lambda http: txt2img(http, prompt=LORA_PROMPT, **SWITCH),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pictures_are_byte_identical_with_and_without_sharing(shared, unshared, case: str) -> None:  # noqa: ANN001
    with shared.client() as a, unshared.client() as b:
        got, want = CASES[case](a), CASES[case](b)
    assert len(got["images"]) == len(want["images"]) >= 1
    for mine, theirs in zip(got["images"], want["images"], strict=True):
        assert decoded(mine).tobytes() == decoded(theirs).tobytes()
    assert "Refiner: tiny-xl-refiner" in json.loads(got["info"])["infotexts"][0]


def test_the_lora_changes_the_base_and_is_off_for_the_refiner(shared) -> None:  # noqa: ANN001
    """The LoRA case above could pass if the LoRA did nothing: it changes the picture, and the
    base's encoder 2 (the refiner's too) has its adapters inactive again afterwards."""
    with shared.client() as http:
        plain = arr(decoded(txt2img(http, **SWITCH)["images"][0]))
        with_lora = arr(decoded(txt2img(http, prompt=LORA_PROMPT, **SWITCH)["images"][0]))
    differs(with_lora, plain)
    from peft.tuners.tuners_utils import BaseTunerLayer

    encoder = worker_models(shared)["tiny-sdxl"].pipe.text_encoder_2
    layers = [m for m in encoder.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(not layer.active_adapters for layer in layers)


def test_a_batched_refiner_call_splits_the_borrowed_modules_too(shared) -> None:  # noqa: ANN001
    """CPU batch invariance: the borrowed encoder's per-job forward reads the base pipeline's call
    state; the refiner's jobs_in_call sets it."""
    from app.engine.determinism import _STATE, jobs_in_call

    models = worker_models(shared)
    base_state = getattr(models["tiny-sdxl"].pipe, _STATE)
    with jobs_in_call(models["tiny-xl-refiner"].pipe, 3):
        assert base_state.jobs == 3
    assert base_state.jobs == 1


def test_a_fine_tuned_encoder_is_not_shared_the_equal_vae_is(make_server, folders, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.INFO, logger="app.engine.sharing"):
        server = make_server(models_yaml(folders, refiner="own"))
    models = worker_models(server)
    base, refiner = models["tiny-sdxl"], models["tiny-xl-refiner"]
    assert refiner.pipe.vae is base.pipe.vae
    assert refiner.pipe.text_encoder_2 is not base.pipe.text_encoder_2
    assert refiner.shared == {"vae": "tiny-sdxl"}
    assert "refiner tiny-xl-refiner now uses the vae of tiny-sdxl" in caplog.text
    assert "MiB of its own copies freed" in caplog.text
    assert not same_module(refiner.pipe.text_encoder_2, base.pipe.text_encoder_2)

def test_eviction_keeps_the_refiners_modules_until_an_equal_model_joins(make_server, folders) -> None:  # noqa: ANN001
    """Two models a device: a job for another base (equal weights) evicts tiny-sdxl; the
    refiner kept tiny-sdxl's VAE and encoder (alive past the eviction), then moves to the new
    base's, and tiny-sdxl's copies are freed. Pictures stay the same bytes throughout."""
    server = make_server(models_yaml(folders, extra='  tiny-sdxl-b: {source: "builtin:tiny-sdxl"}\n'),
                         max_models_per_device=2)
    worker = server.app.state.engine.workers[0]
    old_vae = weakref.ref(worker.models["tiny-sdxl"].pipe.vae)
    old_encoder = weakref.ref(worker.models["tiny-sdxl"].pipe.text_encoder_2)
    with server.client() as http:
        first = txt2img(http, **SWITCH)["images"][0]
        other = txt2img(http, override_settings={"sd_model_checkpoint": "tiny-sdxl-b"}, **SWITCH)
    assert "tiny-sdxl" not in worker.models and set(worker.models) == {"tiny-sdxl-b", "tiny-xl-refiner"}
    refiner = worker.models["tiny-xl-refiner"]
    assert refiner.pipe.vae is worker.models["tiny-sdxl-b"].pipe.vae
    assert refiner.shared == {"vae": "tiny-sdxl-b", "text_encoder_2": "tiny-sdxl-b"}
    gc.collect()
    assert old_vae() is None and old_encoder() is None
    assert decoded(other["images"][0]).tobytes() == decoded(first).tobytes()


def test_same_module_needs_every_tensor_equal() -> None:
    from app.engine import tiny

    a, b = tiny.build_tiny_sdxl().vae, tiny.build_tiny_sdxl().vae
    assert a is not b and same_module(a, b)
    with torch.no_grad():
        next(b.decoder.parameters()).view(-1)[0] += 1e-6
    assert not same_module(a, b)
    assert not same_module(a, tiny.build_tiny_sdxl().vae.to(torch.float64))
    assert not same_module(a, tiny.build_tiny_sdxl().text_encoder_2)



def test_suspended_loras_come_back_with_their_weights() -> None:
    """LoraManager.suspended (the refiner's part of a pass): the plain encoder inside, the same
    adapters and weights after, for the base's later calls of the batch."""
    from app.engine import tiny
    from app.engine.loras import LoraManager

    pipe = tiny.build_tiny_sdxl()
    ids = pipe.tokenizer_2(["a lighthouse"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids

    def encoded() -> torch.Tensor:
        with torch.no_grad():
            return pipe.text_encoder_2(ids).text_embeds

    plain = encoded()
    loras = LoraManager(pipe, "sdxl", capacity=2)
    loras.apply([("tiny-style", ROOT / "loras" / "tiny-style.safetensors", 0.7)])
    styled = encoded()
    assert not torch.equal(styled, plain)
    with loras.suspended():
        assert torch.equal(encoded(), plain)
    assert torch.equal(encoded(), styled)
    loras.reset()
    with loras.suspended():  # nothing active: nothing to bring back
        assert torch.equal(encoded(), plain)
    assert torch.equal(encoded(), plain)
