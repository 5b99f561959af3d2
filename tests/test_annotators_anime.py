"""The anime line preprocessors (app.engine.annotators): `lineart_anime` (netG.pth) and
`lineart_anime_denoise` (erika.pth) from models.yaml's `annotator_dir:`.

The published layouts, stated by hand below (not read from the code under test):

- netG.pth: sd-webui-controlnet's `annotator/lineart_anime` `UnetGenerator(3, 1, 8, 64)` with
  instance norms without parameters (so every conv has a bias). It nests
  `UnetSkipConnectionBlock`s, each a Sequential `model`: the outermost [down conv, inner block,
  ReLU, up conv, Tanh] (keys `model.model.0`, `model.model.3`), an inner one [LeakyReLU, down
  conv, norm, inner block, ReLU, up conv, norm] (`.model.1`, `.model.5`, the inner block at
  `.model.3`), the innermost [LeakyReLU, down conv, ReLU, up conv, norm] (`.model.1`,
  `.model.3`). Channels (outer, inner) from the top: (1, 64) taking 3, (64, 128), (128, 256),
  (256, 512), then (512, 512) four times; all convs 4x4, stride 2, padding 1. The block
  concatenates its input to its output, and since its LeakyReLU works in place, the input it
  concatenates is the activated one (the same, once the ReLU that follows is applied). The
  released file is 217 MB of float32: the net is checked at that width by its shapes, and run
  at width 8 (the same layout, 8 for 64).
- erika.pth: `annotator/manga_line`'s `res_skip`: stages `block0`..`block4` (24, 48, 96, 192,
  384 channels from 1; 2, 3, 5, 7, 12 blocks, the last block of stages 1-4 of stride 2),
  `block5`..`block8` (192, 96, 48, 24; 7, 5, 3, 2 blocks, the first block of each upsampling
  by 2, nearest), `block9` (24 -> 16, 2 blocks), `conv15` (16 -> 1, 1x1). A block: `conv1` and
  `residual`, each a Sequential `model` [BatchNorm (eps 1e-3), LeakyReLU 0.2, conv (3x3,
  padding 1), + Upsample for an upsampling block's conv1], and a `shortcut.model.0` 1x1 conv
  (+ Upsample) where the channels or the stride change; the output is shortcut(x) + residual(
  conv1(x)). Each decoder stage's output is added to the encoder stage's of the same size.
  The net is run at width 4 (4, 8, 16, 32, 64 channels; block9 still to 16), and at its real
  width (172 MB of float32, built in memory: under a second on a small picture).

Expected outputs come from forwards written here with torch.nn.functional from the state
dicts, and the extension's processing redone with NumPy and OpenCV: short side to the
processor resolution, edge padding to multiples of 64, then for lineart_anime a cubic stretch
to multiples of 256, x / 127.5 - 1, the drawing * 127.5 + 127.5 stretched back (cubic),
clipped, truncated, 255 minus it; for lineart_anime_denoise the grey picture (RGB2GRAY) as
0..255 floats, 255 minus the drawing, clipped, truncated (no second inversion).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.annotator_files import AnnotatorFiles, discover_annotators
from app.engine import annotators
from app.engine.annotator_nets import AnimeLineartUnet, MangaLineNet
from app.engine.preprocessors import check_preprocessor, detect, served_preprocessors
from app.errors import InvalidParameter
from tests.conftest import API_KEY
from tests.pictures import arr, b64, decoded, noise
from tests.test_annotators import assert_close, extension_input

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ANIME_WIDTH, MANGA_WIDTH = 8, 4  # the narrow variants the files here hold
PICTURE = noise(70, 90, seed=7)

# ---- the published layouts, by hand ------------------------------------------------------


def anime_levels(width: int) -> list[tuple[str, int, int, int, str]]:
    """(its Sequential's key prefix, channels in, inner channels, outer channels, kind) of each
    level, top first."""
    levels = [("model.model", 3, width, 1, "outermost")]
    pairs = [(width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)]
    pairs += [(8 * width, 8 * width)] * 4
    prefix = "model.model.1.model"  # the inner level sits at .1 of the outermost, .3 of the others
    for index, (outer, inner) in enumerate(pairs):
        levels.append((prefix, outer, inner, outer, "innermost" if index == len(pairs) - 1 else "inner"))
        prefix += ".3.model"
    return levels


def anime_layout(width: int = 64) -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {}
    for prefix, channels_in, inner, outer, kind in anime_levels(width):
        down, up = {"outermost": (0, 3), "inner": (1, 5), "innermost": (1, 3)}[kind]
        layout[f"{prefix}.{down}.weight"] = (inner, channels_in, 4, 4)
        layout[f"{prefix}.{down}.bias"] = (inner,)
        # a transposed conv's weight is [in, out, k, k]; the up conv takes the inner level's
        # concatenation (twice `inner`), but the innermost has no inner level
        layout[f"{prefix}.{up}.weight"] = (inner if kind == "innermost" else 2 * inner, outer, 4, 4)
        layout[f"{prefix}.{up}.bias"] = (outer,)
    return layout


MANGA_ENCODER = [(1, 2), (2, 3), (4, 5), (8, 7), (16, 12)]  # (channels / width, blocks)
MANGA_DECODER = [(8, 7), (4, 5), (2, 3), (1, 2)]


def manga_blocks(width: int = 24) -> list[tuple[str, int, int, int, bool]]:
    """(prefix, channels in, channels, stride, upsample) of every block, in order."""
    blocks = []
    channels_in = 1
    for stage, (factor, count) in enumerate(MANGA_ENCODER):
        for i in range(count):
            stride = 2 if stage > 0 and i == count - 1 else 1
            blocks.append((f"block{stage}.model.{i}", channels_in if i == 0 else factor * width,
                           factor * width, stride, False))
        channels_in = factor * width
    for stage, (factor, count) in enumerate(MANGA_DECODER, start=5):
        for i in range(count):
            blocks.append((f"block{stage}.model.{i}", channels_in if i == 0 else factor * width,
                           factor * width, 1, i == 0))
        channels_in = factor * width
    blocks += [("block9.model.0", width, 16, 1, False), ("block9.model.1", 16, 16, 1, False)]
    return blocks


def manga_layout(width: int = 24, counters: bool = True) -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {}

    def norm_conv(prefix: str, channels_in: int, channels: int, kernel: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.model.0.{name}"] = (channels_in,)
        if counters:
            layout[f"{prefix}.model.0.num_batches_tracked"] = ()
        layout[f"{prefix}.model.2.weight"] = (channels, channels_in, kernel, kernel)
        layout[f"{prefix}.model.2.bias"] = (channels,)

    for prefix, channels_in, channels, stride, _ in manga_blocks(width):
        norm_conv(f"{prefix}.conv1", channels_in, channels, 3)
        norm_conv(f"{prefix}.residual", channels, channels, 3)
        if channels_in != channels or stride != 1:
            layout[f"{prefix}.shortcut.model.0.weight"] = (channels, channels_in, 1, 1)
            layout[f"{prefix}.shortcut.model.0.bias"] = (channels,)
    norm_conv("conv15", 16, 1, 1)
    return layout


# ---- random weights at those layouts --------------------------------------------------------


def random_anime(width: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in anime_layout(width).items():
        if len(shape) == 1:
            state[key] = 0.05 * torch.randn(shape, generator=generator)
            continue
        fan_in = shape[1] * 16 if key.startswith("model.model.0") else shape[0] * 4  # transposed: 4 taps
        state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
    # the top up conv reads ReLU'd normalised features: a small gain keeps tanh off its ends
    state["model.model.3.weight"] *= 0.3
    return state


def random_manga(width: int, seed: int, counters: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in manga_layout(width, counters).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # a norm's weight
            state[key] = 0.5 + 0.5 * torch.rand(shape, generator=generator)
        else:
            state[key] = torch.randn(shape, generator=generator) * (1.0 / np.prod(shape[1:])) ** 0.5
    # the input is 0..255 and residual sums grow: scale the first norm and the last conv so
    # that the drawing spans 0..255 without sitting at its ends
    state["block0.model.0.conv1.model.0.running_mean"] = torch.tensor([128.0])
    state["block0.model.0.conv1.model.0.running_var"] = torch.tensor([64.0 ** 2])
    state["block0.model.0.shortcut.model.0.weight"] /= 100.0
    return state


def scale_manga_output(state: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """Set conv15's gain and bias so the reference drawing of `x` has mean 160, std 60 (the
    drawing is linear in them: gain k and bias b' make k * (raw - b) + b')."""
    raw = reference_manga(state, x)
    gain = 60.0 / float(raw.std())
    bias = float(state["conv15.model.2.bias"][0])
    state["conv15.model.2.weight"] = state["conv15.model.2.weight"] * gain
    state["conv15.model.2.bias"] = torch.tensor([160.0 - gain * (float(raw.mean()) - bias)])


# ---- independent forwards -----------------------------------------------------------------


def reference_anime(sd: dict[str, torch.Tensor], x: torch.Tensor, width: int) -> torch.Tensor:
    levels = anime_levels(width)

    def level(index: int, h: torch.Tensor) -> torch.Tensor:
        prefix, _, _, _, kind = levels[index]
        if kind == "outermost":
            inner = level(index + 1, F.conv2d(h, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"], 2, 1))
            up = F.conv_transpose2d(F.relu(inner), sd[f"{prefix}.3.weight"], sd[f"{prefix}.3.bias"], 2, 1)
            return torch.tanh(up)
        # (the in-place LeakyReLU activates the skip too; the parent's ReLU makes that moot)
        skip = F.leaky_relu(h, 0.2)
        down = F.conv2d(skip, sd[f"{prefix}.1.weight"], sd[f"{prefix}.1.bias"], 2, 1)
        if kind == "inner":
            down = level(index + 1, F.instance_norm(down))
        up_key = f"{prefix}.{5 if kind == 'inner' else 3}"
        up = F.conv_transpose2d(F.relu(down), sd[f"{up_key}.weight"], sd[f"{up_key}.bias"], 2, 1)
        return torch.cat([skip, F.instance_norm(up)], dim=1)

    with torch.no_grad():
        return level(0, x)


def reference_manga(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    width = sd["block0.model.0.conv1.model.2.weight"].shape[0]

    def norm_conv(prefix: str, h: torch.Tensor, stride: int = 1) -> torch.Tensor:
        h = F.batch_norm(h, sd[f"{prefix}.model.0.running_mean"], sd[f"{prefix}.model.0.running_var"],
                         sd[f"{prefix}.model.0.weight"], sd[f"{prefix}.model.0.bias"], eps=1e-3)
        weight = sd[f"{prefix}.model.2.weight"]
        return F.conv2d(F.leaky_relu(h, 0.2), weight, sd[f"{prefix}.model.2.bias"], stride,
                        weight.shape[-1] // 2)

    def block(prefix: str, h: torch.Tensor, stride: int, upsample: bool) -> torch.Tensor:
        y = norm_conv(f"{prefix}.conv1", h, stride)
        if upsample:
            y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = norm_conv(f"{prefix}.residual", y)
        if f"{prefix}.shortcut.model.0.weight" in sd:
            h = F.conv2d(h, sd[f"{prefix}.shortcut.model.0.weight"], sd[f"{prefix}.shortcut.model.0.bias"],
                         stride)
            if upsample:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return h + y

    stages: dict[str, list[tuple[str, int, bool]]] = {}
    for prefix, _, _, stride, upsample in manga_blocks(width):
        stages.setdefault(prefix.split(".")[0], []).append((prefix, stride, upsample))

    def stage(name: str, h: torch.Tensor) -> torch.Tensor:
        for prefix, stride, upsample in stages[name]:
            h = block(prefix, h, stride, upsample)
        return h

    with torch.no_grad():
        x0 = stage("block0", x)
        x1 = stage("block1", x0)
        x2 = stage("block2", x1)
        x3 = stage("block3", x2)
        x4 = stage("block4", x3)
        h = stage("block5", x4) + x3
        h = stage("block6", h) + x2
        h = stage("block7", h) + x1
        h = stage("block8", h) + x0
        return norm_conv("conv15", stage("block9", h))


def expected_anime(state: dict, picture: Image.Image, resolution: int, width: int) -> np.ndarray:
    padded, height, cut_w = extension_input(picture, resolution)
    ph, pw = padded.shape[:2]
    big = cv2.resize(padded, (int(np.ceil(pw / 256) * 256), int(np.ceil(ph / 256) * 256)),
                     interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(big).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    line = reference_anime(state, x, width)[0, 0].numpy() * 127.5 + 127.5
    line = cv2.resize(line, (pw, ph), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    out = (255 - line)[:height, :cut_w]
    return np.repeat(out[:, :, None], 3, axis=2).astype(int)


def expected_manga(state: dict, picture: Image.Image, resolution: int) -> np.ndarray:
    padded, height, cut_w = extension_input(picture, resolution)
    grey = cv2.cvtColor(padded, cv2.COLOR_RGB2GRAY)
    line = reference_manga(state, torch.from_numpy(grey).float()[None, None])[0, 0].numpy()
    out = (255 - line).clip(0, 255).astype(np.uint8)[:height, :cut_w]
    return np.repeat(out[:, :, None], 3, axis=2).astype(int)


# ---- files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_nets() -> Iterator[None]:
    """netG.pth and erika.pth stand for the narrow variants in this module (the same code)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(annotators.NETS, "netG.pth", lambda: AnimeLineartUnet(width=ANIME_WIDTH))
        patch.setitem(annotators.NETS, "erika.pth", lambda: MangaLineNet(width=MANGA_WIDTH))
        yield
    annotators.NETS_CACHE.clear()


