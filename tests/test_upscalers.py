"""Upscalers: latent modes, pixel built-ins and model files (app.engine.upscalers), and their
discovery from models.yaml's upscaler_dirs (app.upscaler_files, app.registry).

Model upscalers are tiny random networks the tests build from spandrel's own architecture
classes (ESRGAN's RRDBNet with 8 filters and 1 block, Real-ESRGAN's compact SRVGGNet) and save
as .safetensors or .pth; the expected images come from running those modules directly on a
tensor the test makes from the pixels, and from PIL's and torch's own resizes.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import app.engine.upscalers as upscalers_module
from app.engine.reload import fingerprint, reload_into
from app.engine.upscalers import (
    LATENT_MODES,
    PIXEL_BUILTINS,
    Upscalers,
    UpscalerSpec,
    discover_upscalers,
    import_spandrel,
    upscale_latents,
)
from app.errors import NotServed, UpscalerError
from app.registry import RegistryError, load_registry
from app.upscaler_files import LATENT_MODE_NAMES, scale_from_name

CPU = torch.device("cpu")
LEVEL = 1 / 255

import_spandrel()  # spandrel's torchvision imports need the stand-in where torchvision is unusable
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402

# A1111's modules/shared_items latent_upscale_modes, typed in again here
A1111_LATENT = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def tiny_esrgan(scale: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=scale).eval()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode)


def run_directly(module: torch.nn.Module, image: Image.Image) -> np.ndarray:
    """The module on the image's RGB pixels in [0, 1]: (H, W, 3) floats in [0, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = module(x).clamp(0, 1)
    return y[0].permute(1, 2, 0).numpy()


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def as_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8), "RGB")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "upscalers"
    path.mkdir()
    return path


def save_safetensors(module: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------- latents


def test_latent_modes_are_a1111s() -> None:
    assert LATENT_MODES == A1111_LATENT
    assert tuple(LATENT_MODES) == LATENT_MODE_NAMES  # what the registry keeps file names off


@pytest.mark.parametrize("mode", list(A1111_LATENT))
def test_upscale_latents_equals_interpolate(mode: str) -> None:
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 10)
    interpolation, antialias = A1111_LATENT[mode]
    expected = F.interpolate(latents, size=(128 // 8, 200 // 8), mode=interpolation, antialias=antialias)
    out = upscale_latents(latents, 128, 200, mode)
    assert out.shape == (2, 4, 16, 25)
    assert torch.equal(out, expected)


def test_unknown_latent_mode_is_not_served_and_names_the_modes() -> None:
    with pytest.raises(NotServed) as info:
        upscale_latents(torch.zeros(1, 4, 8, 8), 128, 128, "Latent (bilinear)")
    assert "Latent (bilinear)" in info.value.message
    assert "Latent (nearest-exact)" in info.value.message


# --------------------------------------------------------------------------- pixel built-ins


@pytest.mark.parametrize(("name", "resample"), [("Lanczos", Image.Resampling.LANCZOS),
                                                ("Nearest", Image.Resampling.NEAREST),
                                                ("None", Image.Resampling.LANCZOS)])
def test_builtins_equal_pils_resize(name: str, resample: Image.Resampling) -> None:
    image = noise_image(37, 23)
    out = Upscalers(CPU).upscale(image, name, 101, 57, {})
    assert out.size == (101, 57)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((101, 57), resample)))
    assert set(PIXEL_BUILTINS) == {"None", "Lanczos", "Nearest"}


def test_unknown_upscaler_names_the_served_ones(folder: Path) -> None:
    specs = {"4x-tiny": UpscalerSpec("4x-tiny", folder / "4x-tiny.safetensors", 4)}
    with pytest.raises(NotServed) as info:
        Upscalers(CPU).upscale(noise_image(8, 8), "4x-UltraSharp", 32, 32, specs)
    message = info.value.message
    assert "4x-UltraSharp" in message
    assert all(n in message for n in ("None", "Lanczos", "Nearest", "4x-tiny"))


