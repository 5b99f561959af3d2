"""ControlNet preprocessors that need weights (app.engine.annotators): `annotator_dir:` in
models.yaml, the weight files under the names sd-webui-controlnet and `lllyasviel/Annotators`
use, listing only what is there, a clear 422 for what is not, weights-only loading.

The weight files are written here with random tensors in the published layouts, which are
stated by hand below (not read from the code under test):

- ControlNetHED.pth: `ControlNetHED_Apache2` of lllyasviel's ControlNet 1.1 annotators
  (sd-webui-controlnet `annotator/hed/__init__.py`, controlnet_aux `hed/__init__.py`): a
  parameter `norm` [1, 3, 1, 1]; `block1`..`block5`, each a `convs` Sequential of 2, 2, 3, 3,
  3 3x3 convolutions (64, 128, 256, 512, 512 channels) and a 1x1 `projection` to 1 channel.
  The released file is stored in float16 (29 MB), as written here.
- sk_model.pth / sk_model2.pth: the `Generator(3, 1, 3)` of informative-drawings
  (sd-webui-controlnet `annotator/lineart/__init__.py`): Sequentials `model0` (reflection
  pad, 7x7 conv 3->64 at index 1, instance norm, ReLU), `model1` (3x3 stride-2 convs
  64->128 at 0 and 128->256 at 3), `model2` (3 residual blocks, `conv_block` with 3x3 convs
  at 1 and 5), `model3` (transposed convs 256->128 at 0 and 128->64 at 3), `model4` (7x7
  conv 64->1 at 1, sigmoid). Instance norms carry no parameters. Stored in float32 (17 MB).
- table5_pidinet.pth: PiDiNet `carv4` (sd-webui-controlnet `annotator/pidinet/model.py`,
  `pidinet()`: PiDiNet(60, carv4, dil=24, sa=True)): `init_block` (3->60, no bias); blocks
  `block1_1..1_3` (60), `block2_1..2_4` (120), `block3_1..3_4` and `block4_1..4_4` (240),
  each a depthwise 3x3 `conv1` and a 1x1 `conv2` without bias, the first of stages 2-4 with a
  1x1 `shortcut`; per stage `dilations.<i>` (1x1 `conv1` to 24, `conv2_1..4` 3x3 24->24
  without bias), `attentions.<i>` (1x1 `conv1` 24->4, 3x3 `conv2` 4->1 without bias),
  `conv_reduces.<i>.conv` (1x1 24->1); a 1x1 `classifier` 4->1. The file keeps them under
  `state_dict`, prefixed `module.` (DataParallel), as written here.

Expected outputs come from forwards written here with torch.nn.functional straight from the
saved state dicts, and the extension's pre- and post-processing (short side to the processor
resolution, edge padding to multiples of 64, bilinear side outputs, sigmoid, safe step,
inversion) redone with NumPy and OpenCV.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.annotator_files import AnnotatorFiles, discover_annotators
from app.engine import annotators
from app.engine.annotator_nets import ControlNetHED, LineartGenerator, PiDiNet
from app.engine.preprocessors import check_preprocessor, detect, served_preprocessors
from app.errors import InvalidParameter, NotServed
from app.registry import RegistryError, load_registry
from tests.conftest import API_KEY
from tests.controlnet_files import save_folder, tiny_controlnet
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}

# ---- the published layouts, by hand ------------------------------------------------------


def hed_layout() -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {"norm": (1, 3, 1, 1)}
    channels_in = 3
    for block, (channels, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for j in range(convs):
            layout[f"block{block}.convs.{j}.weight"] = (channels, channels_in if j == 0 else channels, 3, 3)
            layout[f"block{block}.convs.{j}.bias"] = (channels,)
        layout[f"block{block}.projection.weight"] = (1, channels, 1, 1)
        layout[f"block{block}.projection.bias"] = (1,)
        channels_in = channels
    return layout


def lineart_layout() -> dict[str, tuple[int, ...]]:
    shapes = {"model0.1": (64, 3, 7, 7), "model1.0": (128, 64, 3, 3), "model1.3": (256, 128, 3, 3),
              # a transposed convolution's weight is [in, out, k, k]
              "model3.0": (256, 128, 3, 3), "model3.3": (128, 64, 3, 3), "model4.1": (1, 64, 7, 7)}
    for k in range(3):
        shapes[f"model2.{k}.conv_block.1"] = shapes[f"model2.{k}.conv_block.5"] = (256, 256, 3, 3)
    layout = {}
    for prefix, shape in shapes.items():
        layout[f"{prefix}.weight"] = shape
        layout[f"{prefix}.bias"] = (shape[1] if prefix.startswith("model3") else shape[0],)
    return layout


def pidinet_layout() -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {"init_block.weight": (60, 3, 3, 3)}
    stages = [(60, 60, 3), (60, 120, 4), (120, 240, 4), (240, 240, 4)]
    for stage, (channels_in, channels, blocks) in enumerate(stages, start=1):
        for block in range(1, blocks + 1):
            first = block == 1 and stage > 1
            width_in = channels_in if first else channels
            layout[f"block{stage}_{block}.conv1.weight"] = (width_in, 1, 3, 3)
            layout[f"block{stage}_{block}.conv2.weight"] = (channels, width_in, 1, 1)
            if first:
                layout[f"block{stage}_{block}.shortcut.weight"] = (channels, width_in, 1, 1)
                layout[f"block{stage}_{block}.shortcut.bias"] = (channels,)
        i = stage - 1
        layout[f"dilations.{i}.conv1.weight"] = (24, channels, 1, 1)
        layout[f"dilations.{i}.conv1.bias"] = (24,)
        for k in range(1, 5):
            layout[f"dilations.{i}.conv2_{k}.weight"] = (24, 24, 3, 3)
        layout[f"attentions.{i}.conv1.weight"] = (4, 24, 1, 1)
        layout[f"attentions.{i}.conv1.bias"] = (4,)
        layout[f"attentions.{i}.conv2.weight"] = (1, 4, 3, 3)
        layout[f"conv_reduces.{i}.conv.weight"] = (1, 24, 1, 1)
        layout[f"conv_reduces.{i}.conv.bias"] = (1,)
    layout["classifier.weight"] = (1, 4, 1, 1)
    layout["classifier.bias"] = (1,)
    return layout


def random_state(layout: dict[str, tuple[int, ...]], seed: int, *, hed: bool) -> dict[str, torch.Tensor]:
    """Random tensors of `layout`, scaled so that the outputs are neither flat nor saturated."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key == "norm":
            state[key] = 100 + 50 * torch.rand(shape, generator=generator)
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if key.startswith("model3") and key.endswith("weight"):
            fan_in = shape[0] * 9
        std = (2.0 / fan_in) ** 0.5 if len(shape) > 1 else 0.05
        if key.endswith("projection.weight"):
            std = 0.03 / fan_in ** 0.5  # side outputs of about one unit on inputs of ~100
        state[key] = torch.randn(shape, generator=generator) * std
    return {k: v.half() for k, v in state.items()} if hed else state


