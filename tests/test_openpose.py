"""The `openpose` preprocessor (body only): OpenPose's body net from `body_pose_model.pth` in
models.yaml's `annotator_dir:`, and sd-webui-controlnet's processing around it.

The weight file is written here with random tensors in the published layout, stated by hand
below (not read from the code under test): `body_pose_model.pth` of lllyasviel/Annotators
(pytorch-openpose's conversion of CMU's Caffe model; sd-webui-controlnet
`annotator/openpose/model.py` `bodypose_model`, whose `util.transfer` maps its nested
`model0.conv1_1.weight` onto the file's flat `conv1_1.weight`): float32 tensors under the Caffe
layer names, weight and bias each:

- `conv1_1`, `conv1_2` (3->64->64), `conv2_1`, `conv2_2` (->128), `conv3_1..3_4` (->256),
  `conv4_1`, `conv4_2` (->512), `conv4_3_CPM` (->256), `conv4_4_CPM` (->128), all 3x3;
- stage 1, branch L1 (PAFs, 38 out) and L2 (heatmaps, 19 out): `conv5_1_CPM_L?`..`conv5_3`
  3x3 128->128, `conv5_4_CPM_L?` 1x1 128->512, `conv5_5_CPM_L?` 1x1 512->out;
- stages 2..6, both branches: `Mconv1_stage<s>_L?` 7x7 185->128, `Mconv2..5` 7x7 128->128,
  `Mconv6` 1x1 128->128, `Mconv7` 1x1 128->out.

The net's output is checked against a forward written here with torch.nn.functional from the
state dict (ReLU after every conv but each branch's last, 2x2 max-pools after conv1_2, conv2_2
and conv3_4, except that the published net also rectifies stage 6's heatmaps: its list of
layers without ReLU names Mconv7_stage6_L1 twice and Mconv7_stage6_L2 never). The
post-processing is checked on heatmaps and PAFs built here, and the drawing against cv2 calls
made here with the extension's colours and stick width.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

from app.annotator_files import discover_annotators
from app.engine import annotators
from app.engine import openpose as pose
from app.engine.annotator_nets import BodyPoseNet
from app.engine.preprocessors import check_preprocessor, detect, served_preprocessors
from app.errors import InvalidParameter
from tests.conftest import API_KEY
from tests.pictures import b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}

# ---- the published layout, by hand -----------------------------------------------------------

FEATURES = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
            ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
            ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3_CPM", 512, 256),
            ("conv4_4_CPM", 256, 128)]
POOL_AFTER = {"conv1_2", "conv2_2", "conv3_4"}


def branch(stage: int, limb_branch: int) -> list[tuple[str, int, int, int]]:
    out = 38 if limb_branch == 1 else 19
    if stage == 1:
        return [(f"conv5_{k}_CPM_L{limb_branch}", 128, 128, 3) for k in (1, 2, 3)] + [
            (f"conv5_4_CPM_L{limb_branch}", 128, 512, 1), (f"conv5_5_CPM_L{limb_branch}", 512, out, 1)]
    name = f"stage{stage}_L{limb_branch}"
    return [(f"Mconv{k}_{name}", 185 if k == 1 else 128, 128, 7) for k in range(1, 6)] + [
        (f"Mconv6_{name}", 128, 128, 1), (f"Mconv7_{name}", 128, out, 1)]


def body_layout() -> dict[str, tuple[int, ...]]:
    convs = [(name, c_in, c_out, 3) for name, c_in, c_out in FEATURES]
    convs += [c for stage in range(1, 7) for b in (1, 2) for c in branch(stage, b)]
    layout: dict[str, tuple[int, ...]] = {}
    for name, c_in, c_out, k in convs:
        layout[f"{name}.weight"] = (c_out, c_in, k, k)
        layout[f"{name}.bias"] = (c_out,)
    return layout


def random_body_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in body_layout().items():
        if len(shape) == 1:
            state[key] = torch.randn(shape, generator=generator) * 0.05
        else:
            state[key] = torch.randn(shape, generator=generator) * (2.0 / math.prod(shape[1:])) ** 0.5
    return state


def reference_body(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def conv(h: torch.Tensor, name: str) -> torch.Tensor:
        weight = sd[f"{name}.weight"]
        return F.conv2d(h, weight, sd[f"{name}.bias"], padding=weight.shape[-1] // 2)

    h = x
    for name, _, _ in FEATURES:
        h = F.relu(conv(h, name))
        if name in POOL_AFTER:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
    features = h
    for stage in range(1, 7):
        outs = []
        for b in (1, 2):
            y = h
            names = [c[0] for c in branch(stage, b)]
            for i, name in enumerate(names):
                y = conv(y, name)
                if i < len(names) - 1 or (stage == 6 and b == 2):
                    y = F.relu(y)
            outs.append(y)
        h = torch.cat([outs[0], outs[1], features], dim=1)
    return outs[0], outs[1]


@pytest.fixture(scope="module")
def body_file(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("annotators") / "downloads" / "openpose"  # the extension's place
    folder.mkdir(parents=True)
    state = random_body_state(7)
    torch.save(state, folder / "body_pose_model.pth")
    return {"root": folder.parent.parent, "path": folder / "body_pose_model.pth", "state": state}


@pytest.fixture(scope="module")
def body_net(body_file) -> nn.Module:  # noqa: ANN001
    """The net as the server loads it (its cache, which the live server below shares)."""
    return annotators.NETS_CACHE.get("body_pose_model.pth", body_file["path"])


def test_the_net_has_the_files_flat_layout_and_loads_it_strictly(body_file, body_net) -> None:  # noqa: ANN001
    assert {k: tuple(v.shape) for k, v in BodyPoseNet().state_dict().items()} == body_layout()
    for key, tensor in body_file["state"].items():
        assert torch.equal(body_net.state_dict()[key], tensor), key
    # the published code's nested names are not this file's: refused, naming the first missing
    nested = body_file["path"].parent / "nested" / "body_pose_model.pth"
    nested.parent.mkdir()
    torch.save({f"model0.{k}": v for k, v in list(body_file["state"].items())[:4]}, nested)
    with pytest.raises(annotators.AnnotatorFileError, match="not the BodyPoseNet net.*184 tensors missing"):
        annotators.build_net("body_pose_model.pth", nested)


def test_the_net_is_the_published_forward(body_file, body_net) -> None:  # noqa: ANN001
    x = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.no_grad():
        pafs, heatmaps = body_net(x)
        ref_pafs, ref_heatmaps = reference_body(body_file["state"], x)
    assert pafs.shape == (1, 38, 3, 4) and heatmaps.shape == (1, 19, 3, 4)
    torch.testing.assert_close(pafs, ref_pafs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(heatmaps, ref_heatmaps, rtol=1e-4, atol=1e-4)
    assert (ref_pafs < 0).any() and (ref_heatmaps > 0).any()  # not all rectified away


# ---- the maps around the net ----------------------------------------------------------------


class Recorder(nn.Module):
    """A stand-in net: keeps its input, answers fixed maps of an eighth of its size."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = x.clone()
        h, w = x.shape[2] // 8, x.shape[3] // 8
        g = torch.Generator().manual_seed(5)
        return torch.rand(1, 38, h, w, generator=g), torch.rand(1, 19, h, w, generator=g)


