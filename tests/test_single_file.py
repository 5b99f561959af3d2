"""Single-file checkpoints (original CompVis / SGM layout): detection, refusals, offline loading
with every tensor accounted for, model_dirs, single-file VAEs, and serving over HTTP."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from app.checkpoints import (
    BUNDLED_CONFIGS,
    VAE,
    CheckpointError,
    config_folder,
    inspect_checkpoint,
)
from app.engine.single_file import SingleFileError, load_single_file, load_vae_file
from app.registry import ModelSpec, RegistryError, load_registry
from tests.conftest import body, png, write_models_file
from tests.original_layout import (
    pipeline_state,
    save_safetensors,
    tiny_sd15,
    tiny_sdxl_two_widths,
    write_checkpoint,
    write_config_folder,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny SDXL (text encoders 32 and 48 wide) and SD 1.x: pipelines, config folders, files."""
    root = tmp_path_factory.mktemp("single-file")
    out: dict = {"root": root}
    for family, pipe in (("sdxl", tiny_sdxl_two_widths()), ("sd15", tiny_sd15())):
        out[family] = {
            "pipe": pipe,
            "config": write_config_folder(pipe, root / f"{family}-config"),
            "file": write_checkpoint(pipe, family, root / f"tiny-{family}.safetensors"),
        }
    return out


def spec_for(path: Path, family: str, config: Path | None, **extra) -> ModelSpec:
    return ModelSpec(name=path.stem, source=str(path), kind="single_file", family=family,  # type: ignore[arg-type]
                     family_known=True, default_sampler=None, dtype="auto", vae=None, preload=False,
                     config=str(config) if config else None, **extra)


def fake_checkpoint(path: Path, keys: dict[str, list[int]], metadata: dict | None = None) -> Path:
    """A header-true file with tiny tensors of the given names and shapes (detection tests)."""
    tensors = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in keys.items()}
    save_safetensors(tensors, path, metadata)
    return path


UNET_4 = {"model.diffusion_model.input_blocks.0.0.weight": [8, 4, 1, 1]}
VAE_KEYS = {"first_stage_model.decoder.conv_in.weight": [1]}
SD1 = {**UNET_4, **VAE_KEYS, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [1]}
SDXL = {**UNET_4, **VAE_KEYS, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [1],
        "conditioner.embedders.1.model.ln_final.weight": [1]}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_original_file_loads_back_the_exact_tensors(tiny: dict, family: str) -> None:
    """original file -> loader -> the same tensors as the diffusers components that wrote it
    (the SDXL encoders have different widths, and each gets its own weights)."""
    case = tiny[family]
    pipe = load_single_file(spec_for(case["file"], family, case["config"]), torch.float32)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        want, got = getattr(case["pipe"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert pipe.text_encoder.config.hidden_size == 32
    if family == "sdxl":
        assert pipe.text_encoder_2.config.hidden_size == 48


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_written_layout_is_the_one_diffusers_converters_read(tiny: dict, family: str) -> None:
    """The test writer's layout is the real one: diffusers' own original->diffusers converters
    read the file back into the components' tensors."""
    from diffusers.loaders import single_file_utils as su
    from safetensors.torch import load_file

    case = tiny[family]
    pipe = case["pipe"]
    checkpoint = load_file(case["file"])
    unet = su.convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))
    vae = su.convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))
    pairs = [(pipe.unet.state_dict(), unet), (pipe.vae.state_dict(), vae)]
    clip = su.convert_ldm_clip_checkpoint(checkpoint)
    pairs.append(({f"text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
                  {k: v for k, v in clip.items() if k.startswith("text_model.")}))
    if family == "sdxl":
        big = su.convert_open_clip_checkpoint(pipe.text_encoder_2, checkpoint,
                                              prefix="conditioner.embedders.1.model.")
        pairs.append((pipe.text_encoder_2.state_dict(), big))
    for want, got in pairs:
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k].reshape(want[k].shape)) for k in want)


def test_every_tensor_must_land(tiny: dict, tmp_path: Path) -> None:
    case = tiny["sdxl"]
    foreign = write_checkpoint(case["pipe"], "sdxl", tmp_path / "extra.safetensors",
                               extra={"model.diffusion_model.mystery.weight": torch.ones(3)})
    with pytest.raises(SingleFileError, match="belong to no module.*model.diffusion_model.mystery"):
        load_single_file(spec_for(foreign, "sdxl", case["config"]), torch.float32)
    missing = write_checkpoint(case["pipe"], "sdxl", tmp_path / "missing.safetensors",
                               drop=("conditioner.embedders.1.model.transformer.resblocks.1.",))
    with pytest.raises(SingleFileError, match="text encoder 2.*lacks"):
        load_single_file(spec_for(missing, "sdxl", case["config"]), torch.float32)
    # the bundled full-size configs do not describe a tiny file: a clear shape error, not garbage
    with pytest.raises(SingleFileError, match="config folder does not describe"):
        load_single_file(spec_for(case["file"], "sdxl", None), torch.float32)


