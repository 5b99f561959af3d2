"""ControlNet preprocessors (those that need no weights, and those whose weights sit in
models.yaml's `annotator_dir:`), and the unit image's resize modes.

What sd-webui-controlnet (v1.1.455, `annotator/` and `scripts/processor.py`) does with OpenCV
and NumPy on an RGB picture, redone here from its description:

- the picture is first resized so its short side is `processor_res` (cubic when enlarging,
  area when shrinking), except for `invert` and `tile_resample`, which take it as it is; the
  operators that look at neighbours as the extension runs them (canny, scribble_xdog,
  lineart_standard and the nets) see it edge-padded to a multiple of 64, cut off afterwards,
  so border pixels see what the extension's see; then
- `canny`: cv2.Canny on the RGB image itself (no grey conversion), thresholds a and b;
  `invert`: 255 - x; `blur_gaussian`: Gaussian blur of sigma a (unpadded, as the extension);
  `threshold`: 255 where every channel is above a, else 0; `scribble_xdog`: difference of
  Gaussians (0.5 and 5.0) over the channels, 255 where twice it exceeds a; `lineart_standard`:
  the darkness below a 6-pixel blur, normalised by its median; `tile_resample`: shrunk by the
  factor a (area; a factor under 1.1 keeps it); `shuffle`:
  the picture's content moved along a smooth random flow (seeded, so a request repeats);
  `t2ia_color_grid`: the 64-pixel colour grid; `recolor_luminance` / `recolor_intensity`
  (at the picture's size): L of Lab / V of HSV (the picture converted as the extension does,
  as if BGR) to the power a, as grey; `none`: as it is.

Preprocessors that need weights (app.engine.annotators runs their nets) are served only where
their file is in `annotator_dir:` (`served_preprocessors`, `check_preprocessor`):
`softedge_hed` / `softedge_hedsafe` / `scribble_hed` (aliases `hed`, `hed_safe`;
ControlNetHED.pth; scribble_hed thins and thickens HED's map as scribble_pidinet does),
`lineart_realistic` (alias `lineart`; sk_model.pth), `lineart_coarse` (sk_model2.pth), and
`softedge_pidinet` / `softedge_pidisafe` / `scribble_pidinet` / `t2ia_sketch_pidi` (aliases
`pidinet`, `pidinet_safe`, `pidinet_scribble`, `pidinet_sketch`; table5_pidinet.pth),
`lineart_anime` (netG.pth; the net stretches the padded picture to multiples of 256 and back
itself), `lineart_anime_denoise` (erika.pth) and `openpose` (body only, the extension's name
for it; body_pose_model.pth: the skeletons drawn on black, app.engine.openpose) and
`depth_midas` (alias `depth`; dpt_hybrid-midas-501f0c75.pt, MiDaS DPT-Hybrid). They take the
same resize and 64-padding as the built-in operators (scribble_pidinet thins the map once the
padding is cut off).

The detected map is then fitted to each pass's size by the unit's resize mode (`fit`), as the
extension's `detectmap_proc`: Just Resize stretches it; Crop and Resize scales it to cover the
target (sizes `int(np.round(side * k))`) and cuts the centre (offsets `excess // 2`); Resize and
Fill scales it to fit inside and fills the rest with the per-channel median of its four border
lines. Resizing keeps what the map means (app.engine.map_resize, the extension's
`high_quality_resize`): a map of 3 to 199 colours (labels, or a few grey levels) takes nearest
neighbour, any other area averaging to shrink and bicubic to enlarge; a black-and-white map
(2 colours, under 16 and over 240) is averaged to grey and thresholded by Otsu's method, and
one of one-pixel edges (an opening clears more than half of it) first keeps its maxima along
four directions and is thinned after (spurs pruned when enlarged). A map already at the size is
left as it is. These fitted maps are what the net sees and what A1111's answer shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from app.annotator_files import AnnotatorFiles
from app.engine import annotators
from app.engine.annotators import AnnotatorFileError
from app.engine.map_resize import resize_map
from app.errors import InvalidParameter, NotServed


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def detail(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max,
                "step": self.step}


@dataclass(frozen=True)
class Preprocessor:
    name: str
    # (HWC uint8 at res, a, b) -> map; with `weights`: (..., the weight file's path) -> map
    run: Callable[..., np.ndarray]
    resolution: Slider | None = Slider("Resolution", 512, 64, 2048, 8)
    a: Slider | None = None
    b: Slider | None = None
    aliases: tuple[str, ...] = field(default=())
    control_type: str = "All"
    weights: str | None = None  # the annotator_dir file it needs (app.annotator_files)

    def sliders(self) -> list[dict[str, Any]]:
        return [s.detail() for s in (self.resolution, self.a, self.b) if s is not None]


def _as_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    return np.ascontiguousarray(array.astype(np.uint8))


def short_side_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) of a picture of `size` once its short side is `resolution`."""
    width, height = size
    k = resolution / min(height, width)
    return int(np.round(width * k)), int(np.round(height * k))