@pytest.fixture(scope="module")
def anime_files(narrow_nets, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    """An annotator folder in the extension's layout holding netG.pth (not erika.pth), and
    erika.pth kept aside; their states."""
    root = tmp_path_factory.mktemp("anime") / "annotator"
    (root / "downloads" / "lineart_anime").mkdir(parents=True)
    anime = random_anime(ANIME_WIDTH, 11)
    torch.save(anime, root / "downloads" / "lineart_anime" / "netG.pth")
    manga = random_manga(MANGA_WIDTH, 12)
    padded, _, _ = extension_input(PICTURE, 70)
    scale_manga_output(manga, torch.from_numpy(cv2.cvtColor(padded, cv2.COLOR_RGB2GRAY)).float()[None, None])
    spare = tmp_path_factory.mktemp("spare") / "erika.pth"
    torch.save({f"module.{k}": v for k, v in manga.items()}, spare)  # DataParallel's prefix
    return {"folder": root, "anime": anime, "manga": manga, "spare": spare}


# ---- the nets --------------------------------------------------------------------------------


def test_the_nets_have_the_published_layouts_at_the_released_widths() -> None:
    with torch.device("meta"):  # 54M and 43M parameters: shapes only
        anime, manga = AnimeLineartUnet(), MangaLineNet()
    assert {k: tuple(v.shape) for k, v in anime.state_dict().items()} == anime_layout(64)
    assert {k: tuple(v.shape) for k, v in manga.state_dict().items()} == manga_layout(24)
    # the released files' sizes: 217 MB and 172 MB of float32
    assert sum(int(np.prod(s)) for s in anime_layout(64).values()) * 4 == 217_622_020
    assert sum(int(np.prod(s)) for s in manga_layout(24, counters=False).values()) * 4 == 172_539_348
    assert {k: tuple(v.shape) for k, v in AnimeLineartUnet(width=ANIME_WIDTH).state_dict().items()} \
        == anime_layout(ANIME_WIDTH)
    assert {k: tuple(v.shape) for k, v in MangaLineNet(width=MANGA_WIDTH).state_dict().items()} \
        == manga_layout(MANGA_WIDTH)


def test_the_narrow_manga_net_is_the_published_forward() -> None:
    state = random_manga(MANGA_WIDTH, 6)
    x = torch.rand(1, 1, 32, 48, generator=torch.Generator().manual_seed(2)) * 255
    scale_manga_output(state, x)
    net = MangaLineNet(width=MANGA_WIDTH)
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = net.eval()(x)
    expected = reference_manga(state, x)
    assert got.shape == (1, 1, 32, 48)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-2)
    assert 30 < float(expected.std()) < 90