@pytest.mark.parametrize(("width", "height"), [(0, 32), (32, -1), (20000, 32)])
def test_a_target_out_of_range_is_refused_naming_the_side(width: int, height: int) -> None:
    with pytest.raises(Exception) as info:
        Upscalers(CPU).upscale(noise_image(8, 8), "Lanczos", width, height, {})
    assert getattr(info.value, "status", None) == 422
    assert ("width" if width != 32 else "height") in info.value.message


# --------------------------------------------------------------------------- model upscalers


@pytest.mark.parametrize("scale", [2, 4])
def test_model_upscale_equals_the_model_run_directly(folder: Path, scale: int) -> None:
    module = tiny_esrgan(scale)
    save_safetensors(module, folder / f"{scale}x-tiny.safetensors")
    specs = discover_upscalers([folder])
    assert list(specs) == [f"{scale}x-tiny"] and specs[f"{scale}x-tiny"].scale == scale
    image = noise_image(24, 20)
    out = Upscalers(CPU).upscale(image, f"{scale}x-tiny", 24 * scale, 20 * scale, specs)
    assert out.size == (24 * scale, 20 * scale) and out.mode == "RGB"
    expected = run_directly(module, image)
    assert np.abs(as_float(out) - expected).max() <= LEVEL / 2 + 1e-6  # rounding to 8 bits only


def test_a_weights_only_pth_serves_like_its_safetensors(folder: Path) -> None:
    module = tiny_esrgan(2, seed=3)
    torch.save({"params_ema": module.state_dict()}, folder / "RealESRGAN_x2plus.pth")  # Real-ESRGAN's layout
    specs = discover_upscalers([folder])
    assert specs["RealESRGAN_x2plus"].scale == 2
    image = noise_image(16, 12, seed=2)
    out = Upscalers(CPU).upscale(image, "RealESRGAN_x2plus", 32, 24, specs)
    assert np.abs(as_float(out) - run_directly(module, image)).max() <= LEVEL / 2 + 1e-6


def test_another_family_loads_too(folder: Path) -> None:
    torch.manual_seed(5)
    module = Compact(num_feat=8, num_conv=2, upscale=4).eval()  # Real-ESRGAN's realesr-general-x4v3 kind
    save_safetensors(module, folder / "realesr-tiny-x4.safetensors")
    specs = discover_upscalers([folder])
    upscalers = Upscalers(CPU)
    image = noise_image(10, 14, seed=4)
    out = upscalers.upscale(image, "realesr-tiny-x4", 40, 56, specs)
    assert upscalers.model("realesr-tiny-x4", specs).architecture.name == "RealESRGAN Compact"
    assert np.abs(as_float(out) - run_directly(module, image)).max() <= LEVEL / 2 + 1e-6


def test_odd_target_is_one_pass_then_lanczos(folder: Path) -> None:
    module = tiny_esrgan(4)
    save_safetensors(module, folder / "4x-tiny.safetensors")
    image = noise_image(20, 16, seed=6)
    out = Upscalers(CPU).upscale(image, "4x-tiny", 70, 50, discover_upscalers([folder]))
    expected = as_image(run_directly(module, image)).resize((70, 50), Image.Resampling.LANCZOS)
    assert out.size == (70, 50)
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_model_runs_again_while_smaller_than_the_target(folder: Path) -> None:
    module = tiny_esrgan(2, seed=7)
    save_safetensors(module, folder / "2x-tiny.safetensors")
    specs = discover_upscalers([folder])
    upscalers = Upscalers(CPU)
    inputs: list[tuple[int, ...]] = []
    upscalers.model("2x-tiny", specs).model.register_forward_pre_hook(
        lambda _m, args: inputs.append(tuple(args[0].shape)))
    image = noise_image(12, 10, seed=8)
    out = upscalers.upscale(image, "2x-tiny", 48, 40, specs)
    assert inputs == [(1, 3, 10, 12), (1, 3, 20, 24)]  # 12x10 -> 24x20 -> 48x40
    twice = run_directly(module, as_image(run_directly(module, image)))
    assert np.abs(as_float(out) - twice).max() <= LEVEL / 2 + 1e-6


