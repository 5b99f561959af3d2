"""ControlNet files in the original (LDM) layout, lllyasviel's ControlNet 1.0/1.1 files: as
`.safetensors` and as `.pth` pickles (weights-only), with and without the `control_model.`
prefix, served beside the diffusers layouts.

The test writes the files itself from a tiny diffusers ControlNet: app.engine.single_file's UNet
name mapping (checked against diffusers' converters in tests/test_single_file.py) for the
encoder copy, the ControlNet's own layers by hand. That the files really are in the original
layout is checked against diffusers' own converter, `convert_controlnet_checkpoint`, which must
give back the net's tensors; the pictures a unit makes are checked against diffusers'
ControlNet pipeline called directly with the diffusers-layout net.
"""

from __future__ import annotations

import logging
import pickle
import zipfile

import numpy as np
import pytest
import torch

from app.engine.single_file import unet_mapper
from tests.conftest import API_KEY
from tests.controlnet_files import controlnet_models, tiny_controlnet
from tests.pictures import arr, b64, decoded, noise
from tests.test_controlnet import close, direct

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTROL = noise(64, 64, seed=5)


def original_state(net, prefix: str = "") -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The net's tensors under the names lllyasviel's ControlNet files use."""
    hint = sorted({int(k.split(".")[2]) for k in net.state_dict()
                   if k.startswith("controlnet_cond_embedding.blocks.")})
    mapper = unet_mapper(dict(net.config))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in net.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "controlnet_down_blocks":
            index, _, part = rest.partition(".")
            key = f"zero_convs.{index}.0.{part}"
        elif head == "controlnet_mid_block":
            key = f"middle_block_out.{0}.{rest}"
        elif name.startswith("controlnet_cond_embedding.conv_in."):
            key = "input_hint_block.0." + name.rsplit(".", 1)[1]
        elif name.startswith("controlnet_cond_embedding.conv_out."):
            key = f"input_hint_block.{2 * (len(hint) + 1)}." + name.rsplit(".", 1)[1]
        elif name.startswith("controlnet_cond_embedding.blocks."):
            index, part = name.split(".")[2:]
            key = f"input_hint_block.{2 * (int(index) + 1)}.{part}"
        else:
            key = mapper(name)
        out[prefix + key] = tensor.detach().clone()
    return out


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_the_written_files_are_what_diffusers_converter_reads(family: str) -> None:
    """The test's own original-layout writer is right: diffusers' converter gives the net back
    (it leaves out SDXL's add_embedding, label_emb.0 in the original layout; checked by name)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    net = tiny_controlnet(family)
    state = original_state(net, "control_model.")
    converted = convert_controlnet_checkpoint(state, dict(net.config))
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith("add_embedding.")}
    assert set(converted) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key
    if family == "sdxl":
        assert torch.equal(state["control_model.label_emb.0.0.weight"],
                           net.state_dict()["add_embedding.linear_1.weight"])


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("original-controlnets")
    xl, sd = tiny_controlnet("sdxl"), tiny_controlnet("sd15", seed=2)
    # a ControlNet 1.0-style whole checkpoint: control_model.* beside a model's own tensors
    whole = {**original_state(xl, "control_model."), "model.diffusion_model.out.2.weight": torch.ones(2)}
    torch.save(whole, folder / "control_xl_whole.pth")
    # a ControlNet 1.1 fp16 .safetensors: no prefix
    save_file({k: v.half().contiguous() for k, v in original_state(sd).items()},
              str(folder / "control_sd15_fp16.safetensors"))
    # the same stem as a .safetensors and a .pth: the .safetensors file is served
    save_file({k: v.contiguous() for k, v in original_state(sd).items()}, str(folder / "twin.safetensors"))
    torch.save({"junk": torch.zeros(1)}, folder / "twin.pth")

    class Payload:  # a pickle the weights-only unpickler refuses
        def __reduce__(self):  # noqa: ANN204
            return (print, ("this must never run",))

    torch.save({"control_model.input_hint_block.0.weight": Payload()}, folder / "evil.pth")
    with open(folder / "legacy.pt", "wb") as handle:  # a legacy (non-zip) torch pickle
        torch.save(original_state(sd), handle, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(folder / "control_xl_whole.pth")
    assert not zipfile.is_zipfile(folder / "legacy.pt")
    return {"folder": folder, "sdxl": xl, "sd15": sd}


@pytest.fixture(scope="module")
def cn_server(make_server, nets):  # noqa: ANN001, ANN201
    return make_server(controlnet_models(nets["folder"]))


@pytest.fixture()
def http(cn_server):  # noqa: ANN001, ANN201
    with cn_server.client() as c:
        yield c


def txt2img(http, model: str, units: list, status: int = 200) -> dict:  # noqa: ANN001
    body = {"prompt": "a lighthouse", "steps": 5, "width": 64, "height": 64, "seed": 11,
            "sampler_name": "Euler", "cfg_scale": 5, "override_settings": {"sd_model_checkpoint": model},
            "alwayson_scripts": {"controlnet": {"args": units}}}
    answer = http.post("/sdapi/v1/txt2img", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    return answer.json()


def unit(model: str, **fields) -> dict:
    return {"enabled": True, "module": "none", "model": model, "image": b64(CONTROL), **fields}


def test_original_layout_files_are_listed_and_the_refused_pickles_are_not(http) -> None:  # noqa: ANN001
    titles = http.get("/controlnet/model_list", headers=AUTH).json()["model_list"]
    listed = {t.rsplit(" [", 1)[0] for t in titles}
    assert listed == {"control_xl_whole", "control_sd15_fp16", "twin"}


def test_a_whole_checkpoint_pth_in_the_original_layout_is_the_diffusers_net(http, nets) -> None:  # noqa: ANN001
    got = txt2img(http, "tiny-sdxl", [unit("control_xl_whole", weight=0.8, save_detected_map=False)])
    expected = direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.8)
    close(arr(decoded(got["images"][0])), expected)
    plain = direct("sdxl", nets["sdxl"], controlnet_conditioning_scale=0.0)
    assert np.abs(arr(decoded(got["images"][0])) - plain).mean() > 1  # the unit did something


def test_an_fp16_original_safetensors_on_sd15(http, nets) -> None:  # noqa: ANN001
    from diffusers import ControlNetModel

    got = txt2img(http, "tiny-sd15", [unit("control_sd15_fp16", save_detected_map=False)])
    # the file holds half-precision values: the reference net is the same net rounded so
    rounded = ControlNetModel.from_config(nets["sd15"].config)
    rounded.load_state_dict({k: v.half().float() for k, v in nets["sd15"].state_dict().items()})
    close(arr(decoded(got["images"][0])), direct("sd15", rounded.eval()))


def test_an_original_file_of_the_other_family_is_refused_naming_a_layer(http) -> None:  # noqa: ANN001
    answer = http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "x", "steps": 2, "width": 64, "height": 64,
        "alwayson_scripts": {"controlnet": {"args": [unit("control_sd15_fp16")]}}})
    assert answer.status_code == 422, answer.text
    assert "does not fit model 'tiny-sdxl'" in answer.text and "its layer" in answer.text


