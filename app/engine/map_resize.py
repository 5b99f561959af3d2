"""Resizing a ControlNet detected map to another size the way sd-webui-controlnet's
`high_quality_resize` does, so that a map keeps what it means: edges stay one pixel thin and
black or white, label maps keep their exact labels.

The rules (the extension's scripts/controlnet.py and scripts/lvminthin.py, redone from their
description), applied only when the size changes:

- the map's distinct colours are counted. A 2-colour map whose darkest channel value is under
  16 and brightest over 240 is *binary*; a binary map is made of *one-pixel edges* when an
  opening (a 3x3 erosion, then a 3x3 dilation) lowers more than half as many channel values as
  it has channel values above 127;
- a map of 3 to 199 colours (a segmentation or label map) resizes with nearest neighbour; any
  other with area averaging when the new size has fewer pixels, else bicubic;
- a binary map is then averaged over its channels and thresholded with Otsu's method; a
  one-pixel-edge map first keeps only the pixels that are a maximum along one of the four
  directions (horizontal, vertical, both diagonals), and after the threshold is thinned
  (`thin`), with the pruning of spurs only when it was enlarged.
"""

from __future__ import annotations

import cv2
import numpy as np

# The extension's bounds on the colour count for a map of labels (exclusive), and on a binary map's
# two levels.
LABELS_ABOVE, LABELS_BELOW = 2, 200
BINARY_DARK_BELOW, BINARY_BRIGHT_ABOVE = 16, 240

_SQUARE = np.ones((3, 3), np.uint8)

# Lines through the centre along which a pixel must be a maximum to survive the suppression.
_DIRECTIONS = (
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
    np.eye(3, dtype=np.uint8),
    np.fliplr(np.eye(3, dtype=np.uint8)).copy(),
)


def _rotations(*patterns: list[list[int]]) -> tuple[np.ndarray, ...]:
    """Each hit-or-miss pattern (1: set, -1: clear, 0: either) turned by 0, 90, 180 and 270
    degrees, in that order, every pattern at one angle before the next angle."""
    bases = [np.array(p, np.int32) for p in patterns]
    return tuple(np.ascontiguousarray(np.rot90(b, turn)) for turn in range(4) for b in bases)


# A pixel on the edge of a thick stroke (the stroke behind it, background in front of it), and
# one in its corner: the pixels thinning clears, one pass after another.
_THINNING = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]],
                       [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
# The end of a spur: a pixel whose only neighbours lie below it or beside-below.
_PRUNING = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]],
                      [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])
THINNING_PASSES = 32  # the extension's cap on thinning passes


def colour_count(array: np.ndarray) -> int:
    """The number of distinct RGB colours of an HxWx3 uint8 map."""
    flat = array.reshape(-1, 3).astype(np.uint32)
    return int(np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]).size)


def is_binary(array: np.ndarray, colours: int) -> bool:
    """A map of two colours, one near black and one near white (by channel value)."""
    return colours == 2 and int(array.min()) < BINARY_DARK_BELOW and int(array.max()) > BINARY_BRIGHT_ABOVE


def is_one_pixel_edges(array: np.ndarray) -> bool:
    """A binary map whose bright parts are mostly lines an opening removes."""
    opened = cv2.dilate(cv2.erode(array, _SQUARE), _SQUARE)
    removed = int(np.count_nonzero(opened < array))
    return removed * 2 > int(np.count_nonzero(array > 127))


def suppress_non_maxima(grey: np.ndarray) -> np.ndarray:
    """The pixels of a single-channel map that are the maximum of their 3-pixel line in at
    least one of four directions; the others 0."""
    out = np.zeros_like(grey)
    for line in _DIRECTIONS:
        np.putmask(out, cv2.dilate(grey, line) == grey, grey)
    return out


def _clear_matches(mask: np.ndarray, patterns: tuple[np.ndarray, ...]) -> bool:
    """Clear, pattern after pattern, the pixels of a 0/255 mask that match it; whether any did."""
    changed = False
    for pattern in patterns:
        hits = cv2.morphologyEx(mask, cv2.MORPH_HITMISS, pattern) > 127
        if hits.any():
            mask[hits] = 0
            changed = True
    return changed


def thin(mask: np.ndarray, prune: bool) -> np.ndarray:
    """A 0/255 single-channel mask thinned to lines one pixel wide (at most THINNING_PASSES
    passes, until one changes nothing), then with `prune`, spur ends cut once."""
    out = mask.copy()
    for _ in range(THINNING_PASSES):
        if not _clear_matches(out, _THINNING):
            break
    if prune:
        _clear_matches(out, _PRUNING)
    return out


def _otsu(grey: np.ndarray) -> np.ndarray:
    return cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def interpolation(array: np.ndarray, size: tuple[int, int], colours: int) -> int:
    """The OpenCV interpolation the map of `colours` colours resizes to `size` (w, h) with."""
    if LABELS_ABOVE < colours < LABELS_BELOW:
        return cv2.INTER_NEAREST
    if size[0] * size[1] < array.shape[0] * array.shape[1]:
        return cv2.INTER_AREA
    return cv2.INTER_CUBIC  # the suppression of non-maxima expects cubic's peaks


def resize_map(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An HxWx3 uint8 detected map resized to `size` (width, height) by the rules above."""
    height, width = array.shape[:2]
    if (width, height) == size:
        return array
    colours = colour_count(array)
    binary = is_binary(array, colours)
    edges = binary and is_one_pixel_edges(array)
    out = cv2.resize(array, size, interpolation=interpolation(array, size, colours))
    if not binary:
        return out
    grey = np.mean(out.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if edges:
        mask = thin(_otsu(suppress_non_maxima(grey)), prune=size[0] * size[1] > width * height)
    else:
        mask = _otsu(grey)
    return np.ascontiguousarray(np.stack([mask] * 3, axis=2))