def short_side_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """The picture with its short side `resolution` (cubic enlarging, area shrinking)."""
    height, width = image.shape[:2]
    size = short_side_size((width, height), resolution)
    if size == (width, height):
        return image
    k = resolution / min(height, width)
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)


def _padded(op: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Run `op` on the picture edge-padded to multiples of 64, then cut the padding off."""
    def run(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        ph, pw = (-height) % 64, (-width) % 64
        padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
        return op(padded)[:height, :width]
    return run


def _canny(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return _padded(lambda x: cv2.Canny(x, a, b))(image)


def _blur(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), a)  # (the extension cuts its padding off first)


def _threshold(image: np.ndarray, a: float, b: float) -> np.ndarray:
    out = np.zeros_like(image)
    out[np.min(image, axis=2) > a] = 255  # white where every channel is above a
    return out


def _xdog(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return _padded(lambda x: _xdog_map(x, a))(image)


def _xdog_map(image: np.ndarray, a: float) -> np.ndarray:
    x = image.astype(np.float32)
    g1, g2 = cv2.GaussianBlur(x, (0, 0), 0.5), cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(dog)
    out[2 * (255 - dog.astype(np.int32)) > a] = 255
    return out


def _lineart_standard(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return _padded(_lineart_standard_map)(image)


def _lineart_standard_map(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    bright = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(bright)) if bright.size else 16.0)
    return (intensity * 127).clip(0, 255).astype(np.uint8)


def _tile(image: np.ndarray, a: float, b: float) -> np.ndarray:
    height, width = image.shape[:2]
    if a < 1.1:  # the extension's rule: the picture as it is
        return image
    rate = a
    return cv2.resize(image, (max(1, int(width / rate)), max(1, int(height / rate))),
                      interpolation=cv2.INTER_AREA)


def _shuffle(image: np.ndarray, a: float, b: float) -> np.ndarray:
    height, width = image.shape[:2]
    rng = np.random.default_rng(0)

    def smooth() -> np.ndarray:
        noise = rng.uniform(0, 1, (max(1, height // 32), max(1, width // 32))).astype(np.float32)
        return cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)

    x = (smooth() * (width - 1)).clip(0, width - 1).astype(np.float32)
    y = (smooth() * (height - 1)).clip(0, height - 1).astype(np.float32)
    return cv2.remap(image, x, y, cv2.INTER_LINEAR)


def _color_grid(image: np.ndarray, a: float, b: float) -> np.ndarray:
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, width // 64), max(1, height // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def _hed(safe: bool) -> Callable[[np.ndarray, float, float, Path], np.ndarray]:
    return lambda image, a, b, path: _padded(lambda x: annotators.hed(x, path, safe=safe))(image)


def _scribble_hed(image: np.ndarray, a: float, b: float, path: Path) -> np.ndarray:
    return annotators.scribble(_padded(lambda x: annotators.hed(x, path))(image))


def _recolor(channel: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, float, float], np.ndarray]:
    """The extension's recolor modules: one channel of the picture in 0..1 to the power a
    (its gamma correction), as grey. (It converts the RGB picture as if it were BGR; so here.)"""
    def run(image: np.ndarray, a: float, b: float) -> np.ndarray:
        value = channel(image).astype(np.float32) / 255.0
        return (value ** a * 255.0).clip(0, 255).astype(np.uint8)
    return run


def _lineart(name: str) -> Callable[[np.ndarray, float, float, Path], np.ndarray]:
    return lambda image, a, b, path: _padded(lambda x: annotators.lineart(x, path, name))(image)


def _lineart_anime(image: np.ndarray, a: float, b: float, path: Path) -> np.ndarray:
    return _padded(lambda x: annotators.lineart_anime(x, path))(image)


def _lineart_anime_denoise(image: np.ndarray, a: float, b: float, path: Path) -> np.ndarray:
    return _padded(lambda x: annotators.manga_line(x, path))(image)


def _openpose(image: np.ndarray, a: float, b: float, path: Path) -> np.ndarray:
    return _padded(lambda x: annotators.openpose(x, path))(image)


def _depth(image: np.ndarray, a: float, b: float, path: Path) -> np.ndarray:
    return _padded(lambda x: annotators.depth(x, path))(image)


def _pidinet(mode: str) -> Callable[[np.ndarray, float, float, Path], np.ndarray]:
    def run(image: np.ndarray, a: float, b: float, path: Path) -> np.ndarray:
        edge = _padded(lambda x: annotators.pidinet(x, path, "" if mode == "scribble" else mode))(image)
        return annotators.scribble(edge) if mode == "scribble" else edge
    return run


_PREPROCESSORS = [
    Preprocessor("none", lambda x, a, b: x, resolution=None, control_type="All"),
    Preprocessor("canny", _canny, a=Slider("Canny Low Threshold", 100, 1, 255),
                 b=Slider("Canny High Threshold", 200, 1, 255), control_type="Canny"),
    Preprocessor("invert", lambda x, a, b: 255 - x, aliases=("invert (from white bg & black line)",),
                 resolution=None,
                 control_type="Lineart"),
    Preprocessor("blur_gaussian", _blur, a=Slider("Sigma", 9.0, 0.01, 64.0, 0.01), control_type="Tile/Blur"),
    Preprocessor("threshold", _threshold, a=Slider("Binarization Threshold", 127, 0, 255),
                 control_type="Scribble/Sketch"),
    Preprocessor("scribble_xdog", _xdog, a=Slider("XDoG Threshold", 32, 1, 64),
                 control_type="Scribble/Sketch"),
    Preprocessor("tile_resample", _tile, a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), resolution=None,
                 control_type="Tile/Blur"),
    Preprocessor("lineart_standard", _lineart_standard,
                 aliases=("lineart_standard (from white bg & black line)",), control_type="Lineart"),
    Preprocessor("shuffle", _shuffle, control_type="Shuffle"),
    Preprocessor("t2ia_color_grid", _color_grid, control_type="T2I-Adapter"),
    Preprocessor("recolor_luminance", _recolor(lambda x: cv2.cvtColor(x, cv2.COLOR_BGR2LAB)[:, :, 0]),
                 resolution=None, a=Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001), control_type="Recolor"),
    Preprocessor("recolor_intensity", _recolor(lambda x: cv2.cvtColor(x, cv2.COLOR_BGR2HSV)[:, :, 2]),
                 resolution=None, a=Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001), control_type="Recolor"),
    # the extension's names; the aliases are its internal keys
    Preprocessor("softedge_hed", _hed(False), aliases=("hed",), control_type="SoftEdge",
                 weights="ControlNetHED.pth"),
    Preprocessor("softedge_hedsafe", _hed(True), aliases=("hed_safe",), control_type="SoftEdge",
                 weights="ControlNetHED.pth"),
    Preprocessor("scribble_hed", _scribble_hed, control_type="Scribble/Sketch", weights="ControlNetHED.pth"),
    Preprocessor("lineart_realistic", _lineart("sk_model.pth"), aliases=("lineart",),
                 control_type="Lineart", weights="sk_model.pth"),
    Preprocessor("lineart_coarse", _lineart("sk_model2.pth"), control_type="Lineart",
                 weights="sk_model2.pth"),
    Preprocessor("softedge_pidinet", _pidinet(""), aliases=("pidinet",), control_type="SoftEdge",
                 weights="table5_pidinet.pth"),
    Preprocessor("softedge_pidisafe", _pidinet("safe"), aliases=("pidinet_safe",), control_type="SoftEdge",
                 weights="table5_pidinet.pth"),
    Preprocessor("scribble_pidinet", _pidinet("scribble"), aliases=("pidinet_scribble",),
                 control_type="Scribble/Sketch", weights="table5_pidinet.pth"),
    Preprocessor("t2ia_sketch_pidi", _pidinet("sketch"), aliases=("pidinet_sketch",),
                 control_type="T2I-Adapter", weights="table5_pidinet.pth"),
    # the anime line nets
    Preprocessor("lineart_anime", _lineart_anime, control_type="Lineart", weights="netG.pth"),
    Preprocessor("lineart_anime_denoise", _lineart_anime_denoise, control_type="Lineart",
                 weights="erika.pth"),
    # body only: openpose_hand / _face / _full need hand_pose_model.pth and facenet.pth
    Preprocessor("openpose", _openpose, control_type="OpenPose", weights="body_pose_model.pth"),
    Preprocessor("depth_midas", _depth, aliases=("depth",), control_type="Depth",
                 weights="dpt_hybrid-midas-501f0c75.pt"),
]
# every preprocessor known, served or not (those with `weights` need their file)
PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in _PREPROCESSORS}
_BY_ALIAS = {alias.lower(): p for p in _PREPROCESSORS for alias in (p.name, *p.aliases)}
# The extension's control types served here: name -> (its default module, the words a model's
# name is matched on, as its preprocessor_filters / preprocessor_filters_aliases say)
CONTROL_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "All": ("none", ()),
    "Canny": ("canny", ("canny",)),
    "SoftEdge": ("softedge_pidinet", ("softedge",)),
    "Lineart": ("lineart_standard", ("lineart",)),
    "Scribble/Sketch": ("scribble_pidinet", ("scribble", "sketch")),
    "Tile/Blur": ("tile_resample", ("tile", "blur")),
    "Shuffle": ("shuffle", ("shuffle",)),
    "Recolor": ("recolor_luminance", ("recolor",)),
    "T2I-Adapter": ("none", ("t2i_adapter", "t2iadapter", "t2ia")),
    "OpenPose": ("openpose", ("openpose", "densepose")),
    "Depth": ("depth_midas", ("depth",)),
}


def find_preprocessor(name: str) -> Preprocessor | None:
    """A module by its name or alias (case-insensitively), served or not; None when unknown."""
    return _BY_ALIAS.get(name.strip().lower())


def served_preprocessors(files: AnnotatorFiles | None) -> dict[str, Preprocessor]:
    """The preprocessors served with these annotator files: the built-in ones, and those that
    need weights whose file is there."""
    return {name: p for name, p in PREPROCESSORS.items()
            if p.weights is None or (files is not None and files.path(p.weights) is not None)}


def check_preprocessor(field: str, name: str, files: AnnotatorFiles | None) -> Preprocessor:
    """The module `name` asks for, if served: NotServed (listing the served ones) for a name
    unknown or of a module whose weights are not here, InvalidParameter naming the missing file
    and the folder for a module that needs weights."""
    module = find_preprocessor(name)
    if module is None:
        raise NotServed(field, name, served_preprocessors(files))
    if module.weights is not None:
        files = files or AnnotatorFiles()
        if files.path(module.weights) is None:
            raise InvalidParameter(field, name, files.missing(module.name, module.weights))
    return module


def slider_value(asked: float | None, slider: Slider | None) -> float:
    """The extension's rule: -1, missing or out of range means the default."""
    if slider is None:
        return 0.0
    if asked is None or asked == -1 or not slider.min <= asked <= slider.max:
        return float(slider.value)
    return float(asked)


def working_resolution(module: Preprocessor, resolution: float | None) -> int | None:
    """The short side `detect` scales a picture to for `module` asked at `resolution` (the
    extension's slider rule); None: the module takes the picture as it is."""
    if module.resolution is None:
        return None
    return int(slider_value(resolution, module.resolution))


def working_size(module: Preprocessor, size: tuple[int, int], resolution: float | None) -> tuple[int, int]:
    """(width, height) of the picture `detect` hands the module, from the picture's `size`
    alone: what a caller checks against its pixel limit before anything is allocated (the
    short side goes up to 2048, so an elongated picture's long side grows with it)."""
    working = working_resolution(module, resolution)
    return size if working is None else short_side_size(size, working)


def detect(module: Preprocessor, image: Image.Image, resolution: float | None = None,
           a: float | None = None, b: float | None = None, *, files: AnnotatorFiles | None = None,
           field: str = "module") -> Image.Image:
    """The detected map of an RGB picture (RGB, at the preprocessing resolution; its size is
    `working_size`). A module that needs weights takes them from `files` (checked first by
    `check_preprocessor`); a file that is gone or cannot be used is an InvalidParameter on
    `field`."""
    array = np.asarray(image.convert("RGB"))
    working = working_resolution(module, resolution)
    if working is not None:
        array = short_side_resize(array, working)
    args: tuple[Any, ...] = (np.ascontiguousarray(array), slider_value(a, module.a),
                             slider_value(b, module.b))
    if module.weights is not None:
        files = files or AnnotatorFiles()
        path = files.path(module.weights)
        if path is None:
            raise InvalidParameter(field, module.name, files.missing(module.name, module.weights))
        args += (path,)
    try:
        out = module.run(*args)
    except AnnotatorFileError as exc:
        raise InvalidParameter(field, module.name, f"{module.name} needs {module.weights} from "
                               f"annotator_dir, and that file cannot be used: {exc}") from None
    return Image.fromarray(_as_rgb(out))


JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = 0, 1, 2
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, mode: int) -> int:
    """The extension's pixel-perfect preprocessing resolution for a picture of `size` (w, h)
    and a target of width x height: the short side the picture has once fitted."""
    raw_w, raw_h = size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if mode == RESIZE_AND_FILL else max(k_h, k_w)
    return int(np.round(k * min(raw_w, raw_h)))