def test_refused_pickles_are_skipped_naming_why(tmp_path, caplog) -> None:  # noqa: ANN001
    from app.controlnet_files import discover_controlnets

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("never",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with open(tmp_path / "legacy.pt", "wb") as handle:
        torch.save({"x": torch.zeros(1)}, handle, _use_new_zipfile_serialization=False)
    torch.save({"x": torch.zeros(1)}, tmp_path / "nothing.ckpt")
    with caplog.at_level(logging.WARNING):
        assert discover_controlnets([tmp_path]) == {}
    text = caplog.text
    assert "'evil'" in text and "weights-only unpickler refuses it" in text
    assert "'legacy'" in text and "legacy (non-zip)" in text
    assert "'nothing'" in text and "holds no ControlNet" in text
    with pytest.raises(pickle.UnpicklingError):  # what the server's load refuses, torch refuses
        torch.load(tmp_path / "evil.pth", weights_only=True)


def test_a_controlnet_file_added_or_removed_is_seen_by_a_reload(make_server, tmp_path, nets) -> None:  # noqa: ANN001
    """POST /admin/reload serves a ControlNet dropped into controlnet_dirs (an original-layout
    .pth here) and stops serving one removed."""
    folder = tmp_path / "cn"
    folder.mkdir()
    server = make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
controlnet_dirs: ["{folder}"]
""", api_keys=[f"{API_KEY}  admin"], reload_interval_s=0)
    with server.client() as http:
        assert http.get("/controlnet/model_list", headers=AUTH).json()["model_list"] == []
        txt2img(http, "tiny-sdxl", [unit("late")], status=422)
        torch.save(original_state(nets["sdxl"], "control_model."), folder / "late.pth")
        assert http.post("/admin/reload", headers=AUTH).status_code == 200
        titles = http.get("/controlnet/model_list", headers=AUTH).json()["model_list"]
        assert [t.rsplit(" [", 1)[0] for t in titles] == ["late"]
        got = txt2img(http, "tiny-sdxl", [unit("late", save_detected_map=False)])
        close(arr(decoded(got["images"][0])), direct("sdxl", nets["sdxl"]))
        (folder / "late.pth").unlink()
        assert http.post("/admin/reload", headers=AUTH).status_code == 200
        assert http.get("/controlnet/model_list", headers=AUTH).json()["model_list"] == []
        txt2img(http, "tiny-sdxl", [unit("late")], status=422)