def random_pidinet(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in pidinet_layout().items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        std = (1.0 / fan_in) ** 0.5 if len(shape) > 1 else 0.05
        state[f"module.{key}"] = torch.randn(shape, generator=generator) * std
    return {"state_dict": state}


# ---- independent forwards -----------------------------------------------------------------


def reference_hed_sides(state: dict[str, torch.Tensor], x: torch.Tensor) -> list[np.ndarray]:
    sd = {k: v.float() for k, v in state.items()}
    h = x - sd["norm"]
    sides = []
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        if block > 1:
            h = F.max_pool2d(h, 2, 2)
        for j in range(convs):
            h = F.relu(F.conv2d(h, sd[f"block{block}.convs.{j}.weight"], sd[f"block{block}.convs.{j}.bias"],
                                padding=1))
        sides.append(F.conv2d(h, sd[f"block{block}.projection.weight"], sd[f"block{block}.projection.bias"])
                     [0, 0].numpy())
    return sides


def reference_lineart(sd: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    def conv(h: torch.Tensor, key: str, pad: int) -> torch.Tensor:
        return F.conv2d(F.pad(h, (pad,) * 4, mode="reflect"), sd[f"{key}.weight"], sd[f"{key}.bias"])

    def norm_relu(h: torch.Tensor) -> torch.Tensor:
        return F.relu(F.instance_norm(h, eps=1e-5))

    h = norm_relu(conv(x, "model0.1", 3))
    for key in ("model1.0", "model1.3"):
        h = norm_relu(F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2, padding=1))
    for k in range(3):
        inner = norm_relu(conv(h, f"model2.{k}.conv_block.1", 1))
        h = h + F.instance_norm(conv(inner, f"model2.{k}.conv_block.5", 1), eps=1e-5)
    for key in ("model3.0", "model3.3"):
        h = norm_relu(F.conv_transpose2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2, padding=1,
                                         output_padding=1))
    return torch.sigmoid(conv(h, "model4.1", 3))[0, 0].numpy()


