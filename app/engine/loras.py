"""LoRA adapters on a live pipeline: a per-pipeline LRU cache and activation.

A request names up to five LoRAs with a weight each. The engine's worker thread, which owns
the pipeline, calls `LoraManager.apply()` with the request's `(name, path, weight)` triples
before the pipeline call and `LoraManager.reset()` after it (also after a failed one), so no
LoRA outlives its request. Which LoRA fits which model was settled before: at start-up its
layers were matched against each model's architecture (app.engine.lora_fit), and the request
was checked against that.

How it stays exact: LoRAs are loaded as PEFT adapters (one adapter name per LoRA) and never
fused into the base weights, because unfusing is not bit-exact. Switching sets the active
adapters and their scales on every LoRA layer; "no LoRA" empties the active set, which makes
every LoRA layer return its base layer's output untouched, so the image equals the one from a
pipeline that never loaded a LoRA. A weight of 0 is left out of the active set rather than
multiplied by zero. Adapters that are cached but not requested are not active and contribute
nothing. Active adapters are ordered by LoRA name, so the image does not depend on request
order.

The cache holds at most `capacity` adapters (more only while one request needs more); the
least recently used one is removed with `pipe.delete_adapters()`, which frees its weights but
keeps the PEFT wrapper layers (they cost nothing when no adapter is active). A cached LoRA
whose file was replaced on disk (other size or mtime) is loaded again.

A LoRA must fit completely. diffusers loads whatever matches and only logs layers or weights
that did not, so after each load the manager compares the file's state dict (as diffusers
converted it) with what PEFT holds for the new adapter in each component: every LoRA matrix of
the file must sit in a layer of the model, with its shape and its values, and the adapter must
hold no matrix the file did not bring. Anything less is deleted again and refused with a
LoraError that says what did not fit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import stat
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.lora_fit import FILE_MATRIX, PEFT_MATRIX, peft_names
from app.errors import LoraError
from app.families import Family, family_label

log = logging.getLogger(__name__)

__all__ = ["LoraError", "LoraManager"]

_MAX_REASON = 240

_FILE_MATRIX, _PEFT_MATRIX = FILE_MATRIX, PEFT_MATRIX

_ADAPTER_IDS = itertools.count(1)  # process-wide: adapter names never repeat, even across managers


@dataclass
class _Cached:
    adapter: str
    path: Path
    signature: tuple[int, int] | None


@dataclass(frozen=True)
class _Read:
    """A LoRA file as diffusers reads it: converted state dict, kohya alphas, PEFT metadata."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict | None


def _stat(path: Path) -> tuple[tuple[int, int] | None, bool]:
    """(size, mtime) of the file, None when it is gone; and whether it is a regular file."""
    try:
        st = path.stat()
    except OSError:
        return None, False
    return (st.st_size, st.st_mtime_ns), stat.S_ISREG(st.st_mode)


def _clip(text: str, limit: int = _MAX_REASON) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _without_path(text: str, path: Path) -> str:
    for secret in (str(path), str(path.parent)):
        if secret and secret != ".":
            text = text.replace(secret, "<file>")
    return text


def _read_failure_reason(exc: BaseException, path: Path, model: str) -> str:
    from safetensors import SafetensorError

    if isinstance(exc, FileNotFoundError):
        return "the LoRA file is missing on the server"
    if isinstance(exc, SafetensorError):
        return f"the file is not a readable safetensors file ({_clip(_without_path(str(exc), path), 120)})"
    if isinstance(exc, OSError):
        return f"the LoRA file cannot be read ({exc.strerror or 'I/O error'})"
    return _load_failure_reason(exc, path, model)


def _load_failure_reason(exc: BaseException, path: Path, model: str) -> str:
    """A load error in client words (diffusers/PEFT raise only for a few misfits)."""
    text = _without_path(str(exc) or type(exc).__name__, path)
    if "size mismatch" in text or "shape" in text.lower():
        return f"its layer shapes do not match {model} (is it for another base model?)"
    if "not found in the base model" in text or "Target modules" in text:
        return f"its layers match no module of {model} (is it for another base model?)"
    if "have not been correctly renamed" in text or "Invalid LoRA checkpoint" in text:
        return "unsupported format: diffusers cannot convert its layer names"
    return f"cannot be loaded: {_clip(text, 160)}"


def _layer(key: str) -> str:
    """The layer (module path) a LoRA matrix key belongs to."""
    return _FILE_MATRIX.sub("", key)