def test_a_target_no_larger_than_the_image_runs_no_model(folder: Path) -> None:
    save_safetensors(tiny_esrgan(2), folder / "2x-tiny.safetensors")
    upscalers = Upscalers(CPU)
    image = noise_image(30, 20)
    out = upscalers.upscale(image, "2x-tiny", 15, 10, discover_upscalers([folder]))
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((15, 10), Image.Resampling.LANCZOS)))
    assert upscalers.loaded() == []


def test_no_pass_makes_more_than_the_pixel_guard(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_safetensors(tiny_esrgan(2), folder / "2x-tiny.safetensors")
    specs = discover_upscalers([folder])
    upscalers = Upscalers(CPU)
    calls: list[int] = []
    upscalers.model("2x-tiny", specs).model.register_forward_pre_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(upscalers_module, "MAX_PASS_PIXELS", 24 * 20 * 4 - 1)
    image = noise_image(12, 10)
    out = upscalers.upscale(image, "2x-tiny", 48, 40, specs)  # 12x10 -> 24x20, then 48x40 is too many
    assert calls == [1]
    once = as_image(run_directly(tiny_esrgan(2), image)).resize((48, 40), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(once, dtype=int)).max() <= 1


def test_tiled_run_matches_the_untiled_one(folder: Path) -> None:
    save_safetensors(tiny_esrgan(2, seed=9), folder / "2x-tiny.safetensors")
    specs = discover_upscalers([folder])
    image = noise_image(70, 52, seed=10)
    untiled = Upscalers(CPU, tile=512).upscale(image, "2x-tiny", 140, 104, specs)
    tiled_upscalers = Upscalers(CPU, tile=32, overlap=16)
    inputs: list[tuple[int, ...]] = []
    progress: list[tuple[int, int]] = []
    tiled_upscalers.model("2x-tiny", specs).model.register_forward_pre_hook(
        lambda _m, args: inputs.append(tuple(args[0].shape)))
    tiled = tiled_upscalers.upscale(image, "2x-tiny", 140, 104, specs,
                                    on_tile=lambda done, total: progress.append((done, total)))
    # rows at 0, 10, 20 (52 px, tiles of 32 overlapping >= 16); columns at 0, 13, 25, 38
    assert len(inputs) == 12 and max(max(shape[2:]) for shape in inputs) == 32
    assert progress[-1] == (12, 12) and len(progress) == 12
    assert tiled.size == untiled.size == (140, 104)
    assert np.abs(np.asarray(tiled, dtype=int) - np.asarray(untiled, dtype=int)).max() <= 1


def test_alpha_and_greyscale_come_back_as_they_went_in(folder: Path) -> None:
    save_safetensors(tiny_esrgan(2), folder / "2x-tiny.safetensors")
    specs = discover_upscalers([folder])
    upscalers = Upscalers(CPU)
    rgba = noise_image(16, 12, seed=11, mode="RGBA")
    out = upscalers.upscale(rgba, "2x-tiny", 32, 24, specs)
    assert out.mode == "RGBA"
    alpha = rgba.getchannel("A").resize((32, 24), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha))
    grey = upscalers.upscale(noise_image(16, 12, seed=12, mode="L"), "2x-tiny", 32, 24, specs)
    assert grey.mode == "L" and grey.size == (32, 24)


# --------------------------------------------------------------------------- refusals

UNPICKLED: list[str] = []


def _record(what: str) -> str:
    UNPICKLED.append(what)
    return what


class RunsCodeWhenUnpickled:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record, ("code ran",))


def test_a_pth_that_needs_a_full_pickle_is_refused_without_running_it(folder: Path) -> None:
    state = dict(tiny_esrgan(2).state_dict())
    state["extra"] = RunsCodeWhenUnpickled()
    torch.save(state, folder / "2x-pickled.pth")
    specs = discover_upscalers([folder])
    with pytest.raises(UpscalerError) as info:
        Upscalers(CPU).upscale(noise_image(8, 8), "2x-pickled", 16, 16, specs)
    assert UNPICKLED == []
    assert info.value.status == 422
    message = info.value.message
    assert "2x-pickled" in message and "2x-pickled.pth" in message and "weights-only" in message
    assert str(folder) not in message


