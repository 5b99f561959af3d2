"""ControlNet model files on disk: what `controlnet_dirs:` in models.yaml lists.

Torch-free and cheap, like app.upscaler_files: the registry runs it at start-up (and on every
reload) before anything is loaded, reading headers only. Served are

- diffusers folders (a `config.json` beside `diffusion_pytorch_model.safetensors`), named by
  the folder's name;
- single `.safetensors` files in diffusers' layout (`down_blocks.…`, `controlnet_cond_embedding.…`,
  as `diffusers_xl_canny_full.safetensors` ships), named by their file stem;
- single files in the original (LDM) layout lllyasviel's ControlNet 1.0/1.1 files have
  (`input_blocks.…`, `zero_convs.…`, `input_hint_block.…`, `middle_block_out.…`, optionally under
  `control_model.`; the tensors of a whole 1.0 checkpoint beside them are ignored), as
  `.safetensors` or as `.pth` / `.pt` / `.ckpt` pickles read only by torch's weights-only
  unpickler (memory-mapped, so listing one reads its shapes, not its data); a pickle that
  unpickler refuses is skipped with a warning naming why.

Either single-file layout's architecture is read from the file's layer shapes and the served
model's UNet config when loaded (app.engine.controlnet); no ControlNet config is needed.

A1111's listing names a model `"<stem> [<hash>]"` with the old model hash: the first 8 hex of
sha256 over 64 KiB read at offset 1 MiB of the weights file (`old_hash`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import LoraError
from app.lora_files import read_header

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PICKLES = (".pth", ".pt", ".ckpt")
# a diffusers-layout ControlNet has the first; an original (LDM) one the second, maybe under
# LDM_PREFIX (lllyasviel's files: the ControlNet inside a whole checkpoint's tensors)
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_LDM_MARKER = "input_hint_block.0.weight"
LDM_PREFIX = "control_model."
DIFFUSERS, LDM = "diffusers", "ldm"


@dataclass
class ControlNetSpec:
    """A ControlNet: its name, its weights file, the folder with its config.json (None: a single
    file, its config read from its layer shapes), and its layers' shapes (from the header).
    `fits`: model name → None (it fits that model) or why not, filled by
    app.engine.controlnet_fit against each model's UNet."""

    name: str
    weights: Path
    folder: Path | None
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False, default_factory=dict)
    fits: dict[str, str | None] = field(default_factory=dict)
    layout: str = DIFFUSERS  # or LDM: `shapes` are then named without `prefix`
    prefix: str = ""

    @property
    def hash(self) -> str:
        return old_hash(self.weights)

    @property
    def title(self) -> str:
        """As the extension lists it: "<name> [<old hash>]"."""
        return f"{self.name} [{self.hash}]"


_HASHES: dict[tuple[str, int, float], str] = {}


def old_hash(path: Path) -> str:
    """A1111's old model hash: sha256 of 64 KiB read at offset 1 MiB, first 8 hex digits."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _HASHES:
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            _HASHES[key] = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    return _HASHES[key]


def pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes of a `.pth`-style pickle, through torch's weights-only unpickler
    (memory-mapped: the data is not read). Raises ValueError saying why it is refused."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise ValueError("it is a legacy (non-zip) torch pickle; save it again with torch.save or "
                         "as .safetensors")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"torch's weights-only unpickler refuses it ({first[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("it holds no state dict")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and hasattr(v, "shape")}


def _layout(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str, dict[str, tuple[int, ...]]]:
    """(layout, prefix, shapes named without the prefix) of a file's tensors; ValueError when
    they hold no ControlNet."""
    if _DIFFUSERS_MARKER in shapes:
        return DIFFUSERS, "", dict(shapes)
    prefix = LDM_PREFIX if LDM_PREFIX + _LDM_MARKER in shapes else ""
    if prefix + _LDM_MARKER in shapes:
        return LDM, prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    raise ValueError("it holds no ControlNet (no controlnet_cond_embedding or input_hint_block layers)")


def _spec(name: str, weights: Path, folder: Path | None) -> ControlNetSpec | None:
    try:
        if weights.suffix.lower() in _PICKLES:
            shapes = pickle_shapes(weights)
        else:
            shapes = dict(read_header(weights, name=name).shapes)
        layout, prefix, shapes = _layout(shapes)
    except LoraError as exc:
        logger.warning("ControlNet %r (%s) is not served: %s", name, weights,
                       exc.reason.replace("LoRA", "ControlNet"))
        return None
    except ValueError as exc:
        logger.warning("ControlNet %r (%s) is not served: %s", name, weights, exc)
        return None
    return ControlNetSpec(name=name, weights=weights.resolve(),
                          folder=None if folder is None else folder.resolve(),
                          shapes=shapes, layout=layout, prefix=prefix)


def discover_controlnets(dirs: Iterable[Path | str]) -> dict[str, ControlNetSpec]:
    """Every ControlNet directly in `dirs` (folders and single files), by name, in folder order;
    the second of one name is skipped with a warning."""
    found: dict[str, ControlNetSpec] = {}
    for folder in dirs:
        # a .safetensors file before a pickle of the same stem, so it wins
        for path in sorted(Path(folder).iterdir(),
                           key=lambda p: (p.stem, p.suffix.lower() != ".safetensors", p.name)):
            if path.is_dir():
                if not (path / "config.json").is_file() or not (path / WEIGHTS_NAME).is_file():
                    continue
                spec = _spec(path.name, path / WEIGHTS_NAME, path)
            elif path.suffix.lower() in (".safetensors", *_PICKLES):
                spec = _spec(path.stem, path, None)
            else:
                continue
            if spec is None:
                continue
            if spec.name in found:
                logger.warning("ControlNet %r (%s): %s came first; this one is ignored",
                               spec.name, path, found[spec.name].weights)
                continue
            found[spec.name] = spec
    return found


def find_controlnet(asked: str, served: Mapping[str, ControlNetSpec]) -> ControlNetSpec | None:
    """The served ControlNet a request names: its name, its title "<name> [<hash>]", or its
    name case-insensitively (clients send bare stems); None when none matches."""
    if asked in served:
        return served[asked]
    stem = asked.strip()
    if stem.endswith("]") and " [" in stem:
        stem = stem[:stem.rindex(" [")]
    for name, spec in served.items():
        if name.lower() == stem.lower():
            return spec
    return None
