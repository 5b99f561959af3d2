"""What A1111 keeps between requests: each caller's options (`GET/POST /sdapi/v1/options`)
and the jobs a `skip` stopped. One `A1111State` per app, built with it (app.main)."""

from __future__ import annotations

import json
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from app.api.a1111.hashes import ModelHashes
from app.api.rules import check_clip_skip, check_name
from app.engine.hub import default_model
from app.engine.jobs import Job
from app.errors import InvalidParameter, NotServed
from app.registry import Registry

MAX_OPTIONS_BYTES = 1 << 20  # the kept, unapplied options keys of one caller, as JSON
# Option sets of callers that are no key of the keys file (anonymous callers, one label per
# address) kept at once; the least recently used goes back to the server's defaults.
MAX_ANONYMOUS_OPTION_SETS = 64
_VAE_CHOICES = {"automatic": "Automatic", "none": "None", "": "Automatic"}
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]*\]\s*$")  # A1111 titles end with " [hash]"


def _find_model(value: str, registry: Registry) -> str | None:
    """The served model a checkpoint name means: the name itself, or an A1111-style title of it
    (`name.safetensors [hash]`), any case."""
    if value in registry.models:
        return value
    key = _TITLE_HASH.sub("", value).strip()
    for extension in (".safetensors", ".ckpt"):
        key = key.removesuffix(extension)
    return {name.lower(): name for name in registry.models}.get(key.lower())


def checkpoint_field(field: str, value: Any, registry: Registry) -> str:
    """The served model a checkpoint field (sd_model_checkpoint, override_settings') names."""
    name = check_name(field, value)
    model = _find_model(name, registry)
    if model is None:
        raise NotServed(field, name, registry.models)
    return model


def vae_choice(field: str, value: Any) -> str:
    name = check_name(field, value)
    choice = _VAE_CHOICES.get(name.strip().lower())
    if choice is None:
        raise InvalidParameter(
            field, name, "this server does not switch VAEs: each model runs with the VAE models.yaml "
            "gives it; send 'Automatic' or 'None', or leave it out")
    return choice


@dataclass(frozen=True)
class CallerOptions:
    """One caller's options: the server's defaults until it POSTs its own."""

    chosen_checkpoint: str | None = None  # None: the first model of models.yaml
    sd_vae: str = "Automatic"
    clip_skip: int = 1
    kept: Mapping[str, Any] = field(default_factory=dict)  # other keys it POSTed: kept, not applied


DEFAULTS = CallerOptions()


class A1111State:
    """What A1111 keeps between requests, one per app (app.state.a1111): each caller's options
    and the jobs a `skip` stopped (for GET progress). Used from the event loop only.

    Options are per caller (a key's label, or an anonymous address's), over the server's
    defaults: what one key POSTs applies to its own requests and shows in its own GET, never
    another key's. Memory is bounded: a caller keeps at most MAX_OPTIONS_BYTES of keys this
    server does not use, and callers that are not keys of the keys file (`is_key`) keep at most
    MAX_ANONYMOUS_OPTION_SETS option sets in all (the least recently used are dropped).

    The checkpoint is held by name; until a caller chooses one it is the first model of
    models.yaml as it is now (a reload that changes the first model changes it too). A chosen
    checkpoint that a reload removed is never replaced silently: that caller's requests that
    would use it answer 422 naming it and the models served now, until it chooses another."""

    def __init__(self, registry: Registry, *, is_key: Callable[[str], bool] | None = None,
                 hashes: ModelHashes | None = None) -> None:
        self.registry = registry
        self.hashes = hashes or ModelHashes(registry)  # the models' sha256 (app.api.a1111.hashes)
        self.is_key = is_key or (lambda client: False)
        self._keys: dict[str, CallerOptions] = {}  # keys of the keys file: bounded by that file
        self._others: OrderedDict[str, CallerOptions] = OrderedDict()  # least recently used first
        self.skipped: weakref.WeakSet[Job] = weakref.WeakSet()

    def of(self, client: str) -> CallerOptions:
        """The caller's options (the server's defaults when it has set none)."""
        if client in self._others:
            self._others.move_to_end(client)
            return self._others[client]
        return self._keys.get(client, DEFAULTS)

    def _keep(self, client: str, options: CallerOptions) -> None:
        if self.is_key(client):
            self._keys[client] = options
            return
        self._others[client] = options
        self._others.move_to_end(client)
        while len(self._others) > MAX_ANONYMOUS_OPTION_SETS:
            self._others.popitem(last=False)

    def checkpoint_name(self, client: str) -> str:
        """The caller's checkpoint as its options show it (served or not)."""
        return self.of(client).chosen_checkpoint or default_model(self.registry.models)

    def checkpoint(self, client: str) -> str:
        """The model of the caller's A1111 requests that name none; 422 if a reload removed it."""
        name = self.checkpoint_name(client)
        if name not in self.registry.models:
            raise InvalidParameter(
                "sd_model_checkpoint", name,
                "this model was chosen with POST /sdapi/v1/options and a reload of the models file "
                f"removed it; choose a served one ({', '.join(self.registry.models)}) with POST "
                "/sdapi/v1/options or override_settings")
        return name

    def options(self, client: str) -> dict[str, Any]:
        """The caller's view of the options (GET /sdapi/v1/options). `sd_checkpoint_hash` is the
        checkpoint's sha256 (computed if needed: `await hashes.ensure(...)` first, off the
        loop), "" for a checkpoint a reload removed."""
        own = self.of(client)
        name = self.checkpoint_name(client)
        digest = self.hashes.sha256(name) if name in self.registry.models else ""
        return {**own.kept, "sd_model_checkpoint": name, "sd_checkpoint_hash": digest,
                "sd_vae": own.sd_vae, "CLIP_stop_at_last_layers": own.clip_skip}

    def update(self, client: str, values: Mapping[str, Any]) -> None:
        """Apply a POSTed options dict to the caller's options: all of it, or (on any error)
        none of it."""
        own = self.of(client)
        checkpoint, sd_vae, clip_skip = own.chosen_checkpoint, own.sd_vae, own.clip_skip
        kept = dict(own.kept)
        for key, value in values.items():
            if key == "sd_checkpoint_hash":
                continue  # derived from the checkpoint
            if value is None and key in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"):
                continue
            if key == "sd_model_checkpoint":
                checkpoint = checkpoint_field(key, value, self.registry)
            elif key == "sd_vae":
                sd_vae = vae_choice(key, value)
            elif key == "CLIP_stop_at_last_layers":
                clip_skip = check_clip_skip(key, value)
            else:
                kept[key] = value
        size = len(json.dumps(kept, default=str))
        if size > MAX_OPTIONS_BYTES:
            raise InvalidParameter("options", f"<{size} bytes of other keys>",
                                   f"keys this server does not use are kept up to {MAX_OPTIONS_BYTES} "
                                   "bytes of JSON per API key")
        self._keep(client, replace(own, chosen_checkpoint=checkpoint, sd_vae=sd_vae, clip_skip=clip_skip,
                                   kept=kept))