def test_a_training_file_with_more_than_weights_serves(folder: Path) -> None:
    module = tiny_esrgan(2, seed=4)
    torch.save({**module.state_dict(), "iter": 5000, "note": "a"}, folder / "2x-trained.pth")
    image = noise_image(8, 8)
    out = Upscalers(CPU).upscale(image, "2x-trained", 16, 16, discover_upscalers([folder]))
    assert np.abs(as_float(out) - run_directly(module, image)).max() <= LEVEL / 2 + 1e-6


def test_a_garbage_safetensors_is_skipped_at_discovery_and_refused_at_load(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    garbage = folder / "4x-garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + os.urandom(64))
    with caplog.at_level(logging.WARNING, logger="app.upscaler_files"):
        assert discover_upscalers([folder]) == {}
    assert "4x-garbage" in caplog.text
    spec = UpscalerSpec("4x-garbage", garbage, 4)  # e.g. overwritten after discovery
    with pytest.raises(UpscalerError) as info:
        Upscalers(CPU).upscale(noise_image(8, 8), "4x-garbage", 32, 32, {"4x-garbage": spec})
    assert "4x-garbage.safetensors" in info.value.message and str(folder) not in info.value.message


def test_files_that_are_no_upscaler_are_refused_naming_them(folder: Path) -> None:
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(folder / "mystery.safetensors"))
    save_safetensors(tiny_esrgan(1), folder / "1x-restore.safetensors")
    specs = discover_upscalers([folder])
    upscalers = Upscalers(CPU)
    with pytest.raises(UpscalerError, match=r"mystery\.safetensors is no model architecture spandrel"):
        upscalers.upscale(noise_image(8, 8), "mystery", 16, 16, specs)
    with pytest.raises(UpscalerError, match=r"1x-restore\.safetensors is a ESRGAN Restoration model"):
        upscalers.upscale(noise_image(8, 8), "1x-restore", 16, 16, specs)
    assert upscalers.loaded() == []


def test_a_missing_file_is_refused_naming_it(folder: Path) -> None:
    spec = UpscalerSpec("4x-gone", folder / "4x-gone.pth", 4)
    with pytest.raises(UpscalerError, match=r"4x-gone\.pth is missing on the server"):
        Upscalers(CPU).upscale(noise_image(8, 8), "4x-gone", 32, 32, {"4x-gone": spec})


def test_spandrel_import_leaves_no_stand_in_behind() -> None:
    module = sys.modules.get("torchvision")
    assert module is None or getattr(module, "__file__", None)  # the real package, or none


# --------------------------------------------------------------------------- loading