def test_bundled_sd15_configs_have_the_stock_parameter_counts() -> None:
    from app.engine.single_file import _meta_text_encoder, _meta_unet, _meta_vae

    folder = BUNDLED_CONFIGS / "sd15"

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(_meta_unet(folder)[0]) == 859_520_964
    assert count(_meta_text_encoder(folder, "text_encoder")) == 123_060_480
    assert count(_meta_vae(folder)[0]) == 83_653_863
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215


def test_bundled_tokenizers_are_clips() -> None:
    from transformers import CLIPTokenizer

    for family, name, pad in (("sd15", "tokenizer", 49407), ("sdxl", "tokenizer", 49407),
                              ("sdxl", "tokenizer_2", 0)):
        tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_CONFIGS / family / name, local_files_only=True)
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.pad_token_id == pad


def test_config_folder_per_kind(tiny: dict) -> None:
    file = tiny["sd15"]["file"]
    assert config_folder(spec_for(file, "sd15", None)) == BUNDLED_CONFIGS / "sd15"
    assert config_folder(spec_for(file, "sd15", tiny["sd15"]["config"])) == tiny["sd15"]["config"]
    base = dict(family_known=True, default_sampler=None, dtype="auto", vae=None, preload=False)
    assert config_folder(ModelSpec(name="h", source="a/b", kind="hub", family="sdxl", **base)) == \
        BUNDLED_CONFIGS / "sdxl"
    assert config_folder(ModelSpec(name="l", source="/x", kind="local", family="sdxl", **base)) == Path("/x")
    assert config_folder(ModelSpec(name="b", source="builtin:tiny-sdxl", kind="builtin",
                                   family="sdxl", **base)) is None


def test_single_file_vae_gets_the_model_familys_scaling_factor(tiny: dict, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from app.engine.single_file import vae_mapper

    bundled = json.loads((BUNDLED_CONFIGS / "sdxl" / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_config({**bundled, "block_out_channels": [32, 32, 32, 32]})
    to_original = vae_mapper(dict(vae.config))
    tensors = {to_original(k): (v[:, :, None, None] if ".attentions." in k and v.dim() == 2 else v)
               for k, v in vae.state_dict().items()}
    path = save_and(tensors, tmp_path / "vae.safetensors")
    folder = tmp_path / "cfg"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text(json.dumps(dict(vae.config)))
    loaded = load_vae_file(path, folder, torch.float32)
    assert loaded.config.scaling_factor == 0.13025
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))


def save_and(tensors: dict, path: Path) -> Path:
    save_safetensors(tensors, path)
    return path


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("keys", "metadata", "reason"),
    [
        ({**UNET_4, **VAE_KEYS, "cond_stage_model.model.ln_final.weight": [1]}, None, "SD 2.x"),
        ({**SD1, "model.diffusion_model.input_blocks.0.0.weight": [8, 8, 1, 1]}, None,
         "instruct-pix2pix / depth checkpoint: its UNet takes 8 input channels"),
        ({**SDXL, "v_pred": [0]}, None, "v-prediction checkpoint .*`v_pred`.*prediction: v"),
        (SD1, {"modelspec.prediction_type": "v"}, "v-prediction"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [1]}, None, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.qkv.weight": [1], "single_blocks.0.linear1.weight": [1]}, None, "Flux"),
        ({"clip_txt_mapper.weight": [1], "down_blocks.0.0.weight": [1]}, None, "Stable Cascade"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [1]}, None, "is a LoRA"),
        ({"encoder.conv_in.weight": [1], "decoder.conv_in.weight": [1]}, None, "bare VAE.*`vae:`"),
        ({"some.other.weight": [1]}, None, "not a Stable Diffusion checkpoint.*some.other.weight"),
        ({"down_blocks.0.resnets.0.conv1.weight": [1]}, None, "diffusers-layout"),
        ({**UNET_4, **VAE_KEYS}, None, "no text encoder"),
        ({**UNET_4, "cond_stage_model.transformer.text_model.x": [1]}, None, "no VAE"),
    ],
)
def test_refusals_name_what_was_found(tmp_path: Path, keys, metadata, reason) -> None:
    path = fake_checkpoint(tmp_path / "m.safetensors", keys, metadata)
    with pytest.raises(CheckpointError, match=reason):
        inspect_checkpoint(path)