def _scaled(size: tuple[int, int], k: float) -> tuple[int, int]:
    """(w, h) scaled by k and rounded as the extension rounds (at least one pixel each)."""
    return max(1, int(np.round(size[0] * k))), max(1, int(np.round(size[1] * k)))


def border_colour(array: np.ndarray) -> np.ndarray:
    """The median, per channel, of a map's four border lines (the corners counted twice, as
    the extension counts them), truncated to uint8: Resize and Fill's background."""
    lines = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]], axis=0)
    return np.median(lines, axis=0).astype(np.uint8)


def fit(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A detected map fitted to width x height as the extension's detectmap_proc: Just Resize
    stretches; Crop and Resize scales it to cover the target keeping the aspect and cuts the
    centre; Resize and Fill scales it to fit inside and fills the rest with the median colour
    of its border lines. Scaled sizes are rounded to the nearest pixel, offsets are (excess) // 2,
    and the resizing keeps edge and label maps as they are (app.engine.map_resize)."""
    array = np.asarray(image.convert("RGB"))
    raw_h, raw_w = array.shape[:2]
    if (raw_w, raw_h) == (width, height):
        return Image.fromarray(array)
    if mode == JUST_RESIZE:
        return Image.fromarray(resize_map(array, (width, height)))
    k = (min if mode == RESIZE_AND_FILL else max)(height / raw_h, width / raw_w)
    resized = resize_map(array, _scaled((raw_w, raw_h), k))
    new_h, new_w = resized.shape[:2]
    if mode == RESIZE_AND_FILL:
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = border_colour(array)
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        canvas[top:top + new_h, left:left + new_w] = resized[:height, :width]
        return Image.fromarray(canvas)
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return Image.fromarray(np.ascontiguousarray(resized[top:top + height, left:left + width]))
