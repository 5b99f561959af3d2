"""ControlNet model files on disk: what `controlnet_dirs:` in models.yaml lists.

Torch-free and cheap, like app.upscaler_files: the registry runs it at start-up (and on every
reload) before anything is loaded, reading headers only. Served are

- diffusers folders (a `config.json` beside `diffusion_pytorch_model.safetensors`), named by
  the folder's name;
- single `.safetensors` files in diffusers' layout (`down_blocks.…`, `controlnet_cond_embedding.…`,
  as `diffusers_xl_canny_full.safetensors` ships), named by their file stem; their architecture
  is read from their layer shapes when loaded (app.engine.controlnet).

Files in the original (LDM, `control_model.…`) layout and pickles (`.pth`, `.pt`, `.ckpt`,
`.bin`) are skipped with a warning naming the file and why: converting them needs the stock
configs this server does not bundle for ControlNets (see the README).

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
_PICKLES = (".pth", ".pt", ".ckpt", ".bin")
# a diffusers-layout ControlNet has these; an LDM one names its tensors control_model.*
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"


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


def _spec(name: str, weights: Path, folder: Path | None) -> ControlNetSpec | None:
    try:
        header = read_header(weights, name=name)
    except LoraError as exc:
        logger.warning("ControlNet %r (%s) is not served: %s", name, weights,
                       exc.reason.replace("LoRA", "ControlNet"))
        return None
    if _DIFFUSERS_MARKER not in header.shapes:
        why = ("it is in the original (control_model.*) layout; convert it to diffusers' layout"
               if any(k.startswith("control_model.") for k in header.keys)
               else "it holds no ControlNet (no controlnet_cond_embedding layers)")
        logger.warning("ControlNet %r (%s) is not served: %s", name, weights, why)
        return None
    return ControlNetSpec(name=name, weights=weights.resolve(),
                          folder=None if folder is None else folder.resolve(),
                          shapes=dict(header.shapes))


def discover_controlnets(dirs: Iterable[Path | str]) -> dict[str, ControlNetSpec]:
    """Every ControlNet directly in `dirs` (folders and single files), by name, in folder order;
    the second of one name is skipped with a warning."""
    found: dict[str, ControlNetSpec] = {}
    for folder in dirs:
        for path in sorted(Path(folder).iterdir()):
            if path.is_dir():
                if not (path / "config.json").is_file() or not (path / WEIGHTS_NAME).is_file():
                    continue
                spec = _spec(path.name, path / WEIGHTS_NAME, path)
            elif path.suffix.lower() in _PICKLES:
                logger.warning("ControlNet %r (%s) is not read: only .safetensors files are (a %s "
                               "file is a pickle that may run code)", path.stem, path, path.suffix)
                continue
            elif path.suffix.lower() == ".safetensors":
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