def test_families_and_declared_v_prediction(tmp_path: Path) -> None:
    assert inspect_checkpoint(fake_checkpoint(tmp_path / "a.safetensors", SD1)).family == "sd15"
    assert inspect_checkpoint(fake_checkpoint(tmp_path / "b.safetensors", SDXL)).family == "sdxl"
    v = inspect_checkpoint(fake_checkpoint(tmp_path / "v.safetensors", {**SDXL, "v_pred": [0], "ztsnr": [0]}),
                           prediction="v")
    assert (v.family, v.prediction, v.zero_terminal_snr) == ("sdxl", "v", True)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    good = fake_checkpoint(tmp_path / "good.safetensors", SD1)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(truncated)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not JSON"):
        inspect_checkpoint(corrupt)
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"pickle checkpoint \(.ckpt\).*Convert it to .safetensors"):
        inspect_checkpoint(pickle)


# --------------------------------------------------------------------------- models.yaml


def test_registry_refusals(tiny: dict, tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "sd2.safetensors",
                    {**UNET_4, **VAE_KEYS, "cond_stage_model.model.ln_final.weight": [1]})
    refused = r"models\.r\.source: cannot be served: sd2.safetensors is an SD 2.x checkpoint"
    with pytest.raises(RegistryError, match=refused):
        load_registry(write_models_file(tmp_path, "models:\n  r: {source: sd2.safetensors}\n"))
    (tmp_path / "old.ckpt").write_bytes(b"PK")
    with pytest.raises(RegistryError, match="models.o.source: .*pickle"):
        load_registry(write_models_file(tmp_path, "models:\n  o: {source: old.ckpt}\n"))
    file = tiny["sd15"]["file"]
    with pytest.raises(RegistryError, match=r"models\.m\.config: .*nowhere is not a folder"):
        load_registry(write_models_file(tmp_path, f"models:\n  m: {{source: {file}, config: nowhere}}\n"))
    with pytest.raises(RegistryError, match=r"models\.m\.config: the folder describes a sdxl pipeline"):
        load_registry(write_models_file(
            tmp_path, f"models:\n  m: {{source: {file}, config: {tiny['sdxl']['config']}}}\n"))
    fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": [1]})
    refused = r"models\.m\.vae: cannot be used: not a VAE: lora.safetensors is a LoRA"
    with pytest.raises(RegistryError, match=refused):
        text = f"models:\n  m: {{source: {file}, vae: lora.safetensors}}\n"
        load_registry(write_models_file(tmp_path, text))


def test_model_dirs(tiny: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "one.safetensors").write_bytes(tiny["sd15"]["file"].read_bytes())
    (folder / "two.safetensors").write_bytes(tiny["sdxl"]["file"].read_bytes())
    fake_checkpoint(folder / "inpaint.safetensors",
                    {**SD1, "model.diffusion_model.input_blocks.0.0.weight": [8, 9, 1, 1]})
    fake_checkpoint(folder / "pix2pix.safetensors",
                    {**SD1, "model.diffusion_model.input_blocks.0.0.weight": [8, 8, 1, 1]})
    (folder / "old.ckpt").write_bytes(b"PK")
    (folder / "notes.txt").write_text("not a model")
    with caplog.at_level(logging.WARNING):
        registry = load_registry(write_models_file(tmp_path, "model_dirs: [checkpoints]\nmodels: {}\n"))
    assert {n: m.family for n, m in registry.models.items()} == {"inpaint": "sd15", "one": "sd15",
                                                                 "two": "sdxl"}
    assert registry.models["one"].kind == "single_file"
    assert (registry.models["one"].in_channels, registry.models["inpaint"].in_channels) == (4, 9)
    warnings = caplog.text
    assert ("pix2pix.safetensors is not served: pix2pix.safetensors is an instruct-pix2pix / depth "
            "checkpoint") in warnings
    assert "old.ckpt is not served" in warnings and "pickle" in warnings
    other = tmp_path / "more"
    other.mkdir()
    (other / "one.safetensors").write_bytes(b"")
    with pytest.raises(RegistryError, match=r"two models named 'one': .*checkpoints/one.safetensors and "
                                            r".*more/one.safetensors"):
        load_registry(write_models_file(tmp_path, "model_dirs: [checkpoints, more]\nmodels: {}\n"))


