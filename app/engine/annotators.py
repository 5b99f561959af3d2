"""The ControlNet preprocessors that need weights: their nets loaded from the files of
models.yaml's `annotator_dir:` (app.annotator_files) and run on the CPU.

What sd-webui-controlnet (v1.1.455, `annotator/hed`, `annotator/lineart`,
`annotator/lineart_anime`, `annotator/manga_line` and its legacy `processor.py`) does around
each net, redone here from its description (the picture arrives already resized to the
processing resolution and edge-padded to multiples of 64 by app.engine.preprocessors, which
cuts the padding off again):

- `hed(image, safe)`: the RGB picture as floats in 0..255 into `ControlNetHED`; each of its
  five side outputs resized to the picture's size (bilinear, OpenCV's INTER_LINEAR), their
  mean through a sigmoid (in float64); with `safe` (softedge_hedsafe) quantised to 0, 1/2
  and 1 (`safe_step`: floor(3x) / 2); times 255, clipped, truncated to uint8.
- `lineart(image, file)`: RGB in 0..1 into `LineartGenerator` (sk_model.pth realistic,
  sk_model2.pth coarse); the drawing times 255, clipped, truncated to uint8, then inverted
  (white lines on black, as ControlNet's lineart models take them).
- `lineart_anime(image)`: the RGB picture stretched (cubic) to the next multiples of 256, as
  x / 127.5 - 1 into `AnimeLineartUnet` (netG.pth); its drawing times 127.5 plus 127.5,
  stretched (cubic) back to the picture's size, clipped, truncated to uint8, inverted.
- `manga_line(image)` (lineart_anime_denoise): the picture's grey (OpenCV's RGB2GRAY, uint8)
  as floats in 0..255 into `MangaLineNet` (erika.pth); 255 minus its drawing, clipped,
  truncated to uint8, and not inverted again (the extension's "auto inversion" is this 255 -).
- `pidinet(image, mode)`: BGR in 0..1 into `PiDiNet` (table5_pidinet.pth); its fused map
  (the last), then for `safe` the safe step, for `sketch` 1 where above 0.5, else 0; times 255,
  clipped, truncated to uint8. `scribble` (the extension's scribble_pidinet, on the map cut
  to size) thins the map: a Gaussian blur of sigma 3, non-maximum suppression along the four
  directions (a pixel kept where one of the 1x3 lines through it has its maximum there),
  255 where above 127; then a blur of sigma 3 again, and 255 where above 4, else 0.
- `openpose(image)`: `BodyPoseNet` (body_pose_model.pth) on the picture in BGR at one scale,
  its keypoints, limbs and people found and the skeletons drawn on black at the picture's
  size, as the extension's `openpose` module (app.engine.openpose says how).
- `depth(image)` (depth_midas): MiDaS DPT-Hybrid (dpt_hybrid-midas-501f0c75.pt, run as
  transformers' DPT, app.engine.midas) on the RGB picture as x / 127.5 - 1 (no other
  normalisation); its depth in float32 minus its minimum, divided by the new maximum (a flat
  depth, maximum 0, answers black where the extension would divide by zero), times 255, clipped,
  truncated to uint8.

The MiDaS file is in the original net's names (`pretrained.model.*`, `scratch.*`);
app.engine.midas renames it onto transformers' DPT-Hybrid before the same strict check.

Weights are read with `torch.load(..., weights_only=True)` (a pickle that would build other
objects than tensors is refused, never run) and loaded strictly: a file whose tensors are not
exactly the net's is refused with an AnnotatorFileError naming the file and what is wrong.
Loaded nets are kept in a small LRU shared by the threads that prepare control images (a lock
guards it; a net in eval mode is only read while running, so threads may share one). A file
replaced on disk (other size or modification time) is loaded again.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from app.engine import openpose as pose
from app.engine.annotator_nets import (
    AnimeLineartUnet,
    BodyPoseNet,
    ControlNetHED,
    LineartGenerator,
    MangaLineNet,
    PiDiNet,
)
from app.engine.midas import DepthNet

log = logging.getLogger(__name__)

CACHE_CAPACITY = 3  # nets kept loaded (HED is 15M parameters, a lineart generator 4M, PiDiNet 0.7M,
#                     the anime U-Net 54M, the manga line net 43M, OpenPose's body net 52M,
#                     MiDaS DPT-Hybrid 123M)


class AnnotatorFileError(Exception):
    """An annotator weight file that cannot be used; the reason names the file, not its folder."""


# file name -> the net it holds
NETS: dict[str, Callable[[], nn.Module]] = {
    "ControlNetHED.pth": ControlNetHED,
    "sk_model.pth": LineartGenerator,
    "sk_model2.pth": LineartGenerator,
    "table5_pidinet.pth": PiDiNet,
    # the anime line nets
    "netG.pth": AnimeLineartUnet,
    "erika.pth": MangaLineNet,
    "body_pose_model.pth": BodyPoseNet,
    "dpt_hybrid-midas-501f0c75.pt": DepthNet,
}


def _refusal(exc: BaseException) -> str:
    """What a weights-only load objected to: the line of torch's message that names it (the
    rest is the same advice every time)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    told = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                            "Check the documentation"))]
    return (told or lines or [type(exc).__name__])[-1][:200]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (weights only; a `state_dict` wrapper and DataParallel's
    `module.` prefixes taken off)."""
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except OSError as exc:
        raise AnnotatorFileError(f"{path.name} cannot be read ({exc.strerror or 'I/O error'})") from None
    # torch.save writes a zip archive; files older than PyTorch 1.6 a pickle (protocol 2+)
    if not (start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"):
        raise AnnotatorFileError(f"{path.name} is not a PyTorch weights file (neither the zip archive "
                                 "torch.save writes nor a pickle)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AnnotatorFileError(f"{path.name} holds more than tensors, and a weights-only load refuses "
                                 f"it ({_refusal(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a broken file raises, it is the file's fault
        text = " ".join(str(exc).replace(str(path.parent), "<annotator_dir>").split())[:200]
        raise AnnotatorFileError(f"{path.name} cannot be read ({type(exc).__name__}: {text})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise AnnotatorFileError(f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def build_net(name: str, path: Path) -> nn.Module:
    """The net of weight file `name` (one of NETS) loaded strictly from `path`, float32, eval."""
    net = NETS[name]()
    state = read_state_dict(path)
    rename = getattr(net, "from_file_state", None)  # a file in another layout than the net's names
    if rename is not None:
        state = rename(state)
    expected = net.state_dict()
    # a batch norm's step counter: files saved by PyTorch before 0.4.1 lack it, and
    # load_state_dict fills it in; it is never used in eval mode
    counters = {k for k in expected if k.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - counters)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
        raise AnnotatorFileError(f"{path.name} is not the {type(net).__name__} net this file name "
                                 f"stands for: {', '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AnnotatorFileError(f"{path.name}: tensor {key} has shape {list(tensor.shape)}, the "
                                     f"{type(net).__name__} net's is {list(expected[key].shape)}")
        if not tensor.is_floating_point() and key not in counters:
            raise AnnotatorFileError(f"{path.name}: tensor {key} is {tensor.dtype}, not floating point")
    net.load_state_dict(state, strict=True)
    return net.float().eval().requires_grad_(False)


class NetCache:
    """At most `capacity` loaded nets, least recently used first out; thread-safe."""

    def __init__(self, capacity: int = CACHE_CAPACITY) -> None:
        self.capacity = capacity
        self._nets: OrderedDict[tuple[str, str, int, int], nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, path: Path) -> nn.Module:
        try:
            stat = path.stat()
        except OSError:
            raise AnnotatorFileError(f"{name} is no longer in annotator_dir (reload to update the "
                                     "listing)") from None
        key = (name, str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:  # loads are rare: one at a time keeps a net from loading twice
            net = self._nets.get(key)
            if net is None:
                log.info("loading annotator %s", path)
                net = build_net(name, path)
                for old in [k for k in self._nets if k[:2] == key[:2]]:
                    del self._nets[old]  # the same file before it changed
                self._nets[key] = net
                while len(self._nets) > self.capacity:
                    self._nets.popitem(last=False)
            self._nets.move_to_end(key)
            return net

    def loaded(self) -> list[str]:
        with self._lock:
            return [name for name, *_ in self._nets]

    def clear(self) -> None:
        with self._lock:
            self._nets.clear()


NETS_CACHE = NetCache()


def _tensor(image: np.ndarray, scale: float) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).float().mul(scale).permute(2, 0, 1)[None]


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """The extension's `safe_step`: x in 0..1 floored to multiples of 1/step (x*(step+1), truncated)."""
    return (x.astype(np.float32) * float(step + 1)).astype(np.int32).astype(np.float32) / float(step)


