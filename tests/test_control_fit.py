"""A ControlNet unit's detected map fitted to the generated size as sd-webui-controlnet's
`detectmap_proc` / `high_quality_resize` fit it (app.engine.preprocessors.fit,
app.engine.map_resize), and the fitted maps A1111's answer shows. Expected values come from
OpenCV and NumPy called here (cv2.resize with the interpolation the extension's rule names,
cv2.Canny, Otsu's threshold, numpy's median) and from properties an edge map must keep."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import API_KEY
from tests.controlnet_files import save_folder, tiny_controlnet
from tests.pictures import arr, b64, decoded, noise

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = 0, 1, 2


def fitted(array: np.ndarray, width: int, height: int, mode: int = JUST_RESIZE) -> np.ndarray:
    from app.engine.preprocessors import fit

    return np.asarray(fit(Image.fromarray(array), width, height, mode))


def grey(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.stack([values.astype(np.uint8)] * 3, axis=2))


def shapes(width: int = 48, height: int = 40) -> np.ndarray:
    """A picture of three separate filled shapes: its Canny edges are closed thin outlines."""
    picture = np.full((height, width, 3), 30, np.uint8)
    cv2.circle(picture, (11 * width // 48, 12 * height // 40), 8 * width // 48, (200, 60, 60), -1)
    cv2.rectangle(picture, (27 * width // 48, 5 * height // 40), (42 * width // 48, 17 * height // 40),
                  (60, 200, 90), -1)
    cv2.ellipse(picture, (24 * width // 48, 31 * height // 40), (15 * width // 48, 5 * height // 40), 10,
                0, 360, (90, 90, 230), -1)
    return picture


def assert_thin_edges(got: np.ndarray, edges: np.ndarray) -> None:
    """`got` (HxWx3) is a black-and-white edge map one pixel thin whose lines lie where the
    nearest-neighbour resize of `edges` (a Canny map) has them, within a pixel (both ways).
    One pixel thin: no 2x2 square all white, but for at most 2 (the extension's thinning keeps
    a rare one where outlines meet; a 2x enlargement without it has hundreds)."""
    assert set(np.unique(got)) == {0, 255}
    assert (got[:, :, 0] == got[:, :, 1]).all() and (got[:, :, 0] == got[:, :, 2]).all()
    lines = got[:, :, 0] > 0
    blocks = lines[:-1, :-1] & lines[1:, :-1] & lines[:-1, 1:] & lines[1:, 1:]
    assert blocks.sum() <= 2, np.argwhere(blocks)
    near = cv2.resize(edges, (got.shape[1], got.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    ring = np.ones((3, 3), np.uint8)
    covered = cv2.dilate(lines.astype(np.uint8), ring)[near] > 0
    assert covered.mean() > 0.95, covered.mean()
    placed = cv2.dilate(near.astype(np.uint8), ring)[lines] > 0  # few lines where there were none
    assert placed.mean() > 0.95, placed.mean()


# ---- the resize rule ----------------------------------------------------------------------------
def test_a_grey_gradient_resizes_cubic_up_and_area_down() -> None:
    """32x32 pixels, 256 grey levels (not a label map): OpenCV's bicubic to enlarge, area
    averaging to shrink, as the extension (and as any photo-like map)."""
    y, x = np.mgrid[0:32, 0:32]
    gradient = grey(np.round((x * 32 + y) * 255 / 1023))
    assert len(np.unique(gradient)) == 256
    assert (fitted(gradient, 64, 48) == cv2.resize(gradient, (64, 48), interpolation=cv2.INTER_CUBIC)).all()
    assert (fitted(gradient, 16, 12) == cv2.resize(gradient, (16, 12), interpolation=cv2.INTER_AREA)).all()
    # the same pixel count in another shape is not a shrink: bicubic
    assert (fitted(gradient, 64, 16) == cv2.resize(gradient, (64, 16), interpolation=cv2.INTER_CUBIC)).all()
    colour = np.asarray(noise(24, 20, seed=3))
    assert (fitted(colour, 48, 40) == cv2.resize(colour, (48, 40), interpolation=cv2.INTER_CUBIC)).all()


def test_a_label_map_keeps_exactly_its_colours() -> None:
    """5 colours in 4-pixel blocks: nearest neighbour both ways, no colour made up."""
    rng = np.random.default_rng(7)
    palette = np.array([[0, 0, 0], [255, 0, 0], [20, 200, 40], [70, 70, 250], [250, 250, 120]], np.uint8)
    labels = np.kron(rng.integers(0, 5, (5, 6)), np.ones((4, 4), int))
    segments = np.ascontiguousarray(palette[labels])  # 24x20
    colours = {tuple(c) for c in palette}
    for size in ((56, 44), (13, 9), (40, 20)):
        got = fitted(segments, *size)
        assert (got == cv2.resize(segments, size, interpolation=cv2.INTER_NEAREST)).all()
        assert {tuple(c) for c in got.reshape(-1, 3)} <= colours
    assert {tuple(c) for c in fitted(segments, 56, 44).reshape(-1, 3)} == colours


def test_few_grey_levels_count_as_labels_as_in_the_extension() -> None:
    """The extension counts colours only: a grey map of 8 levels (3 to 199 colours) is resized
    by nearest neighbour like a label map, so its levels stay as they are."""
    levels = grey(np.kron(np.arange(8).reshape(2, 4) * 30 + 10, np.ones((6, 6), int)))
    got = fitted(levels, 50, 26)
    assert (got == cv2.resize(levels, (50, 26), interpolation=cv2.INTER_NEAREST)).all()
    assert set(np.unique(got)) == set(np.unique(levels))


def test_two_colours_not_black_and_white_are_resized_as_a_picture() -> None:
    """Two greys (40 and 200): neither binary (dark under 16, bright over 240) nor labels."""
    two = grey(np.where(np.asarray(noise(20, 16, seed=2))[:, :, 0] > 128, 200, 40))
    assert (fitted(two, 40, 32) == cv2.resize(two, (40, 32), interpolation=cv2.INTER_CUBIC)).all()


def test_a_canny_map_enlarged_2x_stays_black_and_white_and_one_pixel_thin() -> None:
    edges = cv2.Canny(shapes(), 50, 100)
    assert 0.05 < (edges > 0).mean() < 0.2
    got = fitted(grey(edges), 96, 80)
    assert_thin_edges(got, edges)
    lines = got[:, :, 0] > 0
    assert not (lines[:-1, :-1] & lines[1:, :-1] & lines[:-1, 1:] & lines[1:, 1:]).any()  # here, none
    cubic = cv2.resize(grey(edges), (96, 80), interpolation=cv2.INTER_CUBIC)
    assert len(np.unique(cubic)) > 2  # what a plain resize would have shown the net


def test_a_canny_map_shrunk_stays_black_and_white_and_thin() -> None:
    edges = cv2.Canny(shapes(96, 80), 50, 100)
    got = fitted(grey(edges), 72, 60)
    assert_thin_edges(got, edges)


def test_a_thick_black_and_white_map_is_otsus_threshold_of_the_resize() -> None:
    """A filled disc is binary but not one-pixel edges (an opening keeps it): the cubic resize
    averaged over the channels, then thresholded by Otsu's method; no thinning."""
    disc = np.zeros((30, 34), np.uint8)
    cv2.circle(disc, (17, 15), 10, 255, -1)
    cubic = cv2.resize(grey(disc), (68, 60), interpolation=cv2.INTER_CUBIC)
    mean = np.mean(cubic.astype(np.float32), axis=2).astype(np.uint8)
    _, expected = cv2.threshold(mean, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    got = fitted(grey(disc), 68, 60)
    assert (got[:, :, 0] == expected).all() and (got[:, :, 2] == expected).all()
    assert len(np.unique(cubic)) > 2 and (expected[20:40, 24:44] == 255).all()  # still filled


@pytest.mark.parametrize("mode", [JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL])
def test_a_map_at_the_generated_size_is_unchanged(mode: int) -> None:
    edges = grey(cv2.Canny(shapes(), 50, 100))
    assert (fitted(edges, 48, 40, mode) == edges).all()


# ---- the resize modes ---------------------------------------------------------------------------
def test_crop_and_resize_rounds_the_scaled_size_and_cuts_the_centre() -> None:
    """21x20 to 64x64: k = 64/20 = 3.2, 67.2 -> 67 columns, (67 - 64) // 2 = 1 cut on the left.
    5x4 to 10x10: k = 2.5, 12.5 -> 12 (numpy rounds half to even), 1 cut on the left; its 20
    colours make it a label map (nearest neighbour)."""
    picture = np.asarray(noise(21, 20, seed=4))
    wide = cv2.resize(picture, (67, 64), interpolation=cv2.INTER_CUBIC)
    assert (fitted(picture, 64, 64, CROP_AND_RESIZE) == wide[:, 1:65]).all()
    small = np.asarray(noise(5, 4, seed=5))
    scaled = cv2.resize(small, (12, 10), interpolation=cv2.INTER_NEAREST)
    assert (fitted(small, 10, 10, CROP_AND_RESIZE) == scaled[:, 1:11]).all()
    tall = np.asarray(noise(20, 27, seed=6))  # k = 0.8: 16x21.6 -> 16x22 by area, 3 rows cut at the top
    shrunk = cv2.resize(tall, (16, 22), interpolation=cv2.INTER_AREA)
    assert (fitted(tall, 16, 16, CROP_AND_RESIZE) == shrunk[3:19]).all()


def test_resize_and_fill_fills_with_the_median_of_the_border_lines() -> None:
    """21x20 into 64x64: k = 64/21, 64x61 (60.95 rounded), 1 row above and 2 below; the rest
    is the per-channel median of the map's first and last rows and columns."""
    picture = np.asarray(noise(21, 20, seed=8)).copy()
    picture[0], picture[:, -1] = (200, 10, 90), (180, 30, 70)  # a border whose median is not black
    border = np.concatenate([picture[0], picture[-1], picture[:, 0], picture[:, -1]], axis=0)
    median = np.median(border, axis=0).astype(np.uint8)
    got = fitted(picture, 64, 64, RESIZE_AND_FILL)
    assert (got[1:62] == cv2.resize(picture, (64, 61), interpolation=cv2.INTER_CUBIC)).all()
    assert (got[0] == median).all() and (got[62:] == median).all() and median.any()
    wide = np.asarray(noise(30, 10, seed=9))  # into 24x24: 24x8, 8 rows above and below
    lines = np.concatenate([wide[0], wide[-1], wide[:, 0], wide[:, -1]], axis=0)
    got = fitted(wide, 24, 24, RESIZE_AND_FILL)
    assert (got[8:16] == cv2.resize(wide, (24, 8), interpolation=cv2.INTER_AREA)).all()
    assert (got[:8] == np.median(lines, axis=0).astype(np.uint8)).all()


def test_just_resize_stretches_an_edge_map_to_the_target() -> None:
    edges = cv2.Canny(shapes(), 50, 100)
    got = fitted(grey(edges), 96, 64, JUST_RESIZE)  # 2x wide, 1.6x high
    assert got.shape == (64, 96, 3)
    assert_thin_edges(got, edges)


# ---- what A1111's answer shows ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_server(make_server, tmp_path_factory):  # noqa: ANN001, ANN201
    folder = tmp_path_factory.mktemp("controlnets")
    save_folder(tiny_controlnet("sdxl"), folder / "cn-xl")
    return make_server(f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
controlnet_dirs: ["{folder}"]
""")


@pytest.fixture()
def http(fit_server):  # noqa: ANN001, ANN201
    with fit_server.client() as c:
        yield c


PICTURE = shapes(64, 64)
EDGES = cv2.Canny(PICTURE, 50, 100)  # the canny unit's map at processor_res 64 (no resize, no padding)


def canny_unit(**fields) -> dict:
    return {"enabled": True, "module": "canny", "model": "cn-xl", "image": b64(Image.fromarray(PICTURE)),
            "processor_res": 64, "threshold_a": 50, "threshold_b": 100, **fields}


def txt2img(http, units: list, size: int, **fields) -> list[np.ndarray]:  # noqa: ANN001
    answer = http.post("/sdapi/v1/txt2img", headers=AUTH, json={
        "prompt": "a lighthouse", "steps": 2, "width": size, "height": size, "seed": 3,
        "sampler_name": "Euler", "alwayson_scripts": {"controlnet": {"args": units}}, **fields})
    assert answer.status_code == 200, answer.text
    return [arr(decoded(image)).astype(np.uint8) for image in answer.json()["images"]]


def test_a1111_answers_the_map_fitted_to_the_generated_size(http) -> None:  # noqa: ANN001
    images = txt2img(http, [canny_unit()], 128)
    assert len(images) == 2 and images[1].shape == (128, 128, 3)
    assert_thin_edges(images[1], EDGES)
    at_size = txt2img(http, [canny_unit()], 64)
    assert (at_size[1] == grey(EDGES)).all()  # detected at the generated size: as detected


def test_with_the_hires_fix_the_hires_map_comes_before_the_low_res_one(http) -> None:  # noqa: ANN001
    """As the extension: per unit, its map fitted to the second pass, then to the first; a
    unit that guides the first pass only shows both too; save_detected_map false shows none."""
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos", "denoising_strength": 0.5,
             "hr_second_pass_steps": 2}
    images = txt2img(http, [canny_unit(), canny_unit(hr_option="Low res only", resize_mode="Resize and Fill",
                                                     save_detected_map=False)], 64, **hires)
    assert [image.shape for image in images] == [(128, 128, 3)] * 2 + [(64, 64, 3)]
    assert_thin_edges(images[1], EDGES)
    assert (images[2] == grey(EDGES)).all()
    images = txt2img(http, [canny_unit(save_detected_map=False), canny_unit(hr_option="Low res only")], 64,
                     **hires)
    assert [image.shape for image in images] == [(128, 128, 3)] * 2 + [(64, 64, 3)]
    assert_thin_edges(images[1], EDGES)
    assert (images[2] == grey(EDGES)).all()
