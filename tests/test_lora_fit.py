"""LoRAs matched to models by their layers (app.engine.lora_fit), not by guessed families.

The truth each test compares against is the tiny models' own configs (app.engine.tiny): which
blocks have attention, and the widths of their layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from app.engine.lora_fit import architecture_of, match_loras
from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
from app.registry import load_registry
from tests.conftest import body, png
from tests.lora_files import write_kohya_lora, write_peft_lora

KINDS = ("peft", "kohya", "kohya_sgm", "unet_only")


@pytest.fixture(scope="module")
def pipes():
    return {"sdxl": build_tiny_sdxl(), "sd15": build_tiny_sd15()}


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory) -> Path:
    """A non-stock SDXL-like architecture as a diffusers folder: the tiny SDXL with a wider
    second block (96 channels instead of 64). No family table could know it."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    base = build_tiny_sdxl()
    config = dict(base.unet.config)
    config["block_out_channels"] = (32, 96)
    config["attention_head_dim"] = (2, 6)
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config(config)
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                     text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                     tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler)
    folder = tmp_path_factory.mktemp("wide") / "wide-sdxl"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, pipes, wide_folder) -> dict[str, Path]:
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("fit")
    out: dict[str, Path] = {}
    for family, pipe in pipes.items():
        out[f"{family}-peft"] = write_peft_lora(pipe, root / f"{family}-peft.safetensors")
        out[f"{family}-kohya"] = write_kohya_lora(pipe, root / f"{family}-kohya.safetensors")
        other = "sgm" if family == "sd15" else "diffusers"
        out[f"{family}-kohya_sgm"] = write_kohya_lora(pipe, root / f"{family}-kohya_sgm.safetensors",
                                                     unet_naming=other)
        out[f"{family}-unet_only"] = write_kohya_lora(pipe, root / f"{family}-unet_only.safetensors",
                                                     text_encoder=False)
    wide = StableDiffusionXLPipeline.from_pretrained(wide_folder)
    out["wide-peft"] = write_peft_lora(wide, root / "wide-peft.safetensors", text_encoder=False)
    return out


def _registry(tmp_path: Path, models: str, loras: dict[str, Path], declared: dict[str, str] | None = None):
    declared = declared or {}
    lines = ["models:", models, "loras:"]
    for name, path in loras.items():
        family = f", family: {declared[name]}" if name in declared else ""
        lines.append(f"  {name}: {{path: {path}{family}}}")
    file = tmp_path / "models.yaml"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    registry = load_registry(file)
    match_loras(registry)
    return registry


TINY_MODELS = "  xl: {source: builtin:tiny-sdxl}\n  sd: {source: builtin:tiny-sd15}"


def test_architecture_is_the_models_own(pipes):
    """The meta-device description lists exactly the Linear/Conv2d layers of the real model."""
    from app.registry import ModelSpec

    spec = ModelSpec(name="xl", source="builtin:tiny-sdxl", kind="builtin", family="sdxl",
                     family_known=True, default_sampler=None, dtype="auto", vae=None, preload=False)
    arch = architecture_of(spec)
    unet = pipes["sdxl"].unet
    expected = {n: tuple(m.weight.shape) for n, m in unet.named_modules()
                if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    assert dict(arch.layers["unet"]) == expected
    # cross-attention keys read the two text encoders' widths concatenated (2 x 32)
    assert arch.layers["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (64, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_each_lora_fits_its_own_model_only(tmp_path, files, kind):
    registry = _registry(tmp_path, TINY_MODELS, {"for-xl": files[f"sdxl-{kind}"],
                                                 "for-sd": files[f"sd15-{kind}"]})
    xl, sd = registry.loras["for-xl"], registry.loras["for-sd"]
    assert xl.error is None and sd.error is None
    assert xl.fits["xl"] is None and sd.fits["sd"] is None
    assert xl.fits["sd"] and sd.fits["xl"]
    assert registry.lora_names("sdxl") == ["for-xl"]
    assert registry.lora_names("sd15") == ["for-sd"]


def test_misfit_names_the_first_layer_and_both_shapes(tmp_path):
    """An SDXL-style cross-attention LoRA made for a 32-wide text conditioning: the tiny SDXL's
    to_k of block 1 reads 64 (2 x 32) features and writes 64 (block_out_channels[1])."""
    layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    path = tmp_path / "narrow.safetensors"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, 32),
               f"{layer}.lora_B.weight": torch.zeros(64, 4)}, str(path))
    registry = _registry(tmp_path, TINY_MODELS, {"narrow": path})
    assert registry.loras["narrow"].fits["xl"] == (
        "does not fit model 'xl' (SDXL): layer "
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k has weight [64, 64] "
        "(out, in), the LoRA's down matrix is [4, 32] and its up matrix [64, 4]"
    )
    # the tiny SD 1.x has no attention in its second down block
    assert "matches no layer of the model" in registry.loras["narrow"].fits["sd"]
    assert registry.lora_names() == []