# --------------------------------------------------------------------------- HTTP, offline


def test_single_files_serve_over_http_offline(tiny: dict, make_server, network_off: list,
                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "dir-sd15.safetensors").write_bytes(tiny["sd15"]["file"].read_bytes())
    fake_checkpoint(folder / "sd2.safetensors",
                    {**UNET_4, **VAE_KEYS, "cond_stage_model.model.ln_final.weight": [1]})
    state = pipeline_state(tiny["sdxl"]["pipe"], "sdxl")
    vae = {k.removeprefix(VAE): v for k, v in state.items() if k.startswith(VAE)}
    save_safetensors(vae, tmp_path / "tiny-vae.safetensors")
    gone = tmp_path / "gone.safetensors"
    gone.write_bytes(tiny["sd15"]["file"].read_bytes())
    models = f"""
models:
  file-sdxl:
    source: {tiny['sdxl']['file']}
    config: {tiny['sdxl']['config']}
    default_sampler: Euler a
    preload: true
  file-sd15:
    source: {tiny['sd15']['file']}
    config: {tiny['sd15']['config']}
  file-sdxl-vae:
    source: {tiny['sdxl']['file']}
    config: {tiny['sdxl']['config']}
    vae: {tmp_path / 'tiny-vae.safetensors'}
  gone:
    source: {gone}
    config: {tiny['sd15']['config']}
model_dirs: [{folder}]
"""
    with caplog.at_level(logging.WARNING):
        server = make_server(models, allow_downloads=False)
    gone.unlink()  # unreadable after start-up: 503 at load, the others keep serving
    with server.client() as c:
        assert c.get("/sd/models-sdxl").json() == ["file-sdxl", "file-sdxl-vae"]
        # the same weights through a separate VAE file: the same pixels
        same = c.post("/sd", json=body(model="file-sdxl-vae", sampler="Euler a"))

        assert sorted(c.get("/sd/models-sd").json()) == ["dir-sd15", "file-sd15", "gone"]
        answer = c.post("/sd", json=body(model="file-sdxl"))
        assert png(answer).size == (64, 64) and answer.headers["x-sampler"] == "Euler a"
        assert png(same).tobytes() == png(answer).tobytes()
        png(c.post("/sd", json=body(model="file-sd15", width=72)))
        refused = c.post("/sd", json=body(model="gone"))
        assert refused.status_code == 503
        assert "gone.safetensors: the checkpoint is missing" in refused.json()["detail"]
        # model_dirs without a config folder use the bundled full-size configs: a tiny file does
        # not fit them, and the answer says so
        misfit = c.post("/sd", json=body(model="dir-sd15"))
        assert misfit.status_code == 503 and "does not describe" in misfit.json()["detail"]
        png(c.post("/sd", json=body(model="file-sd15")))
    assert network_off == []
    assert "sd2.safetensors is not served" in caplog.text
    hub_noise = [r.getMessage() for r in caplog.records if "huggingface" in r.name or "offline" in
                 r.getMessage().lower() or "retry" in r.getMessage().lower()]
    assert hub_noise == []


def test_declared_v_prediction_sets_up_the_scheduler(tiny: dict, tmp_path: Path) -> None:
    pipe = tiny["sdxl"]["pipe"]
    path = write_checkpoint(pipe, "sdxl", tmp_path / "v.safetensors",
                            extra={"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    text = f"models:\n  v: {{source: {path}, config: {tiny['sdxl']['config']}, prediction: v}}\n"
    spec = load_registry(write_models_file(tmp_path, text)).models["v"]
    assert (spec.prediction, spec.zero_terminal_snr) == ("v", True)
    loaded = load_single_file(spec, torch.float32)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.rescale_betas_zero_snr is True


def test_package_data_ships_every_bundled_config() -> None:
    """pyproject's package-data globs cover every file under app/configs (an installed server
    loads single files offline from them)."""
    import fnmatch
    import re

    root = Path(__file__).resolve().parents[1]
    line = re.search(r"(?m)^app = \[(.*)\]$", (root / "pyproject.toml").read_text())
    assert line, "pyproject.toml: no `app = [...]` under package-data"
    globs = re.findall(r'"([^"]+)"', line[1])
    files = [p.relative_to(root / "app").as_posix() for p in BUNDLED_CONFIGS.rglob("*") if p.is_file()]
    assert files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/")
                                             for g in globs)]
    assert unshipped == []
