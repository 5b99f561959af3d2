"""Single-file SDXL refiner checkpoints (issue 21): `sd_xl_refiner_1.0.safetensors` in SGM's layout
(one OpenCLIP bigG encoder as embedder 0, `conditioner.embedders.0.model.`), detected from its
header and loaded offline with the bundled app/configs/sdxl-refiner, as the refiner-only model a
diffusers folder of the refiner's layout gives.

The bundled UNet config is checked against diffusers' own reading of Stability's
sd_xl_refiner.yaml; the written tiny file against diffusers' converters; the served refiner
against the same weights saved as a diffusers folder (byte for byte, through the server) and
against diffusers called directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.checkpoints import BUNDLED_CONFIGS, CheckpointError, config_folder, inspect_checkpoint
from app.engine.single_file import load_single_file
from app.registry import ModelSpec, RegistryError, load_registry
from tests.conftest import API_KEY, write_models_file
from tests.original_layout import save_safetensors, write_checkpoint, write_config_folder
from tests.test_refiner import PROMPT, SEED, _generators, arr, base_pipes, close, decoded, txt2img
from tests.test_refiner_layout import build_tiny_refiner, refiner_pipe

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REFINER = BUNDLED_CONFIGS / "sdxl-refiner"
BASE = BUNDLED_CONFIGS / "sdxl"

# network_config.params and first_stage_config.params.ddconfig.ch_mult of Stability's
# configs/inference/sd_xl_refiner.yaml (generative-models), as published
SGM_REFINER_YAML = {"model": {"params": {
    "network_config": {"params": {
        "adm_in_channels": 2560, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
        "out_channels": 4, "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
        "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280],
        "spatial_transformer_attn_type": "softmax-xformers"}},
    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
}}}


def spec_for(path: Path, config: Path | None) -> ModelSpec:
    return ModelSpec(name=path.stem, source=str(path), kind="single_file", family="sdxl", family_known=True,
                     default_sampler=None, dtype="auto", vae=None, preload=False,
                     config=str(config) if config else None, refiner_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny refiner (test_refiner_layout's) as an original-layout file, its config folder
    and the same weights as a diffusers folder."""
    root = tmp_path_factory.mktemp("refiner-file")
    pipe = build_tiny_refiner()
    folder = root / "tiny-folder-refiner"
    pipe.save_pretrained(folder)
    return {"pipe": pipe, "folder": folder, "config": write_config_folder(pipe, root / "refiner-config"),
            "file": write_checkpoint(pipe, "sdxl", root / "tiny-file-refiner.safetensors")}


# --------------------------------------------------------------------------- bundled configs


def test_bundled_refiner_unet_is_diffusers_reading_of_the_sgm_config() -> None:
    from diffusers.loaders import single_file_utils as su

    marker = {su.CHECKPOINT_KEY_NAMES["xl_refiner"]: torch.zeros(1)}  # how diffusers names the file
    expected = su.create_unet_diffusers_config_from_ldm(SGM_REFINER_YAML, marker)
    bundled = json.loads((REFINER / "unet" / "config.json").read_text())
    assert expected["block_out_channels"] == [384, 768, 1536, 1536]
    for key, value in expected.items():
        value = list(value) if isinstance(value, tuple) else value
        assert bundled.get(key) == value, key  # (class_embed_type None: the default, left out)
    from app.engine.single_file import _meta_unet

    unet = _meta_unet(REFINER)[0]
    assert [type(b).__name__ for b in unet.down_blocks] == expected["down_block_types"]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 4  # SGM: transformer_depth[-1]


def test_bundled_refiner_shares_the_base_configs_and_is_the_refiners_layout() -> None:
    for part in ("vae/config.json", "text_encoder_2/config.json", "scheduler/scheduler_config.json",
                 "tokenizer_2/tokenizer_config.json", "tokenizer_2/special_tokens_map.json"):
        assert json.loads((REFINER / part).read_text()) == json.loads((BASE / part).read_text()), part
    for part in ("vocab.json", "merges.txt"):
        assert (REFINER / "tokenizer_2" / part).read_bytes() == (BASE / "tokenizer_2" / part).read_bytes()
    index = json.loads((REFINER / "model_index.json").read_text())
    from app.families import is_refiner_layout

    assert is_refiner_layout(index) and index["tokenizer"] == [None, None]
    # stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    from app.engine.single_file import _meta_text_encoder, _meta_vae

    # SDXL 1.0's bigG encoder and VAE (the counts of /work/shared/sdxl-configs' README)
    assert sum(p.numel() for p in _meta_text_encoder(REFINER, "text_encoder_2").parameters()) == 694_659_840
    assert sum(p.numel() for p in _meta_vae(REFINER)[0].parameters()) == 83_653_863


# --------------------------------------------------------------------------- detection


UNET_4 = {"model.diffusion_model.input_blocks.0.0.weight": [384, 4, 3, 3]}
VAE_KEYS = {"first_stage_model.decoder.conv_in.weight": [1]}


def _fake(path: Path, keys: dict[str, list[int]]) -> Path:
    save_safetensors({k: torch.zeros(shape, dtype=torch.float16) for k, shape in keys.items()}, path)
    return path