class LoraManager:
    """The LoRA adapters of one pipeline: load on demand, LRU-cache, activate per request.

    `family` and `model_name` only word the errors. Not thread-safe: the worker thread that
    owns the pipeline is its only caller.
    """

    def __init__(self, pipe, family: Family, capacity: int = 8, *, model_name: str | None = None) -> None:
        if family not in ("sdxl", "sd15"):
            raise ValueError(f"unknown family {family!r}")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.pipe = pipe
        self.family: Family = family
        self.capacity = capacity
        self.model_name = model_name
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._live = False  # an adapter may be active: set before any load or activation
        self._active: tuple[list[str], list[float]] | None = None  # what apply() activated
        self._layer_cache: list | None = None  # the pipe's LoRA layers; None after a change

    # -- public -------------------------------------------------------------------------

    @property
    def cached(self) -> list[str]:
        """Names of the cached LoRAs, least recently used first."""
        return list(self._cache)

    def adapter_name(self, name: str) -> str | None:
        """The PEFT adapter name under which LoRA `name` is cached, if it is."""
        entry = self._cache.get(name)
        return entry.adapter if entry else None

    def apply(self, loras: Sequence[tuple[str, Path | str, float]]) -> None:
        """Make exactly these LoRAs active with these weights; an empty sequence: none.

        Items are `(name, path, weight)` (GenParams.loras). LoRAs not cached yet are loaded
        from `path`; on any failure no adapter is left active or half-loaded and LoraError is
        raised.
        """
        self._deactivate()
        requests = [self._parse(item) for item in loras]
        wanted = {name for name, _, _ in requests}
        if len(wanted) != len(requests):
            seen: set[str] = set()
            twice = next(n for n, _, _ in requests if n in seen or seen.add(n))
            raise LoraError(twice, "requested more than once")
        active: list[tuple[str, str, float]] = []
        try:
            for name, path, weight in requests:
                adapter = self._ensure_loaded(name, path, keep=wanted)
                if weight != 0.0:
                    active.append((name, adapter, weight))
            self._trim(keep=wanted)
            if not active:
                # all weights 0 (or nothing asked): a fresh load leaves its new adapter active
                self._deactivate()
                return
            self._live = True
            try:
                # PEFT adds the LoRA deltas in this order; a fixed order (by LoRA name) makes
                # the image independent of the order the request listed them in.
                active.sort()
                self._activate([a for _, a, _ in active], [w for _, _, w in active])
                self._active = ([a for _, a, _ in active], [w for _, _, w in active])
            except Exception as exc:
                log.exception("activating LoRAs %s failed", sorted(wanted))
                raise LoraError(
                    ", ".join(n for n, _, _ in requests),
                    f"cannot be activated: {_clip(str(exc), 160)}",
                ) from exc
        except BaseException:
            self._deactivate()
            raise

    def reset(self) -> None:
        """No adapter active: the pipeline computes exactly its base model again."""
        self._deactivate()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No adapter active inside the block, the same adapters and weights again after it:
        for a refiner that computes with one of this pipeline's modules (app.engine.sharing)
        between two calls of a batch with LoRAs."""
        active = self._active if self._live else None
        self._deactivate()
        try:
            yield
        finally:
            if active is not None:
                self._live = True
                self._activate(*active)
                self._active = active

    def evict(self, name: str) -> bool:
        """Remove LoRA `name` from the cache and the pipeline (e.g. after a registry change)."""
        entry = self._cache.pop(name, None)
        if entry is None:
            return False
        self._purge(entry.adapter)
        return True

    def clear(self) -> None:
        """Remove every cached LoRA from the pipeline."""
        for name in list(self._cache):
            self.evict(name)

    # -- activation -----------------------------------------------------------------------

    @staticmethod
    def _parse(item: tuple) -> tuple[str, Path, float]:
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise TypeError(f"a LoRA request is (name, path, weight), not {item!r}")
        name, path, weight = item
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise LoraError(str(name), f"weight {weight!r} is not a number") from None
        if not math.isfinite(value):
            raise LoraError(str(name), f"weight {weight!r} is not a finite number")
        return str(name), Path(path), value

    def _deactivate(self) -> None:
        if not self._live:
            return
        # Disabled LoRA layers return their base layer's output untouched: the exact base
        # model. Emptying the active set as well means a later eviction never "re-activates"
        # a remaining adapter (PEFT picks a new active one when an active one is deleted).
        for layer in self._layers():
            layer.set_adapter([])
        self._live = False
        self._active = None

    def _activate(self, adapters: list[str], weights: list[float]) -> None:
        """What pipe.set_adapters does, over the cached list of LoRA layers instead of a walk
        of every module of every component: a cached switch costs only this loop."""
        for layer in self._layers():
            layer.set_adapter(adapters)  # a layer skips the adapters it does not have
            for adapter, weight in zip(adapters, weights, strict=True):
                layer.set_scale(adapter, weight)

    def _layers(self) -> list:
        if self._layer_cache is None:
            self._layer_cache = list(self._lora_layers())
        return self._layer_cache

    def _components(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """The pipeline parts LoRAs load into (unet, text_encoder[, text_encoder_2])."""
        for component in getattr(self.pipe, "_lora_loadable_modules", ["unet", "text_encoder"]):
            model = getattr(self.pipe, component, None)
            if isinstance(model, torch.nn.Module):
                yield component, model

    def _lora_layers(self) -> Iterator:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for _, model in self._components():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    yield module

    # -- loading --------------------------------------------------------------------------

    def _ensure_loaded(self, name: str, path: Path, keep: set[str]) -> str:
        signature, regular = _stat(path)
        entry = self._cache.get(name)
        if entry is not None:
            same_file = entry.path == path and (signature is None or signature == entry.signature)
            if same_file:
                self._cache.move_to_end(name)
                return entry.adapter
            self.evict(name)  # the registry points elsewhere or the file was replaced

        if signature is None:
            raise LoraError(name, "the LoRA file is missing on the server")
        if not regular:
            raise LoraError(name, "the LoRA path is not a file")
        read = self._read(name, path)
        self._make_room(keep)
        adapter = self._new_adapter_name(name)
        self._live = True  # a new adapter is active in the layers it creates
        self._layer_cache = None
        try:
            self._load(read, adapter)
        except Exception as exc:
            log.warning("loading LoRA %r from %s failed: %s", name, path, _clip(str(exc), 400))
            log.debug("loading LoRA %r failed", name, exc_info=True)
            self._purge(adapter)
            raise LoraError(name, _load_failure_reason(exc, path, self._model_words())) from exc
        except BaseException:
            self._purge(adapter)
            raise
        try:
            reason = self._misfit(read.state_dict, adapter)
        except BaseException:
            self._purge(adapter)
            raise
        if reason:
            log.warning("LoRA %r from %s refused: %s", name, path, reason)
            self._purge(adapter)
            raise LoraError(name, reason)
        self._cache[name] = _Cached(adapter, path, signature)
        return adapter

    def _read(self, name: str, path: Path) -> _Read:
        """The file as diffusers converts it (kohya names → diffusers names, SGM UNet blocks →
        diffusers blocks), read once; safetensors only, never a pickle."""
        try:
            out = self.pipe.lora_state_dict(
                str(path),
                unet_config=self.pipe.unet.config,  # maps SGM (input_blocks_*) names
                use_safetensors=True,
                return_lora_metadata=True,
            )
        except Exception as exc:
            log.warning("reading LoRA %r from %s failed: %s", name, path, _clip(str(exc), 400))
            raise LoraError(name, _read_failure_reason(exc, path, self._model_words())) from exc
        state_dict, network_alphas = out[0], out[1]
        metadata = out[2] if len(out) > 2 else None
        if not any(_FILE_MATRIX.search(key) for key in state_dict):
            raise LoraError(name, "not a LoRA: the file holds no LoRA weights")
        if not all("lora" in key for key in state_dict):
            raise LoraError(name, "unsupported format: diffusers cannot convert its layer names")
        return _Read(dict(state_dict), network_alphas or None, metadata or None)

    def _load(self, read: _Read, adapter: str) -> None:
        """What pipe.load_lora_weights does after reading the file, for the state dict read
        once: the kohya alphas and the PEFT metadata (rank, alpha) go along with it, which
        they would not through load_lora_weights(dict)."""
        from diffusers.loaders import lora_pipeline

        pipe = self.pipe
        common = {
            "network_alphas": read.network_alphas,
            "adapter_name": adapter,
            "_pipeline": pipe,
            "low_cpu_mem_usage": getattr(lora_pipeline, "_LOW_CPU_MEM_USAGE_DEFAULT_LORA", False),
        }
        if read.metadata is not None:
            common["metadata"] = read.metadata
        for component, model in self._components():
            if component == "unet":
                pipe.load_lora_into_unet(read.state_dict, unet=model, **common)
            else:
                pipe.load_lora_into_text_encoder(
                    read.state_dict,
                    text_encoder=model,
                    prefix=component,
                    lora_scale=pipe.lora_scale,
                    **common,
                )

    # -- the fit check ----------------------------------------------------------------------

    def _model_words(self) -> str:
        if self.model_name:
            return f"model '{self.model_name}' ({family_label(self.family)})"
        return f"this {family_label(self.family)} model"

    def _misfit(self, state_dict: Mapping[str, torch.Tensor], adapter: str) -> str | None:
        """Why the adapter just loaded does not hold exactly the file's LoRA, or None.

        Every LoRA matrix of the file must be one of the adapter's (same layer, same shape,
        same values once cast to the adapter's dtype), and the adapter must hold no matrix the
        file did not bring (PEFT initialises those itself).
        """
        expected: dict[tuple[str, str], torch.Tensor] = {}  # (component, PEFT key) → file matrix
        matrices = {k: v for k, v in state_dict.items() if _FILE_MATRIX.search(k)}
        claimed: set[str] = set()
        components = list(self._components())
        for component, model in components:
            prefix = f"{component}."
            part = {k.removeprefix(prefix): v for k, v in matrices.items() if k.startswith(prefix)}
            claimed.update(f"{component}.{k}" for k in part)
            for key, tensor in self._peft_names(component, model, part).items():
                expected[component, key] = tensor
        stray = {_layer(k) for k in matrices if k not in claimed}  # diffusers skips these silently

        loaded: dict[tuple[str, str], torch.Tensor] = {}
        for component, model in components:
            for key, tensor in self._adapter_matrices(model, adapter).items():
                loaded[component, key] = tensor

        file_layers = {(c, _layer(k)) for c, k in expected} | {("?", s) for s in stray}
        unplaced = {(c, _layer(k)) for c, k in expected if (c, k) not in loaded} | {("?", s) for s in stray}
        total = len(file_layers)
        if unplaced:
            model = self._model_words()
            if len(unplaced) == total:
                return f"its layers match no module of {model} (is it for another base model?)"
            return (
                f"{len(unplaced)} of its {total} layers match no module of {model} "
                "(is it for another base model?)"
            )
        extra = {(c, _layer(k)) for c, k in loaded if (c, k) not in expected}
        if extra:
            return (
                f"{len(extra)} of its {total} layers are incomplete: the file lacks their LoRA "
                "down or up weight"
            )
        reshaped = [k for k, t in expected.items() if tuple(t.shape) != tuple(loaded[k].shape)]
        if reshaped:
            return (
                f"{len(reshaped)} of its weights have shapes that do not fit this model's layers "
                "(is it for another base model?)"
            )
        differ = self._differing(expected, loaded)
        if differ:
            return f"{differ} of its {len(expected)} weights did not load into the model's layers"
        return None

    @staticmethod
    def _peft_names(component: str, model: torch.nn.Module, part: dict) -> dict[str, torch.Tensor]:
        return peft_names(component, part, flat_text_model=not hasattr(model, "text_model"))

    @staticmethod
    def _adapter_matrices(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        """The LoRA matrices PEFT holds for `adapter` in one component, adapter name removed."""
        if adapter not in (getattr(model, "peft_config", None) or {}):
            return {}
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
        return {k: v for k, v in state.items() if _PEFT_MATRIX.search(k)}

    @staticmethod
    def _differing(expected: dict, loaded: dict) -> int:
        """How many loaded matrices differ from the file's, cast to the loaded dtype and
        device (NaN equals NaN). A matrix PEFT created but nothing was read into may still be
        on the meta device: it differs."""
        differ = 0
        with torch.no_grad():
            for key, tensor in expected.items():
                held = loaded[key].detach()
                if held.is_meta:
                    differ += 1
                    continue
                want = tensor.detach().to(device=held.device, dtype=held.dtype)
                if torch.equal(held, want):
                    continue
                if not torch.isclose(held, want, rtol=0, atol=0, equal_nan=True).all():
                    differ += 1
        return differ

    # -- cache upkeep ---------------------------------------------------------------------

    def _make_room(self, keep: set[str]) -> None:
        self._trim(keep, limit=self.capacity - 1)

    def _trim(self, keep: set[str], limit: int | None = None) -> None:
        """Evict least recently used adapters outside `keep` down to `limit` (the capacity)."""
        limit = self.capacity if limit is None else limit
        while len(self._cache) > limit:
            victim = next((n for n in self._cache if n not in keep), None)
            if victim is None:
                return  # one request needs more adapters than the capacity: allow it
            self.evict(victim)

    def _new_adapter_name(self, name: str) -> str:
        # PEFT stores adapters as ModuleDict keys: no dots, and no clash with nn.Module
        # attributes ("to", "cuda", ...); the counter keeps every adapter name unique.
        safe = re.sub(r"[^0-9A-Za-z_]", "_", name)[:48].strip("_") or "lora"
        return f"cs{next(_ADAPTER_IDS)}_{safe}"

    def _purge(self, adapter: str) -> None:
        """Delete `adapter` from every component, including a half-loaded one."""
        self._layer_cache = None
        try:
            self.pipe.delete_adapters(adapter)
        except Exception:
            log.warning("delete_adapters(%r) failed; removing layer by layer", adapter, exc_info=True)
            self._purge_layers(adapter)

    def _purge_layers(self, adapter: str) -> None:
        for layer in self._lora_layers():
            with contextlib.suppress(Exception):
                layer.delete_adapter(adapter)
        for _, model in self._components():
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(adapter, None)