def test_the_anime_unet_is_the_published_forward() -> None:
    state = random_anime(ANIME_WIDTH, 3)
    net = AnimeLineartUnet(width=ANIME_WIDTH)
    net.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got = net.eval()(x)
    expected = reference_anime(state, x, ANIME_WIDTH)
    assert got.shape == (1, 1, 256, 256)
    assert torch.allclose(got, expected, atol=1e-5)
    assert float(expected.std()) > 0.05 and float(expected.abs().max()) < 0.999  # not flat, not saturated


def test_the_manga_net_is_the_published_forward_at_its_real_width() -> None:
    state = random_manga(24, 5)
    x = torch.rand(1, 1, 32, 48, generator=torch.Generator().manual_seed(1)) * 255
    scale_manga_output(state, x)
    with torch.device("meta"):  # (no initialisation of what the state replaces)
        net = MangaLineNet()
    net.load_state_dict(state, strict=True, assign=True)
    with torch.no_grad():
        got = net.eval()(x)
    expected = reference_manga(state, x)
    assert got.shape == (1, 1, 32, 48)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-2)
    assert 30 < float(expected.std()) < 90


def test_files_with_the_real_keys_load_strictly_through_weights_only(anime_files, tmp_path: Path) -> None:  # noqa: ANN001
    net = annotators.build_net("netG.pth", anime_files["folder"] / "downloads" / "lineart_anime" / "netG.pth")
    for key, tensor in anime_files["anime"].items():
        assert torch.equal(net.state_dict()[key], tensor), key
    manga = annotators.build_net("erika.pth", anime_files["spare"])  # `module.` prefixes taken off
    assert torch.equal(manga.state_dict()["conv15.model.2.weight"],
                       anime_files["manga"]["conv15.model.2.weight"])
    # a file without the batch norms' step counters (saved before PyTorch 0.4.1) loads too
    old = tmp_path / "erika.pth"
    torch.save({k: v for k, v in anime_files["manga"].items() if not k.endswith("num_batches_tracked")}, old)
    loaded = annotators.build_net("erika.pth", old)
    assert torch.equal(loaded.state_dict()["block4.model.11.residual.model.0.running_var"],
                       anime_files["manga"]["block4.model.11.residual.model.0.running_var"])


