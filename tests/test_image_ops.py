"""A1111's pixel rules for image to image (app.engine.image_ops), each against values computed
here another way: PIL's own operations, OpenCV's Gaussian blur, boxes worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.engine.image_ops import (
    binary_mask,
    blur_mask,
    crop_region,
    expand_region,
    fill,
    finish,
    prepare_source,
    resize_image,
)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_just_resize_is_lanczos() -> None:
    picture = noise(96, 80)
    expected = picture.resize((64, 48), Image.LANCZOS)
    assert arr(resize_image(0, picture, 64, 48)).tolist() == arr(expected).tolist()


def test_crop_and_resize_covers_then_crops_the_middle() -> None:
    picture = noise(128, 64)  # 2:1 into 1:1 at the same height: the middle 64 columns, unscaled
    assert np.array_equal(arr(resize_image(1, picture, 64, 64)), arr(picture.crop((32, 0, 96, 64))))
    tall = noise(40, 100)  # 2:5 into 1:1 of 20: scaled to 20x50, the middle 20 rows
    expected = tall.resize((20, 50), Image.LANCZOS).crop((0, 15, 20, 35))
    assert np.array_equal(arr(resize_image(1, tall, 20, 20)), arr(expected))


def test_resize_and_fill_fits_and_stretches_the_edges_into_the_bars() -> None:
    picture = noise(128, 64)  # fits as 64x32 in the middle of 64x64, bars of 16 rows
    out = arr(resize_image(2, picture, 64, 64))
    fitted = arr(picture.resize((64, 32), Image.LANCZOS))
    assert np.array_equal(out[16:48], fitted)
    # each bar is one row stretched: the edge row of the fitted picture, as PIL samples it
    assert (out[:16] == out[0][None]).all() and (out[48:] == out[48][None]).all()
    assert np.abs(out[0] - fitted[0]).mean() < 8 and np.abs(out[48] - fitted[-1]).mean() < 8
    assert np.abs(out[0] - fitted[-1]).mean() > 30  # (the top bar is not the bottom row)


def test_an_rgba_mask_that_is_not_opaque_is_read_from_its_alpha() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # black everywhere: the colour says "keep"
    rgba.putpixel((2, 3), (0, 0, 0, 200))
    rgba.putpixel((4, 4), (0, 0, 0, 100))  # alpha at or below 128: keep
    got = arr(binary_mask(rgba))
    assert got[3, 2] == 255 and got[4, 4] == 0 and got.sum() == 255
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))  # opaque: its grey levels
    assert arr(binary_mask(opaque)).min() == 255


@pytest.mark.parametrize("blur", [1, 4, 7.5])
def test_mask_blur_is_opencvs_gaussian_across_then_down(blur: float) -> None:
    cv2 = pytest.importorskip("cv2")
    mask = Image.new("L", (50, 40), 0)
    mask.paste(255, (12, 10, 30, 26))
    size = 2 * int(2.5 * blur + 0.5) + 1
    # in floating point (OpenCV blurs 8-bit pictures in fixed point, a level or two apart),
    # rounded to 8 bits after each pass as an 8-bit blur is
    across = np.rint(cv2.GaussianBlur(np.asarray(mask, np.float32), (size, 1), blur))
    expected = np.rint(cv2.GaussianBlur(across, (1, size), blur))
    difference = np.abs(arr(blur_mask(mask, blur)) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01
    cv2_8bit = cv2.GaussianBlur(cv2.GaussianBlur(np.asarray(mask), (size, 1), blur), (1, size), blur)
    assert np.abs(arr(blur_mask(mask, blur)) - cv2_8bit.astype(int)).max() <= 2


def test_crop_region_is_the_masks_box_plus_padding_within_the_picture() -> None:
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (10, 20, 30, 50))  # box x 10..29, y 20..49
    assert crop_region(mask, 0) == (10, 20, 30, 50)
    assert crop_region(mask, 15) == (0, 5, 45, 65)
    assert crop_region(Image.new("L", (8, 8), 0), 4) is None


def test_expand_region_grows_to_the_requested_aspect_within_the_picture() -> None:
    # 20 wide, 30 tall into 1:1: 10 more columns, 5 each side
    assert expand_region((10, 20, 30, 50), 64, 64, 100, 80) == (5, 20, 35, 50)
    # at the left edge: pushed right
    assert expand_region((0, 20, 20, 50), 64, 64, 100, 80) == (0, 20, 30, 50)
    # 40 wide, 10 tall into 2:1: 10 more rows
    assert expand_region((10, 20, 50, 30), 128, 64, 100, 80) == (10, 15, 50, 35)


def test_fill_keeps_unmasked_pixels_and_paints_the_hole_from_its_surroundings() -> None:
    picture = Image.new("RGB", (64, 64), (200, 20, 20))
    picture.paste((20, 20, 200), (32, 0, 64, 64))  # left red, right blue
    hole = Image.new("L", (64, 64), 0)
    hole.paste(255, (4, 24, 20, 40))  # inside the red half
    picture.paste((0, 255, 0), (4, 24, 20, 40))  # green where the hole is: must go
    out = arr(fill(picture, hole))
    kept = np.asarray(hole) == 0
    assert np.array_equal(out[kept], arr(picture)[kept])
    painted = out[24:40, 4:20]
    assert painted[..., 1].max() < 60  # no green left
    assert painted[..., 0].mean() > painted[..., 2].mean() + 50  # mostly the red around it


def test_inpainting_keeps_every_pixel_outside_the_blurred_mask_exactly() -> None:
    picture = noise(64, 64, seed=1)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    source = prepare_source(picture, 64, 64, mask=mask, mask_blur=4, fill_mode=1)
    generated = noise(64, 64, seed=2)
    out = arr(finish(generated, source))
    reach = 2 * int(2.5 * 4 + 0.5) // 2  # the blur kernel's radius: 10
    outside = np.ones((64, 64), bool)
    outside[24 - reach:40 + reach, 24 - reach:40 + reach] = False
    assert np.array_equal(out[outside], arr(picture)[outside])
    # well inside, the doubled blurred mask is opaque: the generated pixels as they are
    assert np.array_equal(out[30:34, 30:34], arr(generated)[30:34, 30:34])


def test_only_masked_generates_the_box_and_pastes_it_back_at_the_pictures_size() -> None:
    picture = noise(160, 120, seed=3)
    mask = Image.new("L", (160, 120), 0)
    mask.paste(255, (100, 40, 120, 60))
    source = prepare_source(picture, 64, 64, mask=mask, mask_blur=0, fill_mode=1, full_res=True, padding=8)
    # the box: 20x20 plus 8 each side = 36x36 at (92, 32), already square
    assert source.paste == (92, 32, 36, 36)
    assert source.image.size == (64, 64)
    expected_crop = picture.crop((92, 32, 128, 68)).resize((64, 64), Image.LANCZOS)
    assert np.array_equal(arr(source.image), arr(expected_crop))
    out = finish(noise(64, 64, seed=4), source)
    assert out.size == (160, 120)
    outside = np.ones((120, 160), bool)
    outside[40:60, 100:120] = False  # no blur: only the mask itself changes
    assert np.array_equal(arr(out)[outside], arr(picture)[outside])


def test_an_empty_mask_with_only_masked_falls_back_to_the_whole_picture() -> None:
    picture = noise(64, 64)
    source = prepare_source(picture, 64, 64, mask=Image.new("L", (64, 64), 0), full_res=True, fill_mode=1)
    assert source.paste is None
    assert np.array_equal(arr(finish(noise(64, 64, 5), source)), arr(picture))


def test_latent_upscale_mode_keeps_the_pictures_own_size_in_multiples_of_8() -> None:
    source = prepare_source(noise(100, 70), 64, 64, resize_mode=3)
    assert source.latent_resize and source.image.size == (96, 64)
