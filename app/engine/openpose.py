"""OpenPose body detection around `BodyPoseNet` (app.engine.annotator_nets): the maps, the
keypoints, the people, and the skeleton drawn as sd-webui-controlnet's `openpose` module
(v1.1.455, `annotator/openpose`: `Body.__call__`, `OpenposeDetector.detect_poses`,
`util.draw_bodypose`) does it, redone here from its description.

The picture arrives resized and edge-padded to multiples of 64 (app.engine.preprocessors
cuts the padding off the drawing afterwards); "height" and "width" below are the padded ones,
as the extension's are.

- Maps (`body_maps`): the picture in BGR, scaled by 184 / height (the extension's one scale,
  0.5 of a 368 box; sizes truncated; area averaging when shrinking, Lanczos-4 when enlarging),
  padded right and down to multiples of 8 with the value 128, as floats x / 256 - 0.5 into the
  net; each output channel enlarged 8 times (Lanczos-4), the padding cut off, and resized to
  the picture's size (area when smaller, Lanczos-4 when larger, by the sum of the sides).
- Peaks (`find_peaks`): each of the 18 heatmaps smoothed by a Gaussian of sigma 3 (SciPy's
  gaussian_filter, mirrored borders); a peak is a pixel not below its four neighbours (zero
  outside the map) and above 0.1; in row-major order, numbered across all parts in turn,
  scored by the unsmoothed heatmap.
- Limbs (`connect_limbs`): for each of the 19 limbs, every pair of peaks of its two parts is
  scored by the limb's PAF sampled at 10 evenly spaced points between them (rounded half to
  even) projected on the unit vector between them: the mean plus min(0.5 * height / length
  - 1, 0); a pair counts when more than 8 of the 10 projections are above 0.05 and that score
  is positive. Pairs are taken best first, each peak at most once, up to the smaller count.
- People (`assemble`): the limbs in order grow people: a limb whose start or end is already
  someone's joins that person (two people that share neither part merge); one that is no
  one's starts a person (for the first 17 limbs only). A person's score sums their peaks'
  scores and their limbs'; people with fewer than 4 parts or a mean score under 0.4 are
  dropped. (Where a limb touches three people the extension fails; here the first two count.)
- Drawing (`draw_bodies`): on black at the picture's size, per person the first 17 limbs as
  filled ellipses (`cv2.ellipse2Poly` about the midpoint, half-axes half the length and 4,
  the angle in whole degrees, 1-degree steps) in the limb's colour times 0.6, then each
  keypoint as a filled circle of radius 4 in its colour; coordinates go through the
  extension's normalisation (x / width, then times width) and are truncated. Colours are RGB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

BOX, SCALE, STRIDE, PAD_VALUE = 368, 0.5, 8, 128
PEAK_THRESHOLD, PAF_THRESHOLD, PAF_SAMPLES = 0.1, 0.05, 10
STICK_WIDTH, POINT_RADIUS = 4, 4
PARTS = 18

# the limbs as pairs of keypoints (0-based: nose, neck, right shoulder, elbow, wrist, left
# shoulder, elbow, wrist, right hip, knee, ankle, left hip, knee, ankle, right eye, left eye,
# right ear, left ear), and the two PAF channels (x, y) of each
LIMBS: list[tuple[int, int]] = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
                                (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
                                (2, 16), (5, 17)]
LIMB_PAFS: list[tuple[int, int]] = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1),
                                    (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (28, 29), (30, 31), (34, 35),
                                    (32, 33), (36, 37), (18, 19), (26, 27)]
DRAWN_LIMBS = 17  # the last two (shoulder to ear) are found but not drawn
STARTS_PEOPLE = 17  # limbs after these never start a person
COLOURS: list[tuple[int, int, int]] = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]

Peak = tuple[int, int, float, int]  # x, y, score, number
Keypoints = list[tuple[float, float] | None]  # per part: (x / width, y / height), or None


def _resize(x: np.ndarray, size: tuple[int, int], enlarging: bool) -> np.ndarray:
    """Channel by channel (as the extension resizes maps of many channels) to size (w, h)."""
    interpolation = cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA
    if x.ndim == 2 or x.shape[2] in (1, 3):
        return cv2.resize(x, size, interpolation=interpolation)
    return np.stack([cv2.resize(np.ascontiguousarray(x[:, :, c]), size, interpolation=interpolation)
                     for c in range(x.shape[2])], axis=2)


def _scaled(x: np.ndarray, k: float) -> np.ndarray:
    height, width = x.shape[:2]
    return _resize(x, (int(width * k), int(height * k)), enlarging=k >= 1)


def _to_size(x: np.ndarray, height: int, width: int) -> np.ndarray:
    enlarging = (height + width) / (x.shape[0] + x.shape[1]) >= 1
    return _resize(x, (width, height), enlarging=enlarging)


def body_maps(net: nn.Module, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(heatmaps HxWx19, PAFs HxWx38) in float64 at the picture's size; None where the
    scaled picture has no pixel left (an extremely tall one)."""
    height, width = bgr.shape[:2]
    k = SCALE * BOX / height
    if int(height * k) < 1 or int(width * k) < 1:
        return None
    small = _scaled(bgr, k)
    h, w = small.shape[:2]
    padded = np.full((h + (-h) % STRIDE, w + (-w) % STRIDE, 3), PAD_VALUE, np.uint8)
    padded[:h, :w] = small
    x = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None].contiguous()
    with torch.inference_mode():
        pafs, heatmaps = net(x)
    out = []
    for maps in (heatmaps, pafs):
        full = _scaled(maps[0].permute(1, 2, 0).numpy(), STRIDE)[:h, :w]
        out.append(_to_size(full, height, width).astype(np.float64))
    return out[0], out[1]


