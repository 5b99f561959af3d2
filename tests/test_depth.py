"""The `depth_midas` preprocessor (alias `depth`): MiDaS DPT-Hybrid from
`dpt_hybrid-midas-501f0c75.pt` in models.yaml's `annotator_dir:`, run as transformers'
DPT-Hybrid, and sd-webui-controlnet's processing around it.

The original file's layout is stated by hand below (`original_layout`; isl-org/MiDaS
`DPTDepthModel(backbone="vitb_rn50_384")` over timm's `vit_base_resnet50_384`, as the
extension's `annotator/midas` builds it): `pretrained.model.` holds the ViT (`cls_token`,
`pos_embed` [1, 577, 768], `patch_embed.proj` 1x1 1024->768, `blocks.<0..11>` with `norm1`,
`attn.qkv` (fused, 3x768 rows), `attn.proj`, `norm2`, `mlp.fc1`/`fc2`, then `norm` and the
ImageNet classifier `head`) and its BiT stem (`patch_embed.backbone.stem.conv` 7x7 3->64,
`stem.norm`, `stages.<s>.blocks.<b>` bottlenecks `conv1..3`/`norm1..3` with a
`downsample.conv`/`downsample.norm` in each stage's first block; 3, 4, 9 blocks of 256, 512,
1024 channels); `pretrained.act_postprocess3/4` the readout projections (`.0.project.0`, a
linear 2x768->768) and the 1x1 convolutions (`.3`), for 4 the 3x3 stride-2 one (`.4`);
`scratch.layer1..4_rn` (3x3, no bias, to 256), `scratch.refinenet1..4` (`out_conv` 1x1,
`resConfUnit1/2.conv1/2` 3x3) and `scratch.output_conv.0/2/4` (the head).

The served net is the real size (123M parameters); the fast tests use the same layout at
narrow widths (the key mapping does not depend on them), the real size is a slow test.
The expected depth comes from transformers' `DPTForDepthEstimation` run directly on the same
weights, put in its names by `to_transformers` here (written from the layout above), and the
extension's processing (short side to the resolution, edge padding to multiples of 64,
x / 127.5 - 1, minus the minimum, over the maximum, times 255, truncated) redone with
NumPy and OpenCV.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

from app.annotator_files import discover_annotators
from app.engine import annotators
from app.engine.midas import DepthNet
from app.engine.preprocessors import check_preprocessor, detect, served_preprocessors
from app.errors import InvalidParameter
from tests.conftest import API_KEY
from tests.pictures import b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FILE = "dpt_hybrid-midas-501f0c75.pt"
REAL = {"hidden": 768, "mlp": 3072, "stem": 64, "stages": (256, 512, 1024), "depths": (3, 4, 9),
        "neck": (768, 768), "fusion": 256, "heads": 12, "groups": 32}
# narrow, with every width different so that a swapped tensor shows (bottlenecks a quarter
# wide, multiples of 8 as timm and transformers round them)
TINY = {"hidden": 32, "mlp": 48, "stem": 8, "stages": (32, 64, 96), "depths": (1, 2, 2),
        "neck": (24, 40), "fusion": 16, "heads": 2, "groups": 4}


def original_layout(s: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original file and its shape, at the sizes `s`."""
    h, f = s["hidden"], s["fusion"]
    out: dict[str, tuple[int, ...]] = {}
    vit, bit = "pretrained.model.", "pretrained.model.patch_embed.backbone."
    out[bit + "stem.conv.weight"] = (s["stem"], 3, 7, 7)
    out[bit + "stem.norm.weight"] = out[bit + "stem.norm.bias"] = (s["stem"],)
    cin = s["stem"]
    for stage, (width, count) in enumerate(zip(s["stages"], s["depths"], strict=True)):
        mid = width // 4
        for block in range(count):
            p = f"{bit}stages.{stage}.blocks.{block}."
            if block == 0:
                out[p + "downsample.conv.weight"] = (width, cin, 1, 1)
                out[p + "downsample.norm.weight"] = out[p + "downsample.norm.bias"] = (width,)
            out[p + "conv1.weight"] = (mid, cin if block == 0 else width, 1, 1)
            out[p + "conv2.weight"] = (mid, mid, 3, 3)
            out[p + "conv3.weight"] = (width, mid, 1, 1)
            for norm, size in (("norm1", mid), ("norm2", mid), ("norm3", width)):
                out[f"{p}{norm}.weight"] = out[f"{p}{norm}.bias"] = (size,)
        cin = width
    out[vit + "patch_embed.proj.weight"] = (h, s["stages"][-1], 1, 1)
    out[vit + "patch_embed.proj.bias"] = (h,)
    out[vit + "cls_token"] = (1, 1, h)
    out[vit + "pos_embed"] = (1, 24 * 24 + 1, h)
    for i in range(12):
        p = f"{vit}blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{p}{norm}.weight"] = out[f"{p}{norm}.bias"] = (h,)
        out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = (3 * h, h), (3 * h,)
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = (h, h), (h,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (s["mlp"], h), (s["mlp"],)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (h, s["mlp"]), (h,)
    out[vit + "norm.weight"] = out[vit + "norm.bias"] = (h,)
    out[vit + "head.weight"], out[vit + "head.bias"] = (1000, h), (1000,)
    for post, width in ((3, s["neck"][0]), (4, s["neck"][1])):
        p = f"pretrained.act_postprocess{post}."
        out[p + "0.project.0.weight"], out[p + "0.project.0.bias"] = (h, 2 * h), (h,)
        out[p + "3.weight"], out[p + "3.bias"] = (width, h, 1, 1), (width,)
    p = "pretrained.act_postprocess4.4."
    out[p + "weight"], out[p + "bias"] = (s["neck"][1], s["neck"][1], 3, 3), (s["neck"][1],)
    for i, width in enumerate((*s["stages"][:2], *s["neck"]), start=1):
        out[f"scratch.layer{i}_rn.weight"] = (f, width, 3, 3)
    for i in range(1, 5):
        p = f"scratch.refinenet{i}."
        out[p + "out_conv.weight"], out[p + "out_conv.bias"] = (f, f, 1, 1), (f,)
        for unit in (1, 2):
            for conv in (1, 2):
                out[f"{p}resConfUnit{unit}.conv{conv}.weight"] = (f, f, 3, 3)
                out[f"{p}resConfUnit{unit}.conv{conv}.bias"] = (f,)
    p = "scratch.output_conv."
    out[p + "0.weight"], out[p + "0.bias"] = (f // 2, f, 3, 3), (f // 2,)
    out[p + "2.weight"], out[p + "2.bias"] = (32, f // 2, 3, 3), (32,)
    out[p + "4.weight"], out[p + "4.bias"] = (1, 32, 1, 1), (1,)
    return out


def hf_config(s: dict) -> DPTConfig:
    """transformers' DPT-Hybrid at the sizes `s` (as its conversion of the MiDaS file sets it)."""
    bit = BitConfig(global_padding="same", layer_type="bottleneck", depths=list(s["depths"]),
                    hidden_sizes=[*s["stages"], 2 * s["stages"][-1]], embedding_size=s["stem"],
                    num_groups=s["groups"], out_features=["stage1", "stage2", "stage3"],
                    embedding_dynamic_padding=True)
    return DPTConfig(is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, s["stages"][-1], 24, 24],
                     hidden_size=s["hidden"], num_attention_heads=s["heads"], intermediate_size=s["mlp"],
                     layer_norm_eps=1e-6, image_size=384, readout_type="project",
                     backbone_out_indices=[0, 1, 8, 11], neck_hidden_sizes=[*s["stages"][:2], *s["neck"]],
                     reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=s["fusion"])


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The test's own renaming of an original-layout state dict (the classifier dropped)."""
    out = {}
    for key, tensor in state.items():
        part = key.split(".")
        if key.startswith("pretrained.model.head."):
            continue
        if key.startswith("pretrained.model.patch_embed.backbone.stem."):
            name = {"conv": "convolution", "norm": "norm"}[part[5]]
            out[f"dpt.embeddings.backbone.bit.embedder.{name}.{part[6]}"] = tensor
        elif key.startswith("pretrained.model.patch_embed.backbone.stages."):
            rest = ".".join(part[8:])
            out[f"dpt.embeddings.backbone.bit.encoder.stages.{part[5]}.layers.{part[7]}.{rest}"] = tensor
        elif key.startswith("pretrained.model.patch_embed.proj."):
            out[f"dpt.embeddings.projection.{part[-1]}"] = tensor
        elif key == "pretrained.model.cls_token":
            out["dpt.embeddings.cls_token"] = tensor
        elif key == "pretrained.model.pos_embed":
            out["dpt.embeddings.position_embeddings"] = tensor
        elif key.startswith("pretrained.model.blocks."):
            layer, what, kind = f"dpt.encoder.layer.{part[3]}.", ".".join(part[4:6]), part[-1]
            if what == "attn.qkv":
                q, k, v = tensor.split(tensor.shape[0] // 3)
                for name, piece in (("query", q), ("key", k), ("value", v)):
                    out[f"{layer}attention.attention.{name}.{kind}"] = piece
                continue
            target = {"norm1.weight": "layernorm_before", "norm1.bias": "layernorm_before",
                      "norm2.weight": "layernorm_after", "norm2.bias": "layernorm_after",
                      "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                      "mlp.fc2": "output.dense"}[what]
            out[f"{layer}{target}.{kind}"] = tensor
        elif key.startswith("pretrained.model.norm."):
            out[f"dpt.layernorm.{part[-1]}"] = tensor
        elif key.startswith("pretrained.act_postprocess"):
            stage = int(key[len("pretrained.act_postprocess")]) - 1  # 3 -> 2, 4 -> 3
            if part[2] == "0":
                out[f"neck.reassemble_stage.readout_projects.{stage}.0.{part[-1]}"] = tensor
            else:
                name = "projection" if part[2] == "3" else "resize"
                out[f"neck.reassemble_stage.layers.{stage}.{name}.{part[-1]}"] = tensor
        elif key.startswith("scratch.layer"):
            out[f"neck.convs.{int(part[1][5]) - 1}.weight"] = tensor
        elif key.startswith("scratch.refinenet"):
            layer = f"neck.fusion_stage.layers.{4 - int(part[1][-1])}."
            if part[2] == "out_conv":
                out[f"{layer}projection.{part[-1]}"] = tensor
            else:
                out[f"{layer}residual_layer{part[2][-1]}.convolution{part[3][-1]}.{part[-1]}"] = tensor
        elif key.startswith("scratch.output_conv."):
            out[f"head.head.{part[2]}.{part[3]}"] = tensor
        else:
            raise AssertionError(f"not in the layout: {key}")
    return out


def random_original(s: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in the original layout (scaled so that activations stay moderate)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_layout(s).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.1
        tensor = torch.randn(shape, generator=generator) * scale
        if "norm" in key and key.endswith(".weight") and len(shape) == 1:
            tensor = 1.0 + tensor
        state[key] = tensor
    return state


def reference(state: dict[str, torch.Tensor], s: dict, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' DPTForDepthEstimation run directly (its own forward) on a square picture."""
    model = DPTForDepthEstimation(hf_config(s)).eval()
    model.load_state_dict(to_transformers(state), strict=True)
    side = pixels.shape[-1]
    model.dpt.embeddings.image_size = (side, side)  # its forward takes only this size
    with torch.inference_mode():
        return model(pixel_values=pixels).predicted_depth


@pytest.fixture(scope="module")
def depth_file(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("annotators") / "downloads" / "midas"  # the extension's place
    folder.mkdir(parents=True)
    state = random_original(TINY, 5)
    torch.save(state, folder / FILE)
    return {"root": folder.parent.parent, "path": folder / FILE, "state": state}


@pytest.fixture(scope="module")
def depth_net(depth_file):  # noqa: ANN001, ANN201
    """The net as the server loads it (its cache, which the live server below shares), built at
    the narrow widths."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(annotators.NETS, FILE, lambda: DepthNet(hf_config(TINY)))
        annotators.NETS_CACHE.clear()
        return annotators.NETS_CACHE.get(FILE, depth_file["path"])


def test_every_tensor_of_the_layout_is_loaded_strictly(depth_file, depth_net) -> None:  # noqa: ANN001
    ours = to_transformers(depth_file["state"])
    loaded = depth_net.state_dict()
    assert set(loaded) == set(ours)  # every parameter filled, every tensor (but the classifier) used
    for key, tensor in ours.items():
        assert torch.equal(loaded[key], tensor), key
    # a file with a tensor the layout does not have, or without one it has, is refused
    bad = dict(depth_file["state"])
    bad["pretrained.model.extra.weight"] = torch.zeros(3)
    path = depth_file["path"].parent / "extra" / FILE
    path.parent.mkdir()
    torch.save(bad, path)
    with pytest.raises(annotators.AnnotatorFileError,
                       match=r"1 unexpected \(first pretrained.model.extra.weight\)"):
        _build_tiny(path)
    del bad["pretrained.model.extra.weight"], bad["scratch.layer2_rn.weight"]
    torch.save(bad, path)
    with pytest.raises(annotators.AnnotatorFileError,
                       match=r"1 tensors missing \(first neck.convs.1.weight\)"):
        _build_tiny(path)


def _build_tiny(path):  # noqa: ANN001, ANN202
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(annotators.NETS, FILE, lambda: DepthNet(hf_config(TINY)))
        return annotators.build_net(FILE, path)


@pytest.mark.parametrize("side", [384, 256])
def test_the_net_is_transformers_dpt_hybrid(depth_file, depth_net, side) -> None:  # noqa: ANN001
    pixels = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(side)) * 2 - 1
    expected = reference(depth_file["state"], TINY, pixels)
    with torch.inference_mode():
        got = depth_net.depth(pixels)
    assert got.shape == (1, side, side)
    assert float(expected.std()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_detect_processes_as_the_extension(depth_file, depth_net) -> None:  # noqa: ANN001
    picture = noise(250, 200, seed=3)
    files = discover_annotators(depth_file["root"])
    got = np.asarray(detect(check_preprocessor("module", "depth_midas", files), picture, resolution=200,
                            files=files))
    # at resolution 200 the picture keeps its size; edge-padded to 256 x 256
    array = np.asarray(picture)
    padded = np.pad(array, ((0, 56), (0, 6), (0, 0)), mode="edge")
    pixels = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    found = reference(depth_file["state"], TINY, pixels)[0].numpy().astype(np.float32)
    found = found - found.min()
    found = found / found.max()
    expected = (found * 255.0).clip(0, 255).astype(np.uint8)[:200, :250]
    assert got.shape == (200, 250, 3)
    assert (got[:, :, 0] == got[:, :, 1]).all() and (got[:, :, 0] == got[:, :, 2]).all()
    difference = np.abs(got[:, :, 0].astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert expected.std() > 0

    # a picture resized first: short side to the resolution (area when shrinking)
    small = np.asarray(detect(check_preprocessor("module", "depth", discover_annotators(depth_file["root"])),
                              noise(500, 400, seed=3), resolution=200,
                              files=discover_annotators(depth_file["root"])))
    shrunk = cv2.resize(np.asarray(noise(500, 400, seed=3)), (250, 200), interpolation=cv2.INTER_AREA)
    padded = np.pad(shrunk, ((0, 56), (0, 6), (0, 0)), mode="edge")
    pixels = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    found = reference(depth_file["state"], TINY, pixels)[0].numpy()
    found = (found - found.min()) / (found - found.min()).max()
    expected = (found * 255.0).clip(0, 255).astype(np.uint8)[:200, :250]
    assert np.abs(small[:, :, 0].astype(int) - expected.astype(int)).max() <= 1


def test_a_flat_depth_is_black_not_a_division_by_zero(depth_file, depth_net, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(type(depth_net), "depth", lambda self, x: torch.full(x.shape[:1] + x.shape[2:], 3.0))
    out = annotators.depth(np.zeros((64, 64, 3), np.uint8), depth_file["path"])
    assert out.shape == (64, 64) and out.dtype == np.uint8 and not out.any()


def test_served_only_with_the_file(depth_file) -> None:  # noqa: ANN001
    assert "depth_midas" not in served_preprocessors(None)
    with pytest.raises(InvalidParameter) as caught:
        check_preprocessor("module", "depth", discover_annotators(depth_file["root"] / "elsewhere"))
    assert f"depth_midas needs {FILE} in models.yaml's annotator_dir" in caught.value.message
    files = discover_annotators(depth_file["root"])
    assert files.path(FILE) == depth_file["path"].resolve()
    module = check_preprocessor("module", "Depth", files)
    assert module.name == "depth_midas" and "depth_midas" in served_preprocessors(files)
    assert module.control_type == "Depth" and module.weights == FILE


@pytest.fixture(scope="module")
def depth_server(make_server, depth_file):  # noqa: ANN001, ANN201
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl"}}
annotator_dir: "{depth_file['root']}"
""")


def test_listed_and_detected_over_http(depth_server, depth_net) -> None:  # noqa: ANN001
    with depth_server.client() as http:
        modules = http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]
        assert "depth_midas" in modules
        types = http.get("/controlnet/control_types", headers=AUTH).json()["control_types"]
        assert types["Depth"]["module_list"] == ["depth_midas"]
        assert types["Depth"]["default_option"] == "depth_midas"
        answer = http.post("/controlnet/detect", headers=AUTH, json={
            "controlnet_module": "depth_midas", "controlnet_input_images": [b64(noise(90, 70, seed=2))],
            "controlnet_processor_res": 64})
        assert answer.status_code == 200, answer.text
        image = decoded(answer.json()["images"][0])
        assert image.size == (82, 64)  # short side 64, 90 * 64 / 70
        array = np.asarray(image.convert("RGB"))
        assert (array[:, :, 0] == array[:, :, 1]).all() and (array[:, :, 0] == array[:, :, 2]).all()
    assert FILE in annotators.NETS_CACHE.loaded()


def test_without_the_file_it_is_not_listed_and_detect_is_422(server) -> None:  # noqa: ANN001
    with server.client() as http:
        assert "depth_midas" not in http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]
        assert "Depth" not in http.get("/controlnet/control_types", headers=AUTH).json()["control_types"]
        answer = http.post("/controlnet/detect", headers=AUTH, json={
            "controlnet_module": "depth_midas", "controlnet_input_images": [b64(Image.new("RGB", (64, 64)))]})
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        f"This server doesn't have controlnet_module 'depth_midas': depth_midas needs {FILE} in "
        "an annotator folder, and models.yaml sets no annotator_dir")


@pytest.mark.slow
def test_the_real_size_file_loads_strictly(tmp_path) -> None:  # noqa: ANN001
    state = {key: torch.zeros(shape) for key, shape in original_layout(REAL).items()}
    path = tmp_path / FILE
    torch.save(state, path)
    del state
    net = annotators.build_net(FILE, path)
    assert sum(p.numel() for p in net.parameters()) == sum(
        int(np.prod(shape)) for key, shape in original_layout(REAL).items() if ".head." not in key)