def test_body_maps_scale_pad_and_resize_as_the_extension() -> None:
    bgr = np.asarray(noise(128, 64, seed=2))  # 64 high: enlarged by 184 / 64
    net = Recorder()
    heatmaps, pafs = pose.body_maps(net, bgr)
    k = 0.5 * 368 / 64
    small = cv2.resize(bgr, (int(128 * k), int(64 * k)), interpolation=cv2.INTER_LANCZOS4)  # 368 x 184
    assert small.shape == (184, 368, 3)  # both multiples of 8: nothing to pad
    padded = small
    expected_in = torch.from_numpy(np.float32(padded) / 256 - 0.5).permute(2, 0, 1)[None]
    torch.testing.assert_close(net.seen, expected_in)
    out_pafs, out_heat = net(net.seen)
    for got, maps in ((heatmaps, out_heat), (pafs, out_pafs)):
        channels = maps[0].numpy()
        expected = np.stack([
            cv2.resize(cv2.resize(c, (c.shape[1] * 8, c.shape[0] * 8), interpolation=cv2.INTER_LANCZOS4)
                       [:small.shape[0], :small.shape[1]], (128, 64), interpolation=cv2.INTER_AREA)
            for c in channels], axis=2)
        assert got.shape == expected.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_a_picture_that_does_not_divide_by_8_is_padded_with_128() -> None:
    bgr = np.asarray(noise(100, 300, seed=3))  # 300 high: shrunk by 184 / 300, sizes truncated
    net = Recorder()
    heatmaps, _ = pose.body_maps(net, bgr)
    k = 0.5 * 368 / 300
    small = cv2.resize(bgr, (int(100 * k), int(300 * k)), interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]
    assert w == 61 and h in (183, 184)
    assert tuple(net.seen.shape) == (1, 3, 184, 64)  # right and down to multiples of 8
    seen = ((net.seen[0].permute(1, 2, 0).numpy() + 0.5) * 256).round().astype(int)
    np.testing.assert_array_equal(seen[:h, :w], small)
    assert (seen[h:] == 128).all() and (seen[:, w:] == 128).all()
    assert heatmaps.shape == (300, 100, 19)