def test_a_refiner_is_told_by_its_one_embedder(tmp_path: Path) -> None:
    from diffusers.loaders import single_file_utils as su

    keys = {**UNET_4, **VAE_KEYS, su.CHECKPOINT_KEY_NAMES["xl_refiner"]: [1280],
            "conditioner.embedders.0.model.text_projection": [1280, 1280]}
    info = inspect_checkpoint(_fake(tmp_path / "r.safetensors", keys))
    assert (info.family, info.refiner, info.in_channels) == ("sdxl", True, 4)
    # diffusers' own detection agrees on this header
    assert su.infer_diffusers_model_type({k: torch.zeros(s) for k, s in keys.items()}) == "xl_refiner"
    base = {**UNET_4, **VAE_KEYS, "conditioner.embedders.1.model.ln_final.weight": [1],
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [1]}
    assert inspect_checkpoint(_fake(tmp_path / "b.safetensors", base)).refiner is False
    # embedder 0 in OpenCLIP's layout beside a second embedder is no refiner SGM ships
    odd = {**keys, "conditioner.embedders.1.model.ln_final.weight": [1]}
    with pytest.raises(CheckpointError, match="SGM text encoders craftserve does not know"):
        inspect_checkpoint(_fake(tmp_path / "o.safetensors", odd))
    with pytest.raises(CheckpointError, match="SDXL refiner whose UNet takes 9 input channels"):
        inspect_checkpoint(_fake(tmp_path / "i.safetensors",
                                 {**keys, "model.diffusion_model.input_blocks.0.0.weight": [384, 9, 3, 3]}))


# --------------------------------------------------------------------------- loading


def test_written_refiner_layout_is_the_one_diffusers_converters_read(tiny: dict) -> None:
    from diffusers.loaders import single_file_utils as su
    from safetensors.torch import load_file

    pipe = tiny["pipe"]
    checkpoint = load_file(tiny["file"])
    assert not any(k.startswith(("conditioner.embedders.0.transformer.", "conditioner.embedders.1."))
                   for k in checkpoint)
    pairs = [(pipe.unet.state_dict(), su.convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))),
             (pipe.vae.state_dict(), su.convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))),
             (pipe.text_encoder_2.state_dict(),
              su.convert_open_clip_checkpoint(pipe.text_encoder_2, checkpoint,
                                              prefix="conditioner.embedders.0.model."))]
    for want, got in pairs:
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k].reshape(want[k].shape)) for k in want)


def test_refiner_file_loads_back_the_exact_tensors_as_the_refiners_pipeline(tiny: dict) -> None:
    pipe = load_single_file(spec_for(tiny["file"], tiny["config"]), torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score is True and pipe.config.force_zeros_for_empty_prompt is False
    for name in ("unet", "vae", "text_encoder_2"):
        want, got = getattr(tiny["pipe"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # the bundled full-size refiner configs do not describe the tiny file: a shape error
    from app.engine.single_file import SingleFileError

    with pytest.raises(SingleFileError, match="config folder does not describe"):
        load_single_file(spec_for(tiny["file"], None), torch.float32)


def test_registry_serves_refiner_files_as_refiners(tiny: dict, tmp_path: Path) -> None:
    text = (f"models:\n  r: {{source: {tiny['file']}, config: {tiny['config']}}}\n"
            f"  plain: {{source: {tiny['file']}}}\n")
    registry = load_registry(write_models_file(tmp_path, text))
    assert registry.models["r"].refiner_only and registry.models["r"].family == "sdxl"
    assert config_folder(registry.models["plain"]) == REFINER
    base_config = write_config_folder(base_pipes()[0], tmp_path / "base-config")
    with pytest.raises(RegistryError, match=r"models\.r\.config: the checkpoint is SDXL's refiner"):
        load_registry(write_models_file(tmp_path, f"models:\n  r: {{source: {tiny['file']}, "
                                                  f"config: {base_config}}}\n"))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "sd_xl_refiner_1.0.safetensors").write_bytes(tiny["file"].read_bytes())
    found = load_registry(write_models_file(tmp_path, f"model_dirs: [{folder}]\nmodels: {{}}\n")).models
    assert found["sd_xl_refiner_1.0"].refiner_only


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(make_server, tiny):  # noqa: ANN001, ANN201
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
  tiny-file-refiner: {{source: "{tiny['file']}", config: "{tiny['config']}", preload: true}}
  tiny-folder-refiner: {{source: "{tiny['folder']}", preload: true}}
""", allow_downloads=False)


@pytest.fixture()
def http(server):  # noqa: ANN001, ANN201
    with server.client() as c:
        yield c


def test_the_file_refines_as_the_same_weights_in_a_folder(http, tiny) -> None:  # noqa: ANN001
    got = txt2img(http, refiner_checkpoint="tiny-file-refiner", refiner_switch_at=0.6)
    folder = txt2img(http, refiner_checkpoint="tiny-folder-refiner", refiner_switch_at=0.6)
    assert decoded(got["images"][0]).tobytes() == decoded(folder["images"][0]).tobytes()
    assert "Refiner: tiny-file-refiner" in json.loads(got["info"])["infotexts"][0]
    base, _ = base_pipes()
    latents = base(PROMPT, num_inference_steps=6, guidance_scale=5, width=64, height=64,
                   generator=_generators([SEED]), denoising_end=0.6, output_type="latent").images
    expected = refiner_pipe(tiny["folder"])(PROMPT, image=latents, num_inference_steps=6, guidance_scale=5,
                                            denoising_start=0.6, generator=_generators([SEED])).images[0]
    close(arr(decoded(got["images"][0])), arr(expected))


def test_the_file_refiner_is_no_jobs_model(http) -> None:  # noqa: ANN001
    answer = txt2img(http, 422, override_settings={"sd_model_checkpoint": "tiny-file-refiner"})
    assert "tiny-file-refiner" in json.dumps(answer) and "serves only as a refiner" in json.dumps(answer)
    titles = [m["model_name"] for m in http.get("/sdapi/v1/sd-models", headers=AUTH).json()]
    assert "tiny-file-refiner" in titles