def _refusal(path: Path, name: str, module: str) -> str:
    files = AnnotatorFiles(path.parent, {name: path})
    with pytest.raises(InvalidParameter) as caught:
        detect(check_preprocessor("module", module, files), PICTURE, 64, files=files)
    assert caught.value.status == 422 and str(path.parent) not in caught.value.message
    return caught.value.message


def test_files_that_are_not_the_net_are_refused_with_a_clear_422(anime_files, tmp_path: Path) -> None:  # noqa: ANN001
    swapped = tmp_path / "swapped" / "netG.pth"
    swapped.parent.mkdir()
    swapped.write_bytes(anime_files["spare"].read_bytes())  # the manga net under the anime name
    message = _refusal(swapped, "netG.pth", "lineart_anime")
    assert "netG.pth is not the AnimeLineartUnet net this file name stands for: 32 tensors missing" in message
    counted = tmp_path / "counted" / "erika.pth"
    counted.parent.mkdir()
    state = dict(anime_files["manga"])
    state["conv15.model.2.weight"] = state["conv15.model.2.weight"].long()
    torch.save(state, counted)
    assert "tensor conv15.model.2.weight is torch.int64, not floating point" in \
        _refusal(counted, "erika.pth", "lineart_anime_denoise")


# ---- the processing --------------------------------------------------------------------------