# ---- peaks, limbs, people, drawing on maps built here -----------------------------------------

H, W = 96, 128
# the extension's limb colours (RGB) and the 0.6 it draws sticks with
EXT_COLOURS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
               [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
               [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]


def blob(x: int, y: int, amplitude: float = 1.0, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))


def field(pafs: np.ndarray, channels: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> None:
    """The unit vector from a to b written into the two PAF channels along the segment (3 px wide)."""
    d = np.subtract(b, a) / np.hypot(*np.subtract(b, a))
    for t in np.linspace(0, 1, 200):
        x, y = np.rint(np.add(a, t * np.subtract(b, a))).astype(int)
        pafs[y - 1:y + 2, x - 1:x + 2, channels[0]] = d[0]
        pafs[y - 1:y + 2, x - 1:x + 2, channels[1]] = d[1]


def stick(canvas: np.ndarray, a: tuple[int, int], b: tuple[int, int], colour: list[int]) -> None:
    """The extension's stick: an ellipse around the midpoint, half-length by 4."""
    length = math.hypot(a[0] - b[0], a[1] - b[1])
    angle = math.degrees(math.atan2(a[1] - b[1], a[0] - b[0]))
    polygon = cv2.ellipse2Poly((int((a[0] + b[0]) / 2), int((a[1] + b[1]) / 2)), (int(length / 2), 4),
                               int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in colour])


# neck (1) -> right shoulder (2) -> right elbow (3) -> right wrist (4): limbs 0, 2, 3, whose PAF
# channels are (12, 13), (14, 15), (16, 17)
ARM = {1: (40, 20), 2: (20, 30), 3: (22, 55), 4: (30, 80)}
ARM_LIMBS = [((1, 2), (12, 13), 0), ((2, 3), (14, 15), 2), ((3, 4), (16, 17), 3)]


def maps_of(people: list[dict[int, tuple[int, int]]], limbs: list,
            shape: tuple[int, int] = (H, W)) -> tuple[np.ndarray, np.ndarray]:
    heatmaps, pafs = np.zeros((*shape, 19)), np.zeros((*shape, 38))
    for person in people:
        for part, (x, y) in person.items():
            heatmaps[:, :, part] += blob(x, y, shape=shape)
        for (pa, pb), channels, _ in limbs:
            if pa in person and pb in person:
                field(pafs, channels, person[pa], person[pb])
    return heatmaps, pafs


def test_peaks_are_the_smoothed_maxima_above_the_threshold() -> None:
    heatmaps = np.zeros((H, W, 19))
    heatmaps[:, :, 0] = blob(30, 40) + blob(90, 60, 0.8)
    heatmaps[:, :, 5] = blob(64, 48, 0.3)  # above 0.1, but smoothed by sigma 3 under it: no peak
    peaks = pose.find_peaks(heatmaps)
    smooth = gaussian_filter(heatmaps[:, :, 5], 3)
    assert heatmaps[:, :, 5].max() > 0.1 > smooth.max() and peaks[5] == []
    assert [(p[0], p[1]) for p in peaks[0]] == [(30, 40), (90, 60)]  # row-major order
    assert [p[3] for p in peaks[0]] == [0, 1]
    assert peaks[0][0][2] == pytest.approx(1.0) and peaks[0][1][2] == pytest.approx(0.8)