def find_peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[list[Peak]]:
    """Per part, its peaks (x, y, score, number), numbered across the parts in order."""
    peaks: list[list[Peak]] = []
    number = 0
    for part in range(PARTS):
        raw = heatmaps[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        padded = np.pad(smooth, 1, mode="constant", constant_values=0)
        centre = padded[1:-1, 1:-1]
        is_peak = ((centre >= padded[:-2, 1:-1]) & (centre >= padded[2:, 1:-1])
                   & (centre >= padded[1:-1, :-2]) & (centre >= padded[1:-1, 2:]) & (centre > threshold))
        ys, xs = np.nonzero(is_peak)
        found = []
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            found.append((x, y, float(raw[y, x]), number))
            number += 1
        peaks.append(found)
    return peaks


def limb_score(a: Peak, b: Peak, paf_x: np.ndarray, paf_y: np.ndarray, height: int) -> float | None:
    """The score of a limb from peak a to peak b, None when the fields do not support it."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = max(0.001, math.sqrt(dx * dx + dy * dy))
    xs = np.rint(np.linspace(a[0], b[0], num=PAF_SAMPLES)).astype(int)
    ys = np.rint(np.linspace(a[1], b[1], num=PAF_SAMPLES)).astype(int)
    along = paf_x[ys, xs] * (dx / length) + paf_y[ys, xs] * (dy / length)
    # summed in order, as the extension's sum() does (NumPy's pairwise sum may differ in the last bit)
    score = sum(along.tolist()) / len(along) + min(0.5 * height / length - 1, 0)
    if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * len(along) and score > 0:
        return score
    return None


def connect_limbs(peaks: list[list[Peak]], pafs: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb, its connections as rows (number of a, number of b, score, index of a among its
    part's peaks, index of b); None where one of its parts has no peak."""
    limbs: list[np.ndarray | None] = []
    for (part_a, part_b), (cx, cy) in zip(LIMBS, LIMB_PAFS, strict=True):
        cands_a, cands_b = peaks[part_a], peaks[part_b]
        if not cands_a or not cands_b:
            limbs.append(None)
            continue
        pairs = []
        for i, a in enumerate(cands_a):
            for j, b in enumerate(cands_b):
                score = limb_score(a, b, pafs[:, :, cx], pafs[:, :, cy], height)
                if score is not None:
                    pairs.append((i, j, score))
        pairs.sort(key=lambda pair: pair[2], reverse=True)  # stable: ties keep their order
        rows: list[list[float]] = []
        used_a: set[int] = set()
        used_b: set[int] = set()
        for i, j, score in pairs:
            if i in used_a or j in used_b:
                continue
            rows.append([cands_a[i][3], cands_b[j][3], score, i, j])
            used_a.add(i)
            used_b.add(j)
            if len(rows) >= min(len(cands_a), len(cands_b)):
                break
        limbs.append(np.array(rows, dtype=np.float64).reshape(-1, 5))
    return limbs


def assemble(peaks: list[list[Peak]], limbs: list[np.ndarray | None]) -> list[Keypoints]:
    """The people the limbs make, as keypoints in pixels (x, y) or None per part."""
    scores = {p[3]: p[2] for part in peaks for p in part}
    where = {p[3]: (p[0], p[1]) for part in peaks for p in part}
    # a person: the number of each part's peak (-1: none), then their score and part count
    people: list[np.ndarray] = []
    for k, rows in enumerate(limbs):
        if rows is None:
            continue
        part_a, part_b = LIMBS[k]
        for a, b, score, _, _ in rows:
            hits = [n for n, person in enumerate(people) if person[part_a] == a or person[part_b] == b][:2]
            if len(hits) == 1:
                person = people[hits[0]]
                if person[part_b] != b:
                    person[part_b] = b
                    person[-1] += 1
                    person[-2] += scores[int(b)] + score
            elif len(hits) == 2:
                first, second = people[hits[0]], people[hits[1]]
                if not np.any((first[:-2] >= 0) & (second[:-2] >= 0)):  # disjoint: one person
                    first[:-2] += second[:-2] + 1
                    first[-2:] += second[-2:]
                    first[-2] += score
                    del people[hits[1]]
                else:
                    first[part_b] = b
                    first[-1] += 1
                    first[-2] += scores[int(b)] + score
            elif k < STARTS_PEOPLE:
                person = np.full(PARTS + 2, -1.0)
                person[part_a], person[part_b] = a, b
                person[-1] = 2
                person[-2] = scores[int(a)] + scores[int(b)] + score
                people.append(person)
    kept = [p for p in people if not (p[-1] < 4 or p[-2] / p[-1] < 0.4)]
    return [[where[int(n)] if n != -1 else None for n in p[:PARTS]] for p in kept]


def draw_bodies(bodies: Sequence[Keypoints], height: int, width: int) -> np.ndarray:
    """The skeletons (keypoints as fractions of the width and height) on black, RGB uint8."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for body in bodies:
        for (i, j), colour in zip(LIMBS[:DRAWN_LIMBS], COLOURS, strict=False):
            a, b = body[i], body[j]
            if a is None or b is None:
                continue
            xs = np.array([a[0], b[0]]) * float(width)
            ys = np.array([a[1], b[1]]) * float(height)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in colour])
        for point, colour in zip(body, COLOURS, strict=True):
            if point is not None:
                cv2.circle(canvas, (int(point[0] * width), int(point[1] * height)), POINT_RADIUS, colour,
                           thickness=-1)
    return canvas


def bodies_from_maps(heatmaps: np.ndarray, pafs: np.ndarray) -> list[Keypoints]:
    """The people of a picture's maps (at its size), keypoints as fractions of its width and
    height."""
    height, width = heatmaps.shape[:2]
    peaks = find_peaks(heatmaps)
    people = assemble(peaks, connect_limbs(peaks, pafs, height))
    return [[None if p is None else (p[0] / float(width), p[1] / float(height)) for p in person]
            for person in people]


def detect_bodies(net: nn.Module, rgb: np.ndarray) -> list[Keypoints]:
    """The people in an RGB picture, keypoints as fractions of its width and height."""
    maps = body_maps(net, np.ascontiguousarray(rgb[:, :, ::-1]))
    return [] if maps is None else bodies_from_maps(*maps)
