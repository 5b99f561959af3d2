"""SHA-256 of weight files, computed once per file and remembered across restarts.

`HashCache` hashes a file and keeps the result in memory and in a small JSON file
(`<cache dir>/hashes.json`, CRAFTSERVE_CACHE_DIR), keyed by the file's resolved path, size and
modification time (ns): a 7 GB checkpoint is read once, not at every start, and read again
only when its size or time changes (as A1111's `cache.json` does). Two threads asking for
the same file wait for one reading. Writing merges what another process wrote meanwhile
(servers may share the folder). A cache file that cannot be read or written only costs
hashing again: it is logged, never an error.

Which file stands for a model (`weights_file`), so that its hash means its weights:
- a single-file checkpoint: the file itself (A1111 hashes the same file, so the hashes match);
- a diffusers folder, local or in the Hugging Face cache: its UNet's weights (a `vae:` the same
  way: its own weights),
  `unet/diffusion_pytorch_model.safetensors`, else the first of `unet/diffusion_pytorch_model*`
  `.safetensors` (a variant or the first shard) in name order, else the same names in `.bin`;
- builtin models (built in code from a fixed seed) have no file: `builtin_sha256` hashes the
  builtin's name and the source of the code that builds it (its configs and seed), so the
  hash changes when, and only when, that code does.
A Hub model whose weights are not in the cache yet has no file either: `identity_sha256`
hashes its source, and the weights' hash replaces it once they are there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["HashCache", "builtin_sha256", "identity_sha256", "vae_file", "weights_file"]

CACHE_FILE = "hashes.json"
_CHUNK = 1 << 20
_APP = Path(__file__).resolve().parent
# The code (and configs) each builtin model is built from, relative to the package.
_BUILTIN_SOURCES = {
    "builtin:tiny-sdxl": ("engine/tiny.py",),
    "builtin:tiny-sd15": ("engine/tiny.py",),
    "builtin:sleep-sdxl": ("engine/tiny.py",),
    "builtin:random-sdxl": ("engine/random_sdxl.py", "configs/sdxl/unet/config.json",
                            "configs/sdxl/vae/config.json", "configs/sdxl/text_encoder/config.json",
                            "configs/sdxl/text_encoder_2/config.json"),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def identity_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def builtin_sha256(source: str) -> str:
    """A builtin model's hash: its name and the bytes of the code that builds it."""
    digest = hashlib.sha256(f"craftserve {source}\n".encode())
    for relative in _BUILTIN_SOURCES.get(source, ()):
        digest.update((_APP / relative).read_bytes())
    return digest.hexdigest()


def _hub_snapshot(repo: str, marker: str) -> Path | None:
    """The folder of the repo's snapshot in the Hugging Face cache that holds `marker`."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, marker)
    except Exception:  # noqa: BLE001 - a broken cache only means "not here"
        return None
    return Path(found).parent if isinstance(found, str) else None


def _weights_in(folder: Path) -> Path | None:
    """A diffusers component folder's weights: the unsharded file, else the first of its
    variants or shards by name; safetensors before .bin."""
    for suffix in (".safetensors", ".bin"):
        exact = folder / f"diffusion_pytorch_model{suffix}"
        if exact.is_file():
            return exact
        found = sorted(p for p in folder.glob(f"diffusion_pytorch_model*{suffix}") if p.is_file())
        if found:
            return found[0]
    return None


def weights_file(source: str, kind: str) -> Path | None:
    """The file whose hash is a model's (see the module docstring); None when there is none."""
    if kind == "single_file":
        return Path(source)
    if kind == "local":
        return _weights_in(Path(source) / "unet")
    if kind == "hub":
        snapshot = _hub_snapshot(source, "model_index.json")
        return _weights_in(snapshot / "unet") if snapshot is not None else None
    return None


def vae_file(vae: str) -> Path | None:
    """The file whose hash is a models.yaml `vae:`'s: a single file itself; a diffusers VAE
    folder's (local, or a Hub repo's snapshot in the cache) weights, chosen as for a UNet."""
    path = Path(vae).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _weights_in(path)
    snapshot = _hub_snapshot(vae, "config.json")
    return _weights_in(snapshot) if snapshot is not None else None


class HashCache:
    """sha256 of files, cached by (resolved path, size, mtime_ns) in memory and in
    `folder/hashes.json` (no file when `folder` is None). Thread-safe."""

    def __init__(self, folder: Path | None) -> None:
        self.file = None if folder is None else Path(folder).expanduser() / CACHE_FILE
        self.reads = 0  # files hashed (read whole) by this instance
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, dict] = self._load()
        self._warned = False

    def _load(self) -> dict[str, dict]:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
            entries = data["files"]
            if not isinstance(entries, dict):
                raise ValueError("files is not an object")
            return {path: entry for path, entry in entries.items()
                    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("hash cache %s is unreadable (%s): files are hashed again", self.file, exc)
            return {}

    def _save(self) -> None:
        if self.file is None:
            return
        on_disk = self._load() if self.file.is_file() else {}  # another process's entries stay
        with self._lock:
            merged = {**on_disk, **self._entries}
            text = json.dumps({"version": 1, "files": merged}, indent=1, sort_keys=True)
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.file.with_name(f".{CACHE_FILE}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, self.file)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("hash cache %s cannot be written (%s): hashes are kept in memory "
                               "only, and large files are hashed again at the next start "
                               "(setting CRAFTSERVE_CACHE_DIR)", self.file, exc)

    def cached(self, path: Path) -> str | None:
        """The file's hash if it is known for its current size and time (no reading)."""
        resolved = str(Path(path).resolve())
        stat = os.stat(resolved)
        with self._lock:
            entry = self._entries.get(resolved)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        return None

    def sha256(self, path: Path) -> str:
        """The file's sha256 (hex); reads the file only when its size or time changed since it
        was last hashed. Blocking: call it off the event loop. OSError when unreadable."""
        resolved = str(Path(path).resolve())
        with self._lock:
            file_lock = self._file_locks.setdefault(resolved, threading.Lock())
        with file_lock:  # a second caller waits for the first reading
            known = self.cached(Path(resolved))
            if known is not None:
                return known
            before = os.stat(resolved)
            digest = sha256_of(Path(resolved))
            self.reads += 1
            after = os.stat(resolved)
            if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
                with self._lock:
                    self._entries[resolved] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns,
                                               "sha256": digest}
                self._save()
            return digest