def test_two_keypoints_with_a_field_between_them_make_one_limb_of_the_extensions_score() -> None:
    heatmaps, pafs = maps_of([{1: ARM[1], 2: ARM[2]}], ARM_LIMBS)
    heatmaps[:, :, 3] = blob(100, 80)  # an elbow with no field to the shoulder
    peaks = pose.find_peaks(heatmaps)
    limbs = pose.connect_limbs(peaks, pafs, H)
    (a, b, score, i, j), = limbs[0]
    assert (a, b, i, j) == (0, 1, 0, 0)
    # every sample lies on the field: the unit vector along the limb projects to 1
    length = math.hypot(ARM[2][0] - ARM[1][0], ARM[2][1] - ARM[1][1])
    assert score == pytest.approx(1.0 + min(0.5 * H / length - 1, 0))
    assert limbs[2] is not None and len(limbs[2]) == 0  # shoulder -> elbow: no field, no limb
    assert limbs[1] is None  # the left shoulder has no peak
    # two parts are not a person (at least 4): nothing is drawn
    assert pose.bodies_from_maps(heatmaps, pafs) == []


def test_a_person_is_assembled_and_drawn_as_the_extension_draws() -> None:
    heatmaps, pafs = maps_of([ARM], ARM_LIMBS)
    bodies = pose.bodies_from_maps(heatmaps, pafs)
    assert len(bodies) == 1
    assert [part for part in range(18) if bodies[0][part] is not None] == sorted(ARM)
    for part, (x, y) in ARM.items():  # as fractions of the picture's width and height
        assert bodies[0][part] == pytest.approx((x / W, y / H))
    got = pose.draw_bodies(bodies, H, W)
    # the extension draws at int(fraction * size): the pixel, or one less where the fraction rounds down
    at = {part: (int(x / W * W), int(y / H * H)) for part, (x, y) in ARM.items()}
    expected = np.zeros((H, W, 3), np.uint8)
    for (pa, pb), _, limb in ARM_LIMBS:
        stick(expected, at[pa], at[pb], EXT_COLOURS[limb])
    for part, point in at.items():
        cv2.circle(expected, point, 4, EXT_COLOURS[part], thickness=-1)
    np.testing.assert_array_equal(got, expected)
    # the neck-to-shoulder stick is there in its colour, halfway between the two peaks
    assert tuple(got[25, 30]) == (153, 0, 0)


def test_two_people_are_two_skeletons_and_a_three_part_one_is_dropped() -> None:
    other = {part: (x + 70, y) for part, (x, y) in ARM.items()}
    partial = {1: (60, 10), 2: (62, 20), 3: (64, 30)}  # too far from the rest to join them
    heatmaps, pafs = maps_of([ARM, other], ARM_LIMBS)
    bodies = pose.bodies_from_maps(heatmaps, pafs)
    assert sorted(int(b[1][0] * W) for b in bodies) == [40, 110]
    heatmaps, pafs = maps_of([partial], ARM_LIMBS)
    assert pose.bodies_from_maps(heatmaps, pafs) == []


def test_two_fragments_that_a_later_limb_joins_are_merged_into_one_person() -> None:
    # neck-shoulder (limb 0) and nose-eye-ear (limbs 13, 14) have no limb between them until
    # shoulder-ear (limb 17): two people of 2 and 3 parts, each too small alone, merged into one of 5
    parts = {1: (64, 60), 2: (40, 62), 0: (64, 30), 14: (56, 22), 16: (44, 20)}
    limbs = [((1, 2), (12, 13), 0), ((0, 14), (30, 31), 13), ((14, 16), (34, 35), 14),
             ((2, 16), (18, 19), 17)]
    heatmaps, pafs = maps_of([parts], limbs)
    bodies = pose.bodies_from_maps(heatmaps, pafs)
    assert len(bodies) == 1
    assert [part for part in range(18) if bodies[0][part] is not None] == [0, 1, 2, 14, 16]
    heatmaps, pafs = maps_of([parts], limbs[:3])  # without the joining limb: nobody
    assert pose.bodies_from_maps(heatmaps, pafs) == []
    # the joining limb (shoulder to ear) is found but, as in the extension, not drawn
    got = pose.draw_bodies(bodies, H, W)
    assert not (got == [int(c * 0.6) for c in EXT_COLOURS[17]]).all(axis=2).any()
    assert (got == [int(c * 0.6) for c in EXT_COLOURS[13]]).all(axis=2).any()