# PiDiNet's pixel differences, by definition: what each tap of a 3x3 kernel multiplies
CARV4 = ["cd", "ad", "rd", "cv"] * 4  # init_block, then the 15 blocks in order
RING_CLOCKWISE = [0, 1, 2, 5, 8, 7, 6, 3]  # the 3x3 taps around the centre (4), clockwise
# radial: taps 1..8 take (5x5 neighbourhood) outer place minus inner place
RADIAL_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
RADIAL_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


def differences(op: str, x: torch.Tensor) -> torch.Tensor:
    """[N, C, 9, H, W]: what tap t of the kernel multiplies at each pixel."""
    n, c, h, w = x.shape
    taps3 = F.unfold(x, 3, padding=1).view(n, c, 9, h, w)
    if op == "cv":
        return taps3
    if op == "cd":  # central: each neighbour minus the centre
        return taps3 - taps3[:, :, 4:5]
    out = torch.zeros_like(taps3)
    if op == "ad":  # angular: each ring tap minus the next one clockwise
        for here, after in zip(RING_CLOCKWISE, RING_CLOCKWISE[1:] + RING_CLOCKWISE[:1], strict=True):
            out[:, :, here] = taps3[:, :, here] - taps3[:, :, after]
        return out
    taps5 = F.unfold(x, 5, padding=2).view(n, c, 25, h, w)  # radial
    for tap in range(1, 9):
        out[:, :, tap] = taps5[:, :, RADIAL_OUTER[tap - 1]] - taps5[:, :, RADIAL_INNER[tap - 1]]
    return out


def reference_pidinet(sd: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    def conv(h: torch.Tensor, key: str, **kw) -> torch.Tensor:  # noqa: ANN003
        return F.conv2d(h, sd[f"{key}.weight"], sd.get(f"{key}.bias"), **kw)

    w = sd["init_block.weight"]
    h = torch.einsum("oct,ncthw->nohw", w.view(60, 3, 9), differences("cd", x))
    ops = iter(CARV4[1:])
    maps = []
    for stage, blocks in enumerate((3, 4, 4, 4), start=1):
        for block in range(1, blocks + 1):
            key = f"block{stage}_{block}"
            if block == 1 and stage > 1:
                h = F.max_pool2d(h, 2, 2)
            depthwise = sd[f"{key}.conv1.weight"]
            taps = differences(next(ops), h)
            y = torch.einsum("ct,ncthw->nchw", depthwise.view(depthwise.shape[0], 9), taps)
            y = conv(F.relu(y), f"{key}.conv2")
            h = y + (conv(h, f"{key}.shortcut") if block == 1 and stage > 1 else h)
        i = stage - 1
        d = conv(F.relu(h), f"dilations.{i}.conv1")
        d = sum(conv(d, f"dilations.{i}.conv2_{k}", dilation=r, padding=r)
                for k, r in zip(range(1, 5), (5, 7, 9, 11), strict=True))
        mask = conv(conv(F.relu(d), f"attentions.{i}.conv1"), f"attentions.{i}.conv2", padding=1)
        a = d * torch.sigmoid(mask)
        maps.append(F.interpolate(conv(a, f"conv_reduces.{i}.conv"), x.shape[2:], mode="bilinear",
                                  align_corners=False))
    return torch.sigmoid(conv(torch.cat(maps, dim=1), "classifier"))[0, 0].numpy()


def extension_input(picture: Image.Image, resolution: int) -> tuple[np.ndarray, int, int]:
    """sd-webui-controlnet's resize_image_with_pad: short side to `resolution` (cubic up, area
    down), edge-padded to multiples of 64; and the size to cut back to."""
    image = np.asarray(picture.convert("RGB"))
    height, width = image.shape[:2]
    k = resolution / min(height, width)
    new_h, new_w = int(np.round(height * k)), int(np.round(width * k))
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(image, ((0, -new_h % 64), (0, -new_w % 64), (0, 0)), mode="edge")
    return padded, new_h, new_w


def expected_hed(state: dict, picture: Image.Image, resolution: int, safe: bool) -> np.ndarray:
    padded, height, width = extension_input(picture, resolution)
    x = torch.from_numpy(padded.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        sides = reference_hed_sides(state, x)
    full = [cv2.resize(s, (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_LINEAR) for s in sides]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(full, axis=2), axis=2).astype(np.float64)))
    if safe:  # safe_step: 0, 0.5 or 1 (the extension computes it in float32)
        edge = np.floor(edge.astype(np.float32) * 3) / 2
    out = (edge * 255).clip(0, 255).astype(np.uint8)[:height, :width]
    return np.repeat(out[:, :, None], 3, axis=2).astype(int)


