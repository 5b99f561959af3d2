"""LoRA adapters on a live pipeline: family detection, a per-pipeline LRU cache, activation.

A request names up to five LoRAs with a weight each. The engine's worker thread, which owns
the pipeline, calls `LoraManager.apply()` before the pipeline call and `LoraManager.reset()`
after it (also after a failed one), so no LoRA outlives its request.

How it stays exact: LoRAs are loaded as PEFT adapters (`pipe.load_lora_weights(...,
adapter_name=...)`) and never fused into the base weights, because unfusing is not bit-exact.
Switching is `set_adapters(names, weights)` + `enable_lora()`; "no LoRA" is `disable_lora()`,
which makes every LoRA layer return its base layer's output untouched, so the image equals
the one from a pipeline that never loaded a LoRA. A weight of 0 is left out of the active set
rather than multiplied by zero. Adapters that are cached but not requested are not active and
contribute nothing.

The cache holds at most `capacity` adapters (more only while one request needs more); the
least recently used one is removed with `pipe.delete_adapters()`, which frees its weights but
keeps the PEFT wrapper layers (they cost nothing when no adapter is active).

`detect_lora_family()` reads only the safetensors header (names, shapes and metadata, no
tensor data) and tells SDXL from SD 1.x LoRAs; the manager checks it before loading a file.

A LoRA must fit completely: diffusers loads whatever matches and merely logs layers or
weights that did not, so after each load the manager counts the injected layers, reads what
diffusers/transformers logged about this adapter's keys, and checks the weights are not all
zero; anything short of a complete fit is deleted again and refused with a LoraError.
Active adapters are ordered by LoRA name, so the image does not depend on request order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from app.errors import LoraError

log = logging.getLogger(__name__)

Family = Literal["sdxl", "sd15"]

FAMILY_LABELS: dict[str, str] = {"sdxl": "SDXL", "sd15": "SD 1.x", "sd2": "SD 2.x"}

# Width of the cross-attention keys/values (= the text conditioning width) per family.
# 2048 / 768 / 1024 are the real SDXL / SD 1.x / SD 2.x UNets; 64 and 32 are the tiny test
# pipelines of app.engine.tiny (SDXL: two 32-wide text encoders concatenated; SD 1.x: one).
_CROSS_ATTENTION_WIDTH: dict[int, str] = {
    2048: "sdxl",
    768: "sd15",
    1024: "sd2",
    64: "sdxl",
    32: "sd15",
}

_LORA_SUFFIX = re.compile(
    r"(?:\.|_)(?:lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.(?:down|up))"
    r"(?:\.[^.]+)?\.weight$"
)
_DOWN_SUFFIX = re.compile(
    r"(?:\.lora_down|\.lora_A|\.lora\.down|_lora\.down|\.lora_linear_layer\.down)(?:\.[^.]+)?\.weight$"
)
_NAMED_ADAPTER = re.compile(r"\.lora_(?:A|B|down|up)\.[^.]+\.weight$")
_LYCORIS_MARKERS = ("hada_w", "lokr_w", "lora_mid", ".oft_", ".ia3", "lokr_t")

_MAX_REASON = 240


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class _Header:
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def _read_header(path: Path, name: str) -> _Header:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            metadata = dict(f.metadata() or {})
    except FileNotFoundError:
        raise LoraError(name, "the LoRA file is missing on the server") from None
    except IsADirectoryError:
        raise LoraError(name, "the LoRA path is a directory, not a .safetensors file") from None
    except OSError as exc:
        raise LoraError(name, f"the LoRA file cannot be read ({exc.strerror or 'I/O error'})") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
        raise LoraError(
            name, f"the file is not a readable safetensors file ({_clip(str(exc), 120)})"
        ) from None
    return _Header(keys, shapes, metadata)


def _component(key: str) -> str:
    """Which pipeline part a LoRA key belongs to: unet, te1, te2 or ? (unknown)."""
    if key.startswith(("lora_te2_", "text_encoder_2.", "te2.")):
        return "te2"
    if key.startswith(("lora_te_", "lora_te1_", "text_encoder.", "te1.", "te.")):
        return "te1"
    if key.startswith(("lora_unet_", "unet.")):
        return "unet"
    flat = key.replace(".", "_")
    if re.search(
        r"(?:^|_)(?:down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)_", flat
    ):
        return "unet"
    if "text_model" in flat:
        return "te1"
    return "?"


# (metadata key, value prefix, family): modelspec first, then kohya's training metadata.
_METADATA_FAMILIES = (
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd15"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v1", "sd15"),
    ("ss_base_model_version", "sd_v2", "sd2"),
    ("ss_v2", "true", "sd2"),
)


def _metadata_family(metadata: dict[str, str]) -> str | None:
    for key, prefix, family in _METADATA_FAMILIES:
        if metadata.get(key, "").lower().startswith(prefix):
            return family
    return None


def _structural_votes(unet_keys: list[str], has_te2: bool) -> set[str]:
    """Family cues from layer names that hold for every real SDXL / SD 1.x UNet."""
    votes: set[str] = set()
    if has_te2:
        votes.add("sdxl")  # SDXL is the only family with a second text encoder
    for key in unet_keys:
        flat = key.replace(".", "_")
        if "add_embedding" in flat or "label_emb" in flat:
            votes.add("sdxl")  # the added-conditioning MLP exists only in SDXL
        depth = re.search(r"transformer_blocks_(\d+)_", flat)
        if depth and int(depth[1]) >= 1:
            votes.add("sdxl")  # SD 1.x/2.x transformers are one block deep; SDXL's 2 or 10
        if re.search(r"(?:^|_)down_blocks_0_attentions_", flat) or re.search(
            r"(?:^|_)(?:down|up)_blocks_3_", flat
        ):
            votes.add("sd15")  # SDXL has no attention in its first down block and 3 up blocks
        sgm = re.search(r"(?:^|_)input_blocks_(\d+)_1_", flat)
        if sgm and int(sgm[1]) in (1, 2):
            votes.add("sd15")  # attention at SGM input block 1/2 only in SD 1.x/2.x
        sgm = re.search(r"(?:^|_)output_blocks_(\d+)_1_", flat)
        if sgm and int(sgm[1]) >= 9:
            votes.add("sd15")  # SDXL has output blocks 0..8 only
    return votes


def _down_in_features(header: _Header, keys: list[str], pattern: str) -> set[int]:
    found = set()
    for key in keys:
        if re.search(pattern, key) and _DOWN_SUFFIX.search(key):
            shape = header.shapes.get(key, ())
            if len(shape) == 2:
                found.add(int(shape[1]))
    return found


def _size_vote(header: _Header, unet_keys: list[str], te1_keys: list[str]) -> str | None:
    cross = _down_in_features(header, unet_keys, r"attn2[._](?:processor[._])?to[._]?[kv]")
    te1 = _down_in_features(header, te1_keys, r"[._]q[._]?proj")
    if len(cross) == 1:
        width = next(iter(cross))
        if width in _CROSS_ATTENTION_WIDTH:
            return _CROSS_ATTENTION_WIDTH[width]
        if len(te1) == 1:
            hidden = next(iter(te1))
            # SD 1.x conditions on its one text encoder; SDXL on two, concatenated.
            return "sd15" if width == hidden else "sdxl" if width > hidden else None
    if not cross and te1 == {1024}:
        return "sd2"  # OpenCLIP-H, SD 2.x's only text encoder
    return None


def _classify(header: _Header, name: str) -> str | None:
    """The family ("sdxl", "sd15", "sd2"), None when nothing tells; raises for a non-LoRA."""
    keys = header.keys
    lycoris = sorted({m.strip("._") for k in keys for m in _LYCORIS_MARKERS if m in k})
    if lycoris:
        raise LoraError(
            name,
            "unsupported format: LyCORIS adapter layers "
            f"({', '.join(lycoris)}); only plain LoRA files (kohya/A1111 or diffusers/PEFT) load",
        )
    lora_keys = [k for k in keys if _LORA_SUFFIX.search(k)]
    if not lora_keys:
        raise LoraError(name, "not a LoRA: the file holds no LoRA weights")
    if any(_NAMED_ADAPTER.search(k) for k in lora_keys):
        raise LoraError(
            name,
            "unsupported format: its keys carry a PEFT adapter name (lora_A.<name>.weight); "
            "save it without the adapter name",
        )
    parts: dict[str, list[str]] = {"unet": [], "te1": [], "te2": [], "?": []}
    for key in lora_keys:
        parts[_component(key)].append(key)

    votes = _structural_votes(parts["unet"] + parts["?"], has_te2=bool(parts["te2"]))
    size = _size_vote(header, parts["unet"] + parts["?"], parts["te1"])
    if size == "sd2":
        return "sd2"
    if len(votes) > 1:
        raise LoraError(name, "unsupported format: its layer names mix the SDXL and SD 1.x layouts")
    if votes:
        return next(iter(votes))
    if size:
        return size
    meta = _metadata_family(header.metadata)
    if meta:
        return meta
    if any(re.search(r"(?:^|[._])(?:input_blocks|middle_block|output_blocks)[._]", k) for k in keys):
        return "sdxl"  # kohya names the UNet the SGM way only for SDXL
    return None


def _layer_count(header: _Header) -> int:
    """How many LoRA layers (one down/A matrix each) the file holds."""
    return sum(1 for k in header.keys if _DOWN_SUFFIX.search(k))


def _family_of(path: Path, name: str) -> str | None:
    return _classify(_read_header(Path(path), name), name)


def detect_lora_family(path: Path, *, name: str | None = None) -> Family:
    """SDXL ("sdxl") or SD 1.x ("sd15"), read from the file's safetensors header only.

    Cues, strongest first: layer names that exist in only one family (a second text encoder,
    SDXL's added-conditioning MLP, transformer depth > 1, attention in the first down block,
    a fourth UNet block), then the cross-attention width (2048 SDXL, 768 SD 1.x, and the tiny
    test pipelines' 64 / 32), then kohya/modelspec metadata, then SGM (`input_blocks_`) naming.
    Raises LoraError (named `name`, default the file stem) for an unreadable file, a file
    without LoRA weights, an unsupported format (LyCORIS, SD 2.x) or one that cannot be told.
    """
    path = Path(path)
    label = name or path.stem
    family = _family_of(path, label)
    if family == "sd2":
        raise LoraError(label, "unsupported: it is an SD 2.x LoRA; only SDXL and SD 1.x are served")
    if family is None:
        raise LoraError(
            label,
            "cannot tell whether it is an SDXL or an SD 1.x LoRA; declare its family in models.yaml",
        )
    return family  # type: ignore[return-value]


# --------------------------------------------------------------------------- manager


@dataclass
class _Cached:
    adapter: str
    path: Path
    signature: tuple[int, int] | None


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _clip(text: str, limit: int = _MAX_REASON) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_failure_reason(exc: BaseException, path: Path) -> str:
    text = str(exc) or type(exc).__name__
    for secret in (str(path), str(path.parent)):
        if secret and secret != ".":
            text = text.replace(secret, "<file>")
    if "size mismatch" in text or "shape" in text.lower():
        return "its layer shapes do not match this model (is it for another base model?)"
    if "not found in the base model" in text or "Target modules" in text:
        return "its layers match no module of this model (is it for another base model?)"
    if "have not been correctly renamed" in text or "Invalid LoRA checkpoint" in text:
        return "unsupported format: diffusers cannot convert its layer names"
    return f"cannot be loaded: {_clip(text, 160)}"


_quiet = threading.local()
_ADAPTER_IDS = itertools.count(1)  # process-wide: adapter names never repeat, even across managers


_ROUTINE = ("No LoRA keys associated to",)
_KEY_TROUBLE = ("unexpected keys", "missing keys", "LOAD REPORT")


class _LoadDiagnostics(logging.Filter):
    """Collects what diffusers/transformers log about the keys of a load made in this thread.

    Both libraries load what they can and only *log* keys that matched no module or stayed
    unloaded ("unexpected keys" / "missing keys" from diffusers, a "LOAD REPORT" table from
    transformers for text encoders). During our loads those records are taken out of the log
    and turned into a LoraError; diffusers' note that a LoRA has no text-encoder layers
    ("No LoRA keys associated to ...") is routine and dropped. Other records pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_quiet, "sink", None)
        if sink is None:
            return True
        message = record.getMessage()
        if any(text in message for text in _ROUTINE):
            return False
        if any(text in message for text in _KEY_TROUBLE):
            sink.append(message)
            return False
        return True