def test_lineart_anime_is_the_unet_with_the_extensions_processing(anime_files) -> None:  # noqa: ANN001
    files = discover_annotators(anime_files["folder"])
    assert set(files.files) == {"netG.pth"}
    module = check_preprocessor("module", "lineart_anime", files)
    for resolution, size in ((64, (64, 82)), (300, (300, 386))):  # padded 64x128 / 320x448, stretched
        got = arr(detect(module, PICTURE, resolution, files=files))  # to 256x256 / 512x512
        expected = expected_anime(anime_files["anime"], PICTURE, resolution, ANIME_WIDTH)
        assert got.shape == (size[1], size[0], 3)
        assert_close(got, expected)
        assert len(np.unique(expected)) > 30


def test_lineart_anime_denoise_is_the_manga_net_on_grey(anime_files, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "erika.pth").write_bytes(anime_files["spare"].read_bytes())
    files = discover_annotators(folder)
    module = check_preprocessor("module", "lineart_anime_denoise", files)
    got = arr(detect(module, PICTURE, 70, files=files))
    expected = expected_manga(anime_files["manga"], PICTURE, 70)
    assert got.shape == (90, 70, 3)
    assert_close(got, expected)
    assert len(np.unique(expected)) > 30
    # grey in: a picture with the same grey gives the same map
    grey = cv2.cvtColor(np.asarray(PICTURE), cv2.COLOR_RGB2GRAY)
    assert_close(arr(detect(module, Image.fromarray(np.stack([grey] * 3, axis=2)), 70, files=files)), got)