def expected_lineart(state: dict, picture: Image.Image, resolution: int) -> np.ndarray:
    padded, height, width = extension_input(picture, resolution)
    x = torch.from_numpy(padded.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        line = reference_lineart(state, x)
    out = 255 - (line * 255).clip(0, 255).astype(np.uint8)[:height, :width]
    return np.repeat(out[:, :, None], 3, axis=2).astype(int)


def expected_pidinet(state: dict, picture: Image.Image, resolution: int, mode: str) -> np.ndarray:
    padded, height, width = extension_input(picture, resolution)
    x = torch.from_numpy(padded[:, :, ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None]  # BGR
    with torch.no_grad():
        edge = reference_pidinet({k.removeprefix("module."): v for k, v in state["state_dict"].items()}, x)
    if mode == "sketch":
        edge = (edge > 0.5).astype(np.float32)
    if mode == "safe":
        edge = np.floor(edge.astype(np.float32) * 3) / 2
    out = (edge * 255).clip(0, 255).astype(np.uint8)[:height, :width]
    if mode == "scribble":
        out = expected_scribble(out)
    return np.repeat(out[:, :, None], 3, axis=2).astype(int)


def expected_scribble(out: np.ndarray) -> np.ndarray:
    """The extension's scribble of a soft edge map: blur 3, keep the maxima of some 1x3 line,
    > 127; blur 3 again, > 4."""
    height, width = out.shape
    blurred = cv2.GaussianBlur(out.astype(np.float32), (0, 0), 3.0)
    padded_b = np.pad(blurred, 1, mode="constant", constant_values=-np.inf)
    ridge = np.zeros(blurred.shape, bool)
    for (dy, dx) in ((0, 1), (1, 0), (1, 1), (1, -1)):
        before = padded_b[1 - dy:1 - dy + height, 1 - dx:1 - dx + width]
        after = padded_b[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        ridge |= (blurred >= before) & (blurred >= after)
    thin = np.where(ridge & (blurred > 127), 255, 0).astype(np.uint8)
    return np.where(cv2.GaussianBlur(thin, (0, 0), 3.0) > 4, 255, 0).astype(np.uint8)


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    difference = np.abs(got - expected)
    # float32 sums in another order may move a value across a uint8 step
    changed = (difference > 0).mean()
    assert difference.max() <= 1 and changed < 0.02, (difference.max(), changed)


# ---- files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An annotator folder with ControlNetHED.pth and sk_model.pth (not sk_model2.pth), and
    the coarse model's state kept aside."""
    folder = tmp_path_factory.mktemp("annotators")
    states = {"ControlNetHED.pth": random_state(hed_layout(), 1, hed=True),
              "sk_model.pth": random_state(lineart_layout(), 2, hed=False),
              "sk_model2.pth": random_state(lineart_layout(), 3, hed=False),
              "table5_pidinet.pth": random_pidinet(4)}
    torch.save(states["ControlNetHED.pth"], folder / "ControlNetHED.pth")
    torch.save(states["table5_pidinet.pth"], folder / "table5_pidinet.pth")
    torch.save(states["sk_model.pth"], folder / "sk_model.pth")
    spare = tmp_path_factory.mktemp("spare") / "sk_model2.pth"
    torch.save(states["sk_model2.pth"], spare)
    return {"folder": folder, "states": states, "spare": spare}


PICTURE = noise(70, 90, seed=4)  # 70 wide, 90 high: resized and padded on both sides


def test_the_nets_have_the_published_layouts() -> None:
    for net, layout in ((ControlNetHED(), hed_layout()), (LineartGenerator(), lineart_layout()),
                        (PiDiNet(), pidinet_layout())):
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout


def test_files_with_the_real_keys_load_strictly_through_weights_only(weights, tmp_path: Path) -> None:  # noqa: ANN001
    hed = annotators.build_net("ControlNetHED.pth", weights["folder"] / "ControlNetHED.pth")
    for key, tensor in weights["states"]["ControlNetHED.pth"].items():
        assert torch.equal(hed.state_dict()[key], tensor.float()), key
    assert all(p.dtype == torch.float32 for p in hed.parameters())
    # a training checkpoint's wrapper and DataParallel's prefixes are taken off
    wrapped = tmp_path / "sk_model.pth"
    state = weights["states"]["sk_model.pth"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    net = annotators.build_net("sk_model.pth", wrapped)
    assert torch.equal(net.state_dict()["model4.1.weight"], state["model4.1.weight"])


def _refusal(path: Path, name: str = "ControlNetHED.pth") -> str:
    files = AnnotatorFiles(path.parent, {name: path})
    module = "softedge_hed" if name == "ControlNetHED.pth" else "lineart_realistic"
    with pytest.raises(InvalidParameter) as caught:
        detect(check_preprocessor("units[0].module", module, files), PICTURE, 64, files=files,
               field="units[0].module")
    assert caught.value.status == 422 and caught.value.field == "units[0].module"
    assert str(path.parent) not in caught.value.message  # the file's name, not the server's folder
    return caught.value.message


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (os.makedirs, (str(Path(os.environ["ANNOTATOR_MARKER"])),))


def test_files_that_are_not_the_net_are_refused_with_a_clear_422(weights, tmp_path: Path,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk" / "ControlNetHED.pth"
    junk.parent.mkdir()
    junk.write_bytes(b"not a checkpoint at all")
    assert "ControlNetHED.pth is not a PyTorch weights file" in _refusal(junk)
    truncated = tmp_path / "truncated" / "ControlNetHED.pth"
    truncated.parent.mkdir()
    truncated.write_bytes((weights["folder"] / "ControlNetHED.pth").read_bytes()[:100_000])
    assert "ControlNetHED.pth cannot be read" in _refusal(truncated)

    other = tmp_path / "other" / "ControlNetHED.pth"
    other.parent.mkdir()
    torch.save(weights["states"]["sk_model.pth"], other)  # the lineart net under HED's name
    message = _refusal(other)
    assert "not the ControlNetHED net" in message and "37 tensors missing" in message

    shapes = tmp_path / "shapes" / "sk_model.pth"
    shapes.parent.mkdir()
    state = dict(weights["states"]["sk_model.pth"])
    state["model4.1.weight"] = torch.zeros(3, 64, 7, 7)
    torch.save(state, shapes)
    assert "model4.1.weight has shape [3, 64, 7, 7]" in _refusal(shapes, "sk_model.pth")

    marker = tmp_path / "code-ran"
    monkeypatch.setenv("ANNOTATOR_MARKER", str(marker))
    hostile = tmp_path / "hostile" / "ControlNetHED.pth"
    hostile.parent.mkdir()
    torch.save({"norm": _RunsCode()}, hostile)  # a pickle that would call os.makedirs
    message = _refusal(hostile)
    assert "a weights-only load refuses it (Trying to load unsupported GLOBAL os.makedirs" in message
    assert not marker.exists()


def test_hed_and_hedsafe_are_the_published_net_with_the_extensions_processing(weights) -> None:  # noqa: ANN001
    files = discover_annotators(weights["folder"])
    state = weights["states"]["ControlNetHED.pth"]
    for name, alias, safe in (("softedge_hed", "hed", False), ("softedge_hedsafe", "hed_safe", True)):
        module = check_preprocessor("module", alias, files)
        assert module.name == name
        got = arr(detect(module, PICTURE, 80, files=files))
        expected = expected_hed(state, PICTURE, 80, safe)
        assert got.shape == (103, 80, 3)  # short side 80, the other 90 * 80 / 70
        assert_close(got, expected)
        assert len(np.unique(expected)) > (2 if safe else 30)  # not flat or saturated
    assert set(np.unique(arr(detect(check_preprocessor("m", "hed_safe", files), PICTURE, 80, files=files)))) \
        <= {0, 127, 255}
    # scribble_hed: HED's map (padded, cut) thinned and thickened as scribble_pidinet's
    got = arr(detect(check_preprocessor("module", "scribble_hed", files), PICTURE, 80, files=files))
    expected = expected_scribble(expected_hed(state, PICTURE, 80, False)[:, :, 0].astype(np.uint8))
    assert (got[:, :, 0] != expected).mean() < 0.01  # a thinned line may move where two maxima tie
    assert set(np.unique(got)) <= {0, 255}


def test_lineart_realistic_and_coarse_are_the_generator_inverted(weights, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "annotator" / "downloads" / "lineart"  # the extension's own layout
    folder.mkdir(parents=True)
    (folder / "sk_model2.pth").write_bytes(weights["spare"].read_bytes())
    (folder / "sk_model.pth").write_bytes((weights["folder"] / "sk_model.pth").read_bytes())
    files = discover_annotators(tmp_path / "annotator")
    assert set(files.files) == {"sk_model.pth", "sk_model2.pth"}
    outputs = {}
    for name, weights_file in (("lineart", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")):
        got = arr(detect(check_preprocessor("module", name, files), PICTURE, 64, files=files))
        expected = expected_lineart(weights["states"][weights_file], PICTURE, 64)
        assert_close(got, expected)
        assert len(np.unique(expected)) > 30
        outputs[name] = got
    assert np.abs(outputs["lineart"] - outputs["lineart_coarse"]).mean() > 1  # each its own file


def test_the_pidinet_modules_are_the_published_net_with_the_extensions_processing(weights) -> None:  # noqa: ANN001
    files = discover_annotators(weights["folder"])
    state = weights["states"]["table5_pidinet.pth"]
    for name, alias, mode in (("softedge_pidinet", "pidinet", ""),
                              ("softedge_pidisafe", "pidinet_safe", "safe"),
                              ("scribble_pidinet", "pidinet_scribble", "scribble"),
                              ("t2ia_sketch_pidi", "pidinet_sketch", "sketch")):
        module = check_preprocessor("module", alias, files)
        assert module.name == name
        got = arr(detect(module, PICTURE, 72, files=files))
        expected = expected_pidinet(state, PICTURE, 72, mode)
        if mode == "scribble":  # a thinned line may move by a pixel where two maxima tie
            assert (got != expected).mean() < 0.01
        else:
            assert_close(got, expected)
        assert len(np.unique(expected)) > (30 if mode == "" else 1), name


def test_nets_are_cached_and_a_replaced_file_is_loaded_again(weights, tmp_path: Path) -> None:  # noqa: ANN001
    cache = annotators.NetCache(capacity=2)
    path = tmp_path / "sk_model.pth"
    torch.save(weights["states"]["sk_model.pth"], path)
    first = cache.get("sk_model.pth", path)
    assert cache.get("sk_model.pth", path) is first
    torch.save(weights["states"]["sk_model2.pth"], path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = cache.get("sk_model.pth", path)
    assert second is not first
    coarse = weights["states"]["sk_model2.pth"]
    assert torch.equal(second.state_dict()["model0.1.weight"], coarse["model0.1.weight"])
    assert cache.loaded() == ["sk_model.pth"]  # the old version is gone
    cache.get("ControlNetHED.pth", weights["folder"] / "ControlNetHED.pth")
    other = tmp_path / "sk_model2.pth"
    other.write_bytes(weights["spare"].read_bytes())
    cache.get("sk_model2.pth", other)
    assert cache.loaded() == ["ControlNetHED.pth", "sk_model2.pth"]  # least recently used out


def test_listing_and_the_missing_file_rule(weights, tmp_path: Path) -> None:  # noqa: ANN001
    files = discover_annotators(weights["folder"])
    served = served_preprocessors(files)
    assert {"softedge_hed", "softedge_hedsafe", "lineart_realistic"} <= set(served)
    assert "lineart_coarse" not in served
    assert not {"softedge_hed", "lineart_realistic", "lineart_coarse"} & set(served_preprocessors(None))
    with pytest.raises(InvalidParameter) as caught:
        check_preprocessor("units[1].module", "lineart_coarse", files)
    assert caught.value.message == (
        "This server doesn't have units[1].module 'lineart_coarse': lineart_coarse needs sk_model2.pth "
        "in models.yaml's annotator_dir; it is not there")
    with pytest.raises(InvalidParameter) as caught:
        check_preprocessor("module", "HED", None)
    assert "softedge_hed needs ControlNetHED.pth" in caught.value.message
    assert "sets no annotator_dir" in caught.value.message
    with pytest.raises(NotServed) as unknown:
        check_preprocessor("module", "depth_leres", files)
    assert "softedge_hed" in unknown.value.message and "lineart_coarse" not in unknown.value.message


def test_models_yaml_annotator_dir(tmp_path: Path, weights) -> None:  # noqa: ANN001
    (tmp_path / "annotators" / "hed").mkdir(parents=True)
    (tmp_path / "annotators" / "hed" / "ControlNetHED.pth").write_bytes(b"x")  # listed by name only
    (tmp_path / "annotators" / "sk_model.pth").mkdir()  # a folder is no file
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl}\nannotator_dir: annotators\n")
    registry = load_registry(models)
    assert registry.annotators.folder == (tmp_path / "annotators").resolve()
    assert set(registry.annotators.files) == {"ControlNetHED.pth"}
    models.write_text("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl}\nannotator_dir: nowhere\n")
    with pytest.raises(RegistryError, match="annotator_dir: .*nowhere is not a folder"):
        load_registry(models)
    models.write_text("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl}\n")
    assert load_registry(models).annotators.folder is None


# ---- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annot_server(make_server, weights, tmp_path_factory):  # noqa: ANN001, ANN201
    nets = tmp_path_factory.mktemp("controlnets")
    save_folder(tiny_controlnet("sdxl"), nets / "cn-xl")
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
controlnet_dirs: ["{nets}"]
annotator_dir: "{weights['folder']}"
""", api_keys=[f"{API_KEY}  admin"], reload_interval_s=0)


@pytest.fixture()
def http(annot_server):  # noqa: ANN001, ANN201
    with annot_server.client() as c:
        yield c


def test_listed_only_where_the_file_is(http) -> None:  # noqa: ANN001
    modules = http.get("/controlnet/module_list", headers=AUTH).json()
    assert {"softedge_hed", "softedge_hedsafe", "lineart_realistic", "canny"} <= set(modules["module_list"])
    assert "lineart_coarse" not in modules["module_list"]
    assert set(modules["module_detail"]) == set(modules["module_list"])
    assert modules["module_detail"]["softedge_hed"]["sliders"][0]["value"] == 512
    types = http.get("/controlnet/control_types", headers=AUTH).json()["control_types"]
    assert types["SoftEdge"]["module_list"] == ["softedge_hed", "softedge_hedsafe", "softedge_pidinet",
                                                "softedge_pidisafe"]
    assert "scribble_pidinet" in types["Scribble/Sketch"]["module_list"]
    assert "t2ia_sketch_pidi" in types["T2I-Adapter"]["module_list"]
    assert "lineart_realistic" in types["Lineart"]["module_list"]
    assert "lineart_coarse" not in types["Lineart"]["module_list"]
    assert "lineart_coarse" not in types["All"]["module_list"]


def test_detect_runs_hed_and_names_a_missing_file(http, weights) -> None:  # noqa: ANN001
    answer = http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": "softedge_hed", "controlnet_input_images": [b64(PICTURE)],
        "controlnet_processor_res": 64})
    assert answer.status_code == 200, answer.text
    assert_close(arr(decoded(answer.json()["images"][0])),
                 expected_hed(weights["states"]["ControlNetHED.pth"], PICTURE, 64, False))
    answer = http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": "lineart_coarse", "controlnet_input_images": [b64(PICTURE)]})
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        "This server doesn't have controlnet_module 'lineart_coarse': lineart_coarse needs "
        "sk_model2.pth in models.yaml's annotator_dir; it is not there")


def _txt2img(http, module: str) -> object:  # noqa: ANN001
    unit = {"enabled": True, "module": module, "model": "cn-xl", "image": b64(PICTURE),
            "processor_res": 64, "resize_mode": "Just Resize"}
    return http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
        "alwayson_scripts": {"controlnet": {"args": [unit]}}})


def test_a_unit_with_lineart_uses_the_generator_and_a_missing_one_is_422(http, weights) -> None:  # noqa: ANN001
    answer = _txt2img(http, "lineart")
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    assert len(images) == 2  # the image, then the detected map fitted to 64x64
    detected = expected_lineart(weights["states"]["sk_model.pth"], PICTURE, 64).astype(np.uint8)
    # 64x82, of more than 199 grey levels (not a label map): Just Resize shrinks it by area
    assert detected.shape == (82, 64, 3) and len(np.unique(detected[:, :, 0])) >= 200
    shrunk = cv2.resize(detected, (64, 64), interpolation=cv2.INTER_AREA)
    assert_close(arr(decoded(images[1])), shrunk.astype(int))
    answer = _txt2img(http, "lineart_coarse")
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert "alwayson_scripts.controlnet.args[0].module 'lineart_coarse'" in detail
    assert "sk_model2.pth in models.yaml's annotator_dir; it is not there" in detail
    assert str(weights["folder"]) not in detail  # answers never show the server's paths


def test_a_file_added_is_served_after_a_reload(http, weights) -> None:  # noqa: ANN001
    added = weights["folder"] / "sk_model2.pth"
    added.write_bytes(weights["spare"].read_bytes())
    try:
        assert http.post("/admin/reload", headers=AUTH).status_code == 200
        assert "lineart_coarse" in http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]
        answer = http.post("/controlnet/detect", headers=AUTH, json={
            "controlnet_module": "lineart_coarse", "controlnet_input_images": [b64(PICTURE)],
            "controlnet_processor_res": 64})
        assert answer.status_code == 200, answer.text
        assert_close(arr(decoded(answer.json()["images"][0])),
                     expected_lineart(weights["states"]["sk_model2.pth"], PICTURE, 64))
    finally:
        added.unlink()
    assert http.post("/admin/reload", headers=AUTH).status_code == 200
    assert "lineart_coarse" not in http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]


def test_a_slow_preprocessing_does_not_hold_up_other_requests_pictures(http, monkeypatch) -> None:  # noqa: ANN001
    """A detector runs on its own thread: while one is held (a HED that waits for a signal),
    another request's picture is still decoded and answered (an extras upscale, whose picture
    is decoded on the decoding thread)."""
    import threading

    from app.engine import annotators as nets

    started, release = threading.Event(), threading.Event()
    real = nets.hed

    def held(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        started.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(nets, "hed", held)
    answers: list = []
    slow = threading.Thread(target=lambda: answers.append(http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": "softedge_hed", "controlnet_input_images": [b64(PICTURE)],
        "controlnet_processor_res": 64})))
    slow.start()
    try:
        assert started.wait(60)
        other = http.post("/sdapi/v1/extra-single-image", headers=AUTH, timeout=30, json={
            "image": b64(PICTURE), "upscaler_1": "Lanczos", "upscaling_resize": 2})
        assert other.status_code == 200, other.text
        assert not answers  # the detection is still held
    finally:
        release.set()
        slow.join(60)
    assert answers and answers[0].status_code == 200, answers