def test_models_load_once_lru_evicts_and_unload_frees(folder: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    save_safetensors(tiny_esrgan(2, seed=1), folder / "2x-a.safetensors")
    save_safetensors(tiny_esrgan(2, seed=2), folder / "2x-b.safetensors")
    specs = discover_upscalers([folder])
    loads: list[str] = []
    real = upscalers_module.load_descriptor

    def counting(spec: UpscalerSpec) -> object:
        loads.append(spec.name)
        return real(spec)

    monkeypatch.setattr(upscalers_module, "load_descriptor", counting)
    upscalers = Upscalers(CPU, capacity=1)
    image = noise_image(8, 8)
    upscalers.upscale(image, "2x-a", 16, 16, specs)
    upscalers.upscale(image, "2x-a", 16, 16, specs)
    assert loads == ["2x-a"] and upscalers.loaded() == ["2x-a"]
    upscalers.upscale(image, "2x-b", 16, 16, specs)
    assert loads == ["2x-a", "2x-b"] and upscalers.loaded() == ["2x-b"]
    gone = weakref.ref(upscalers.model("2x-b", specs).model)
    upscalers.unload()
    gc.collect()
    assert upscalers.loaded() == [] and gone() is None
    upscalers.upscale(image, "2x-b", 16, 16, specs)
    assert loads == ["2x-a", "2x-b", "2x-b"]


def test_a_file_replaced_on_disk_is_loaded_again(folder: Path) -> None:
    path = save_safetensors(tiny_esrgan(2, seed=1), folder / "2x-tiny.safetensors")
    specs = discover_upscalers([folder])
    upscalers = Upscalers(CPU)
    image = noise_image(12, 12, seed=3)
    upscalers.upscale(image, "2x-tiny", 24, 24, specs)
    replacement = tiny_esrgan(2, seed=2)
    save_safetensors(replacement, path)
    os.utime(path, ns=(1, 1))  # another mtime, whatever the clock's resolution
    out = upscalers.upscale(image, "2x-tiny", 24, 24, specs)
    assert np.abs(as_float(out) - run_directly(replacement, image)).max() <= LEVEL / 2 + 1e-6
    assert upscalers.loaded() == ["2x-tiny"]


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize(("name", "scale"), [
    ("4x-UltraSharp", 4), ("4x_foolhardy_Remacri", 4), ("4xNomos8kSC", 4), ("8x_NMKD-Superscale_150000_G", 8),
    ("RealESRGAN_x4plus", 4), ("RealESRGAN_x2plus", 2), ("RealESRGAN_x4plus_anime_6B", 4),
    ("realesr-general-x4v3", 4), ("ESRGAN_4x", 4), ("003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN", 4),
    ("UltraSharp", None), ("Remacri", None), ("lollypop", None),
])
def test_scale_is_read_from_the_name(name: str, scale: int | None) -> None:
    assert scale_from_name(name) == scale


def test_registry_lists_the_upscaler_dirs(tmp_path: Path, folder: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    save_safetensors(tiny_esrgan(4), folder / "4x-tiny.safetensors")
    torch.save(tiny_esrgan(2).state_dict(), folder / "RealESRGAN_x2plus.pth")
    torch.save(tiny_esrgan(2).state_dict(), folder / "4x-tiny.pth")  # the .safetensors wins
    save_safetensors(tiny_esrgan(2), folder / "Lanczos.safetensors")  # a built-in's name
    (folder / "old.pt").write_bytes(b"pickle")
    (folder / "notes.txt").write_text("not a model")
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m: {source: builtin:tiny-sd15}\nupscaler_dirs: [upscalers]\n",
                      encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="app.upscaler_files"):
        registry = load_registry(models)
    assert registry.upscalers == {
        "4x-tiny": UpscalerSpec("4x-tiny", (folder / "4x-tiny.safetensors").resolve(), 4),
        "RealESRGAN_x2plus": UpscalerSpec("RealESRGAN_x2plus",
                                          (folder / "RealESRGAN_x2plus.pth").resolve(), 2),
    }
    for skipped in ("4x-tiny.pth", "Lanczos.safetensors", "old.pt"):
        assert skipped in caplog.text


def test_registry_without_upscaler_dirs_lists_none(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m: {source: builtin:tiny-sd15}\n", encoding="utf-8")
    assert load_registry(models).upscalers == {}


def test_a_missing_upscaler_dir_stops_the_start_like_a_lora_dir(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m: {source: builtin:tiny-sd15}\nupscaler_dirs: [nowhere]\n",
                      encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        load_registry(models)
    assert str(models) in str(info.value) and "upscaler_dirs" in str(info.value)
    assert "nowhere" in str(info.value)


def test_a_reload_serves_the_upscalers_found_now(tmp_path: Path, folder: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m: {source: builtin:tiny-sd15}\nupscaler_dirs: [upscalers]\n",
                      encoding="utf-8")
    registry = load_registry(models)
    assert registry.upscalers == {}
    save_safetensors(tiny_esrgan(2), folder / "2x-new.safetensors")
    report, _ = reload_into(registry, {n: fingerprint(s) for n, s in registry.models.items()})
    assert report.error is None
    assert list(registry.upscalers) == ["2x-new"]
