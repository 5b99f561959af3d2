"""What A1111 keeps between requests: the options (`GET/POST /sdapi/v1/options`) and the jobs
a `skip` stopped. One `A1111State` per app, built with it (app.main)."""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping
from typing import Any

from app.api.rules import check_clip_skip, check_name
from app.engine.jobs import Job
from app.errors import InvalidParameter, NotServed
from app.registry import Registry

MAX_OPTIONS_BYTES = 1 << 20  # the kept, unapplied options keys of a server, as JSON
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


class A1111State:
    """What A1111 keeps between requests, one per app (app.state.a1111): the options dict and
    the jobs a `skip` stopped (for GET progress). Used from the event loop only.

    The checkpoint is held by name; until a client chooses one it is the first model of
    models.yaml as it is now (a reload that changes the first model changes it too). A chosen
    checkpoint that a reload removed is never replaced silently: requests that would use it
    answer 422 naming it and the models served now, until a client chooses another."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.chosen_checkpoint: str | None = None  # None: the first model of models.yaml
        self.sd_vae = "Automatic"
        self.clip_skip = 1
        self.kept: dict[str, Any] = {}  # other keys clients POSTed: kept, not applied
        self.skipped: weakref.WeakSet[Job] = weakref.WeakSet()

    @property
    def checkpoint_name(self) -> str:
        """The checkpoint as the options show it (served or not)."""
        return self.chosen_checkpoint or next(iter(self.registry.models))

    def checkpoint(self) -> str:
        """The model of A1111 requests that name none; 422 if a reload removed it."""
        name = self.checkpoint_name
        if name not in self.registry.models:
            raise InvalidParameter(
                "sd_model_checkpoint", name,
                "this model was chosen with POST /sdapi/v1/options and a reload of the models file "
                f"removed it; choose a served one ({', '.join(self.registry.models)}) with POST "
                "/sdapi/v1/options or override_settings")
        return name

    def options(self) -> dict[str, Any]:
        return {**self.kept, "sd_model_checkpoint": self.checkpoint_name, "sd_checkpoint_hash": None,
                "sd_vae": self.sd_vae, "CLIP_stop_at_last_layers": self.clip_skip}

    def update(self, values: Mapping[str, Any]) -> None:
        """Apply a POSTed options dict: all of it, or (on any error) none of it."""
        checkpoint, sd_vae, clip_skip = self.chosen_checkpoint, self.sd_vae, self.clip_skip
        kept = dict(self.kept)
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
                                   "bytes of JSON")
        self.chosen_checkpoint, self.sd_vae, self.clip_skip, self.kept = checkpoint, sd_vae, clip_skip, kept