def test_listing_and_the_missing_file_rule(anime_files) -> None:  # noqa: ANN001
    files = discover_annotators(anime_files["folder"])
    served = served_preprocessors(files)
    assert "lineart_anime" in served and "lineart_anime_denoise" not in served
    assert not {"lineart_anime", "lineart_anime_denoise"} & set(served_preprocessors(None))
    with pytest.raises(InvalidParameter) as caught:
        check_preprocessor("units[0].module", "lineart_anime_denoise", files)
    assert caught.value.message == (
        "This server doesn't have units[0].module 'lineart_anime_denoise': lineart_anime_denoise needs "
        "erika.pth in models.yaml's annotator_dir; it is not there")


# ---- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anime_server(make_server, anime_files):  # noqa: ANN001, ANN201
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
annotator_dir: "{anime_files['folder']}"
""", api_keys=[f"{API_KEY}  admin"], reload_interval_s=0)


@pytest.fixture()
def http(anime_server):  # noqa: ANN001, ANN201
    with anime_server.client() as c:
        yield c


def _modules(http) -> list[str]:  # noqa: ANN001
    return http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]


def _detect(http, module: str) -> object:  # noqa: ANN001
    return http.post("/controlnet/detect", headers=AUTH, json={
        "controlnet_module": module, "controlnet_input_images": [b64(PICTURE)],
        "controlnet_processor_res": 70})


def test_over_http_listed_only_with_the_file_and_detect_answers_the_pictures_size(http, anime_files) -> None:  # noqa: ANN001
    modules = _modules(http)
    assert "lineart_anime" in modules and "lineart_anime_denoise" not in modules
    types = http.get("/controlnet/control_types", headers=AUTH).json()["control_types"]
    assert "lineart_anime" in types["Lineart"]["module_list"]
    assert "lineart_anime_denoise" not in types["Lineart"]["module_list"]
    answer = _detect(http, "lineart_anime")
    assert answer.status_code == 200, answer.text
    got = arr(decoded(answer.json()["images"][0]))
    assert got.shape == (90, 70, 3)  # the picture's size: its short side is the resolution
    assert_close(got, expected_anime(anime_files["anime"], PICTURE, 70, ANIME_WIDTH))
    answer = _detect(http, "lineart_anime_denoise")
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        "This server doesn't have controlnet_module 'lineart_anime_denoise': lineart_anime_denoise "
        "needs erika.pth in models.yaml's annotator_dir; it is not there")


def test_over_http_erika_added_is_served_after_a_reload(http, anime_files) -> None:  # noqa: ANN001
    added = anime_files["folder"] / "downloads" / "manga_line" / "erika.pth"
    added.parent.mkdir()
    added.write_bytes(anime_files["spare"].read_bytes())
    try:
        assert http.post("/admin/reload", headers=AUTH).status_code == 200
        assert "lineart_anime_denoise" in _modules(http)
        answer = _detect(http, "lineart_anime_denoise")
        assert answer.status_code == 200, answer.text
        got = arr(decoded(answer.json()["images"][0]))
        assert got.shape == (90, 70, 3)
        assert_close(got, expected_manga(anime_files["manga"], PICTURE, 70))
    finally:
        added.unlink()
        added.parent.rmdir()
    assert http.post("/admin/reload", headers=AUTH).status_code == 200
    assert "lineart_anime_denoise" not in _modules(http)