def hed(image: np.ndarray, path: Path, *, safe: bool = False) -> np.ndarray:
    """The soft edge map (HxW uint8) of an RGB picture whose sides are multiples of 16."""
    net = NETS_CACHE.get("ControlNetHED.pth", path)
    height, width = image.shape[:2]
    with torch.inference_mode():
        sides = net(_tensor(image, 1.0))
    maps = [cv2.resize(side[0, 0].numpy().astype(np.float32), (width, height),
                       interpolation=cv2.INTER_LINEAR) for side in sides]
    edge = 1.0 / (1.0 + np.exp(-np.mean(np.stack(maps, axis=2), axis=2).astype(np.float64)))
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def lineart(image: np.ndarray, path: Path, name: str) -> np.ndarray:
    """The line drawing (HxW uint8, white lines on black) of an RGB picture whose sides are
    multiples of 4, by the generator in weight file `name`."""
    net = NETS_CACHE.get(name, path)
    with torch.inference_mode():
        drawing = net(_tensor(image, 1.0 / 255.0))[0, 0].numpy()
    return 255 - (drawing * 255.0).clip(0, 255).astype(np.uint8)


def lineart_anime(image: np.ndarray, path: Path) -> np.ndarray:
    """The anime line drawing (HxW uint8, white lines on black) of an RGB picture, by the U-Net
    of netG.pth: the picture stretched (cubic) to the next multiples of 256, in -1..1; the
    drawing back in 0..255 stretched (cubic) to the picture's size, clipped, truncated, inverted."""
    net = NETS_CACHE.get("netG.pth", path)
    height, width = image.shape[:2]
    size = (256 * -(-width // 256), 256 * -(-height // 256))
    stretched = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    with torch.inference_mode():
        drawing = net(_tensor(stretched, 1.0).div(127.5).sub(1.0))[0, 0].numpy()
    drawing = cv2.resize(drawing * 127.5 + 127.5, (width, height), interpolation=cv2.INTER_CUBIC)
    return 255 - drawing.clip(0, 255).astype(np.uint8)


def manga_line(image: np.ndarray, path: Path) -> np.ndarray:
    """The manga line drawing (HxW uint8, white lines on black) of an RGB picture whose sides
    are multiples of 16, by the net of erika.pth: its grey (OpenCV's RGB2GRAY) in 0..255 in,
    255 minus the drawing out, clipped, truncated (the net answers paper as 255, so this is
    already white lines on black: no further inversion)."""
    net = NETS_CACHE.get("erika.pth", path)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    with torch.inference_mode():
        drawing = net(torch.from_numpy(np.ascontiguousarray(grey)).float()[None, None])[0, 0].numpy()
    return (255.0 - drawing).clip(0, 255).astype(np.uint8)


def pidinet(image: np.ndarray, path: Path, mode: str = "") -> np.ndarray:
    """PiDiNet's edge map (HxW uint8) of an RGB picture whose sides are multiples of 8;
    `mode` "safe" (the safe step) or "sketch" (0 or 255 at 0.5)."""
    net = NETS_CACHE.get("table5_pidinet.pth", path)
    with torch.inference_mode():
        edge = net(_tensor(image[:, :, ::-1], 1.0 / 255.0))[-1][0, 0].numpy()
    if mode == "sketch":
        edge = (edge > 0.5).astype(np.float32)
    elif mode == "safe":
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


# the 1x3 lines through a pixel: horizontal, vertical, both diagonals
_LINES = [np.array(line, np.uint8).reshape(3, 3) for line in (
    [0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0, 0, 1, 0],
    [1, 0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 1, 0, 1, 0, 0])]


def thin_lines(edge: np.ndarray, threshold: float = 127, sigma: float = 3.0) -> np.ndarray:
    """The extension's `nms`: the blurred map's ridges (a pixel that is the largest of one of
    its four 1x3 lines), 255 where above `threshold`, else 0."""
    blurred = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), sigma)
    kept = np.zeros_like(blurred)
    for line in _LINES:
        ridge = cv2.dilate(blurred, kernel=line) == blurred
        kept[ridge] = blurred[ridge]
    return np.where(kept > threshold, 255, 0).astype(np.uint8)


def scribble(edge: np.ndarray) -> np.ndarray:
    """A scribble of a soft edge map (HxW uint8): thinned lines, thickened again by a blur."""
    thick = cv2.GaussianBlur(thin_lines(edge), (0, 0), 3.0)
    return np.where(thick > 4, 255, 0).astype(np.uint8)


def openpose(image: np.ndarray, path: Path) -> np.ndarray:
    """The body skeletons (HxWx3 uint8 RGB, black elsewhere) found in an RGB picture."""
    net = NETS_CACHE.get("body_pose_model.pth", path)
    height, width = image.shape[:2]
    return pose.draw_bodies(pose.detect_bodies(net, image), height, width)


def depth(image: np.ndarray, path: Path) -> np.ndarray:
    """MiDaS's relative depth map (HxW uint8, near is bright) of an RGB picture whose sides are
    multiples of 32."""
    net = NETS_CACHE.get("dpt_hybrid-midas-501f0c75.pt", path)
    with torch.inference_mode():
        found = net.depth(_tensor(image, 1.0).div(127.5).sub(1.0))[0]
        found = found - found.min()
        top = found.max()
        if top > 0:
            found = found / top
    return (found.numpy() * 255.0).clip(0, 255).astype(np.uint8)