def test_detect_draws_on_the_padded_picture_and_cuts_the_padding_off(body_file, body_net,  # noqa: ANN001
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    picture = noise(70, 90, seed=1)  # at 64: 64 x 82, padded to 64 x 128
    files = discover_annotators(body_file["root"])
    seen = []

    def maps(net: nn.Module, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert net is body_net
        seen.append(bgr.copy())
        return maps_of([ARM], ARM_LIMBS, shape=bgr.shape[:2])

    monkeypatch.setattr(pose, "body_maps", maps)
    got = np.asarray(detect(check_preprocessor("module", "openpose", files), picture, 64, files=files))
    rgb = cv2.resize(np.asarray(picture), (64, 82), interpolation=cv2.INTER_AREA)
    padded = np.pad(rgb, ((0, 128 - 82), (0, 0), (0, 0)), mode="edge")
    np.testing.assert_array_equal(seen[0], padded[:, :, ::-1])  # the net reads BGR
    expected = np.zeros((128, 64, 3), np.uint8)
    at = {part: (int(x / 64 * 64), int(y / 128 * 128)) for part, (x, y) in ARM.items()}
    for (pa, pb), _, limb in ARM_LIMBS:
        stick(expected, at[pa], at[pb], EXT_COLOURS[limb])
    for part, point in at.items():
        cv2.circle(expected, point, 4, EXT_COLOURS[part], thickness=-1)
    np.testing.assert_array_equal(got, expected[:82])


def test_a_short_limb_far_from_the_field_is_not_connected() -> None:
    heatmaps, pafs = maps_of([ARM], ARM_LIMBS)
    pafs[:, :, 12:14] *= -1  # the neck -> shoulder field points the other way
    limbs = pose.connect_limbs(pose.find_peaks(heatmaps), pafs, H)
    assert len(limbs[0]) == 0 and len(limbs[2]) == 1


# ---- as a preprocessor and over HTTP ---------------------------------------------------------


def test_served_only_with_the_file(body_file) -> None:  # noqa: ANN001
    assert "openpose" not in served_preprocessors(None)
    with pytest.raises(InvalidParameter) as caught:
        check_preprocessor("module", "openpose", discover_annotators(body_file["root"] / "elsewhere"))
    assert "openpose needs body_pose_model.pth in models.yaml's annotator_dir" in caught.value.message
    files = discover_annotators(body_file["root"])
    assert files.path("body_pose_model.pth") == body_file["path"].resolve()
    module = check_preprocessor("module", "OpenPose", files)
    assert module.name == "openpose" and "openpose" in served_preprocessors(files)
    assert module.control_type == "OpenPose" and module.weights == "body_pose_model.pth"


@pytest.fixture(scope="module")
def pose_server(make_server, body_file):  # noqa: ANN001, ANN201
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl"}}
annotator_dir: "{body_file['root']}"
""")


def test_listed_and_detected_over_http(pose_server, body_net) -> None:  # noqa: ANN001
    with pose_server.client() as http:
        modules = http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]
        assert "openpose" in modules
        types = http.get("/controlnet/control_types", headers=AUTH).json()["control_types"]
        assert types["OpenPose"]["module_list"] == ["openpose"]
        assert types["OpenPose"]["default_option"] == "openpose"
        answer = http.post("/controlnet/detect", headers=AUTH, json={
            "controlnet_module": "openpose", "controlnet_input_images": [b64(noise(90, 70, seed=2))],
            "controlnet_processor_res": 64})
        assert answer.status_code == 200, answer.text
        assert decoded(answer.json()["images"][0]).size == (82, 64)  # short side 64, 90 * 64 / 70
    assert "body_pose_model.pth" in annotators.NETS_CACHE.loaded()


def test_without_the_file_it_is_not_listed_and_detect_is_422(server) -> None:  # noqa: ANN001
    with server.client() as http:
        assert "openpose" not in http.get("/controlnet/module_list", headers=AUTH).json()["module_list"]
        answer = http.post("/controlnet/detect", headers=AUTH, json={
            "controlnet_module": "openpose", "controlnet_input_images": [b64(Image.new("RGB", (64, 64)))]})
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        "This server doesn't have controlnet_module 'openpose': openpose needs body_pose_model.pth in "
        "an annotator folder, and models.yaml sets no annotator_dir")