def test_non_stock_architecture_is_matched_without_any_table(tmp_path, files, wide_folder):
    """The issue's case: a LoRA for a model of another shape used to be refused as "cannot
    tell" even with `family:` declared. Now it fits the model whose layers it matches."""
    models = TINY_MODELS + f"\n  wide: {{source: {wide_folder}}}"
    registry = _registry(tmp_path, models, {"wide-style": files["wide-peft"],
                                            "declared": files["wide-peft"]},
                         declared={"declared": "sdxl"})
    for name in ("wide-style", "declared"):
        lora = registry.loras[name]
        assert lora.error is None
        assert lora.fits["wide"] is None
        # the first layer by name: block 1's self-attention, 96 channels where tiny-sdxl has 64
        assert lora.fits["xl"] == (
            "does not fit model 'xl' (SDXL): layer "
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k has weight [64, 64] "
            "(out, in), the LoRA's down matrix is [4, 96] and its up matrix [96, 4]"
        )
    assert registry.lora_names("sdxl") == ["declared", "wide-style"]


def test_declared_family_is_honoured(tmp_path, pipes):
    """A text-encoder-only LoRA fits both tiny models (their first text encoders are alike):
    undeclared it is listed under both families, declared only under its own."""
    layer = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    path = tmp_path / "te.safetensors"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, 32),
               f"{layer}.lora_B.weight": torch.zeros(32, 4)}, str(path))
    registry = _registry(tmp_path, TINY_MODELS, {"te": path, "te-sd": path}, declared={"te-sd": "sd15"})
    assert registry.loras["te"].fits == {"xl": None, "sd": None}
    assert registry.lora_names("sdxl") == ["te"]
    assert registry.lora_names("sd15") == ["te", "te-sd"]
    assert "declared an SD 1.x LoRA" in registry.loras["te-sd"].fits["xl"]


def test_a_lora_that_fits_nothing_is_listed_nowhere_with_a_warning(tmp_path, files, caplog):
    with caplog.at_level(logging.WARNING, logger="app.engine.lora_fit"):
        registry = _registry(tmp_path, "  xl: {source: builtin:tiny-sdxl}", {"orphan": files["sd15-peft"]})
    assert registry.lora_names() == []
    assert any("'orphan'" in r.message and "listed nowhere" in r.message for r in caplog.records)


def test_non_stock_model_serves_its_lora_over_http(make_server, files, wide_folder, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "wide-style.safetensors").write_bytes(files["wide-peft"].read_bytes())
    (folder / "xl-style.safetensors").write_bytes(files["sdxl-peft"].read_bytes())
    server = make_server(
        "models:\n"
        "  tiny-sdxl: {source: builtin:tiny-sdxl}\n"
        f"  wide: {{source: {wide_folder}}}\n"
        f"lora_dirs: [{folder}]\n"
    )
    with server.client() as c:
        assert c.get("/sd/loras-sdxl").json() == ["wide-style", "xl-style"]
        base = c.post("/sd", json=body(model="wide"))
        styled = c.post("/sd", json=body(model="wide", loras={"wide-style": 1.0}))
        png(base), png(styled)
        assert base.content != styled.content
        wrong: httpx.Response = c.post("/sd", json=body(model="tiny-sdxl", loras={"wide-style": 1.0}))
        assert wrong.status_code == 422
        detail = wrong.json()["detail"]
        assert detail.startswith("lora 'wide-style': does not fit model 'tiny-sdxl' (SDXL): layer unet.")
        assert "doesn't have loras" in detail
        assert c.post("/sd", json=body(model="wide")).content == base.content


STOCK_MODELS = ("  xl: {source: stabilityai/stable-diffusion-xl-base-1.0, family: sdxl}\n"
                "  sd: {source: stable-diffusion-v1-5/stable-diffusion-v1-5, family: sd15}")


def _kohya(path: Path, layers: dict[str, tuple[int, int]]) -> Path:
    """A kohya-named LoRA of zero tensors with real widths: {layer: (in, out)}, rank 4."""
    state = {}
    for layer, (fan_in, fan_out) in layers.items():
        state[f"{layer}.lora_down.weight"] = torch.zeros(4, fan_in)
        state[f"{layer}.lora_up.weight"] = torch.zeros(fan_out, 4)
        state[f"{layer}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    ("layers", "fits"),
    [
        # SDXL as kohya names it: SGM blocks; input block 4 = down block 1 (640 channels),
        # its cross-attention reads both text encoders (768 + 1280 = 2048)
        ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (2048, 640)}, {"xl"}),
        # with SDXL's second text encoder (OpenCLIP bigG, 1280 wide), which SD 1.x lacks
        ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (2048, 640),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
          "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": (1280, 1280)}, {"xl"}),
        # SD 1.x: attention in the first down block (320 channels) reading CLIP-L (768)
        ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320)}, {"sd"}),
        # CLIP-L alone: both families have it, so it fits both
        ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
          "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (768, 768)}, {"xl", "sd"}),
        # SD 2.x: the same layer reading OpenCLIP-H (1024): fits neither
        ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (1024, 320)}, set()),
    ],
)
def test_real_world_layouts_against_the_stock_architectures(tmp_path, layers, fits):
    """Full-size SDXL 1.0 and SD 1.5 built from the bundled configs on the meta device; the
    widths are those of the published models."""
    path = _kohya(tmp_path / "lora.safetensors", layers)
    registry = _registry(tmp_path, STOCK_MODELS, {"real": path})
    lora = registry.loras["real"]
    assert lora.error is None
    assert {m for m, reason in lora.fits.items() if reason is None} == fits
