"""A1111's model hashes: `sha256` of each served model's weights and its short hash (the first
10 hex digits, A1111's `hash`, `sd_model_hash`), never null.

Which file stands for a model, and what a model without one gets, is app.file_hashes'
choice (documented there). Hashes are computed once per file and cached across restarts
(`HashCache`, CRAFTSERVE_CACHE_DIR). At start-up (`warm`) a background thread hashes every
model, so the first start with a 7 GB checkpoint is not held up; a route that needs a hash
not ready yet computes it then (off the event loop, `await ensure(...)`), waiting for the
background thread's reading of that file rather than reading it twice. A model added by a
reload is hashed on its first need and cached from then on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from app.errors import LoraError
from app.file_hashes import HashCache, builtin_sha256, identity_sha256, vae_file, weights_file
from app.lora_files import read_header
from app.registry import ModelSpec, Registry

logger = logging.getLogger(__name__)

SHORT_HASH = 10  # A1111's short hash of a checkpoint (and of a VAE): sha256[:10]
LORA_SHORT_HASH = 12  # and of a LoRA (its `Lora hashes` infotext field): sha256[:12]


def short(sha256: str) -> str:
    return sha256[:SHORT_HASH]


class InfoHashes(NamedTuple):
    """What a txt2img answer's `info` says of hashes: `sd_model_hash` (short), `sd_vae_hash`
    (short, None for the model's own VAE, as A1111) and `Lora hashes` (name: 12 hex digits)."""

    model: str
    vae: str | None = None
    loras: tuple[tuple[str, str], ...] = ()

    def extra_params(self) -> dict[str, str]:
        if not self.loras:
            return {}
        return {"Lora hashes": ", ".join(f"{name}: {digest}" for name, digest in self.loras)}


class ModelHashes:
    """The hashes of the registry's models (live: a reload's models are seen at once)."""

    def __init__(self, registry: Registry, cache: HashCache | None = None) -> None:
        self.registry = registry
        self.cache = cache or HashCache(None)
        self._thread: threading.Thread | None = None

    # ---- blocking: off the event loop ------------------------------------------------
    def _of_spec(self, spec: ModelSpec) -> str:
        if spec.kind == "builtin":
            return builtin_sha256(spec.source)
        path = weights_file(spec.source, spec.kind)
        if path is not None:
            try:
                return self.cache.sha256(path)
            except OSError as exc:
                logger.warning("model %s: %s cannot be hashed (%s); its hash stands for its source "
                               "until it can", spec.name, path, exc)
        return identity_sha256(f"{spec.kind}:{spec.source}")

    def sha256(self, name: str) -> str:
        """The model's sha256 (hex), computing it if needed. KeyError for a name not served."""
        return self._of_spec(self.registry.models[name])

    def vae_sha256(self, name: str) -> str | None:
        """The sha256 of the model's own `vae:` (None when it uses the one it ships with, as
        A1111's `sd_vae_hash` is null for an automatic VAE)."""
        vae = self.registry.models[name].vae
        if vae is None:
            return None
        path = vae_file(vae)
        if path is not None:
            try:
                return self.cache.sha256(path)
            except OSError as exc:
                logger.warning("model %s: its VAE %s cannot be hashed (%s)", name, path, exc)
        return identity_sha256(f"vae:{vae}")

    def lora_sha256(self, name: str) -> str:
        """A LoRA file's sha256 (KeyError for a name not registered)."""
        return self.cache.sha256(self.registry.loras[name].path)

    def _for_info(self, model: str, loras: Sequence[str]) -> InfoHashes:
        vae = self.vae_sha256(model)
        return InfoHashes(model=short(self.sha256(model)), vae=None if vae is None else short(vae),
                          loras=tuple((name, self.lora_sha256(name)[:LORA_SHORT_HASH])
                                      for name in loras if name in self.registry.loras))

    async def for_info(self, model: str, loras: Sequence[str] = ()) -> InfoHashes:
        """The hashes an answer's `info` reports for a request of `model` with `loras`."""
        return await asyncio.to_thread(self._for_info, model, loras)

    def all(self) -> dict[str, str]:
        return {name: self.sha256(name) for name in list(self.registry.models)}

    def warm(self) -> None:
        """Hash every served model (and its own VAE) in a background thread."""
        if self._thread is not None and self._thread.is_alive():
            return

        def run() -> None:
            for name in list(self.registry.models):
                try:
                    self.sha256(name)
                    self.vae_sha256(name)
                except KeyError:
                    continue  # removed by a reload meanwhile
                except Exception:  # noqa: BLE001 - a hash is computed again when needed
                    logger.warning("hashing model %s failed", name, exc_info=True)

        self._thread = threading.Thread(target=run, name="model-hashes", daemon=True)
        self._thread.start()

    # ---- for routes ------------------------------------------------------------------
    async def ensure(self, names: Iterable[str]) -> dict[str, str]:
        """{name: sha256} for the served ones of `names`, computed off the loop if needed."""
        wanted = [name for name in names if name in self.registry.models]
        return await asyncio.to_thread(lambda: {name: self.sha256(name) for name in wanted})


def lora_file_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's own `__metadata__` (A1111's `metadata` of GET loras: kohya's training
    notes and its `sshs_model_hash` where the trainer wrote them); {} when unreadable."""
    try:
        return dict(read_header(path).metadata)
    except (LoraError, OSError):
        return {}