def _is_key_trouble(message: str, adapter: str) -> bool:
    """Whether a captured load message reports a key of *this* adapter that did not fit."""
    if "LOAD REPORT" not in message:
        return True  # diffusers' unexpected/missing keys, already limited to this adapter
    # transformers' table also lists the *other* adapters' keys as MISSING (it counts every
    # "lora" key it expects); only rows of this adapter, or keys the file brought, count.
    for row in message.splitlines():
        if "|" not in row:
            continue
        if any(status in row for status in ("UNEXPECTED", "MISMATCH", "CONVERSION")):
            return True
        if "MISSING" in row and f".{adapter}." in row:
            return True
    return False


_FILTER = _LoadDiagnostics()
for _logger_name in (
    "diffusers.utils.peft_utils",
    "diffusers.loaders.lora_base",
    "diffusers.loaders.peft",
    "transformers.integrations.peft",
    "transformers.utils.loading_report",
):
    logging.getLogger(_logger_name).addFilter(_FILTER)


@contextlib.contextmanager
def _load_diagnostics() -> Iterator[list[str]]:
    previous = getattr(_quiet, "sink", None)
    sink: list[str] = []
    _quiet.sink = sink
    try:
        yield sink
    finally:
        _quiet.sink = previous


class LoraManager:
    """The LoRA adapters of one pipeline: load on demand, LRU-cache, activate per request.

    Not thread-safe: the worker thread that owns the pipeline is its only caller.
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

    def apply(self, loras: Sequence[tuple]) -> None:
        """Make exactly these LoRAs active with these weights; an empty sequence: none.

        Items are `(name, path, weight)` or `(name, path, weight, family)`, where a declared
        family (from models.yaml) replaces detection. LoRAs not cached yet are loaded; on any
        failure no adapter is left active or half-loaded and LoraError is raised.
        """
        self._deactivate()
        requests = [self._parse(item) for item in loras]
        wanted = {name for name, _, _, _ in requests}
        if len(wanted) != len(requests):
            seen: set[str] = set()
            twice = next(n for n, _, _, _ in requests if n in seen or seen.add(n))
            raise LoraError(twice, "requested more than once")
        active: list[tuple[str, str, float]] = []
        try:
            for name, path, weight, declared in requests:
                adapter = self._ensure_loaded(name, path, declared, keep=wanted)
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
            except Exception as exc:
                log.exception("activating LoRAs %s failed", sorted(wanted))
                raise LoraError(
                    ", ".join(n for n, _, _, _ in requests),
                    f"cannot be activated: {_clip(str(exc), 160)}",
                ) from exc
        except BaseException:
            self._deactivate()
            raise

    def reset(self) -> None:
        """No adapter active: the pipeline computes exactly its base model again."""
        self._deactivate()

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

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _parse(item: tuple) -> tuple[str, Path, float, str | None]:
        if len(item) == 3:
            name, path, weight = item
            declared = None
        elif len(item) == 4:
            name, path, weight, declared = item
        else:
            raise TypeError("a LoRA request is (name, path, weight[, family])")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise LoraError(str(name), f"weight {weight!r} is not a number") from None
        if not math.isfinite(value):
            raise LoraError(str(name), f"weight {weight!r} is not a finite number")
        return str(name), Path(path), value, declared

    def _deactivate(self) -> None:
        if not self._live:
            return
        # Disabled LoRA layers return their base layer's output untouched: the exact base
        # model. Emptying the active set as well means a later eviction never "re-activates"
        # a remaining adapter (PEFT picks a new active one when an active one is deleted).
        for layer in self._layers():
            layer.set_adapter([])
        self._live = False

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

    def _lora_layers(self) -> Iterator:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component in getattr(self.pipe, "_lora_loadable_modules", ["unet", "text_encoder"]):
            model = getattr(self.pipe, component, None)
            if isinstance(model, torch.nn.Module):
                for module in model.modules():
                    if isinstance(module, BaseTunerLayer):
                        yield module

    def _wrong_family(self, found: str) -> str:
        model = f"model '{self.model_name}'" if self.model_name else "this model"
        return f"it is an {FAMILY_LABELS.get(found, found)} LoRA; {model} is {FAMILY_LABELS[self.family]}"

    def _ensure_loaded(self, name: str, path: Path, declared: str | None, keep: set[str]) -> str:
        signature = _signature(path)
        entry = self._cache.get(name)
        if entry is not None:
            same_file = entry.path == path and (signature is None or signature == entry.signature)
            if same_file:
                self._cache.move_to_end(name)
                return entry.adapter
            self.evict(name)  # the registry points elsewhere or the file was replaced

        if signature is None:
            raise LoraError(name, "the LoRA file is missing on the server")
        # The header check runs even for a declared family: it names a bad file precisely.
        header = _read_header(path, name)
        detected = _classify(header, name)
        family = declared if declared is not None else detected
        if family is not None and family != self.family:
            raise LoraError(name, self._wrong_family(family))

        self._make_room(keep)
        adapter = self._new_adapter_name(name)
        kwargs = {"adapter_name": adapter}
        if self.family == "sd15":
            # SD 1.x loading skips diffusers' SGM (input_blocks_*) block remapping unless it
            # gets the UNet config; SDXL loading passes it itself.
            kwargs["unet_config"] = self.pipe.unet.config
        self._live = True  # a new adapter is active in the layers it creates
        self._layer_cache = None
        try:
            with _load_diagnostics() as trouble:
                self.pipe.load_lora_weights(str(path), **kwargs)
        except Exception as exc:
            log.warning("loading LoRA %r from %s failed: %s", name, path, _clip(str(exc), 400))
            log.debug("loading LoRA %r failed", name, exc_info=True)
            self._purge(adapter)
            raise LoraError(name, _load_failure_reason(exc, path)) from exc
        except BaseException:
            self._purge(adapter)
            raise
        reason = self._check_loaded(adapter, _layer_count(header), trouble)
        if reason:
            details = " | ".join(m for m in trouble if _is_key_trouble(m, adapter))
            log.warning("LoRA %r from %s refused: %s %s", name, path, reason, _clip(details, 600))
            self._purge(adapter)
            raise LoraError(name, reason)
        self._cache[name] = _Cached(adapter, path, signature)
        return adapter

    def _check_loaded(self, adapter: str, expected: int, trouble: list[str]) -> str | None:
        """Why a finished load is unusable, or None. diffusers loads what it can and only
        logs the rest, so a LoRA that does not fit completely is refused here."""
        ups = [
            layer.lora_B[adapter].weight
            for layer in self._lora_layers()
            if adapter in getattr(layer, "lora_B", {})
        ]
        if not ups:
            return "none of its layers match this model (is it for another base model?)"
        if len(ups) < expected:
            return (
                f"{expected - len(ups)} of its {expected} layers have no matching module in "
                "this model (is it for another base model?)"
            )
        if any(_is_key_trouble(message, adapter) for message in trouble):
            return "some of its weights do not fit this model's layers (unexpected or missing keys)"
        # Every up-projection still zero means no weight was read (PEFT starts B at zero).
        if not bool(torch.stack([w.detach().abs().sum().float() for w in ups]).sum() > 0):
            return "its weights could not be read into the model (every LoRA up-weight is zero)"
        return None

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
        for component in getattr(self.pipe, "_lora_loadable_modules", ["unet", "text_encoder"]):
            config = getattr(getattr(self.pipe, component, None), "peft_config", None)
            if isinstance(config, dict):
                config.pop(adapter, None)
