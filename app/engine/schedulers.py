"""Fresh diffusers schedulers for resolved sampler choices.

app.samplers says what runs a choice (a diffusers class name and its options) without importing
diffusers; this module builds it, on the model's own scheduler config.
"""

from __future__ import annotations

import copy
import inspect
import json
import threading
from collections.abc import Mapping
from functools import cache
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from app.samplers import SamplerChoice, scheduler_plan

__all__ = ["make_scheduler"]


@cache
def _init_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}


def _scheduler_config(cls: type, base_config: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict of the base config's keys that `cls` takes.

    Keys of other classes are dropped so diffusers does not log a warning per job; the private
    "_" keys are metadata from_config understands.
    """
    params = _init_params(cls)
    return {k: v for k, v in dict(base_config).items() if k in params or k.startswith("_")}


def _config_key(config: Mapping[str, Any]) -> str:
    def plain(value: Any) -> Any:
        return value.tolist() if hasattr(value, "tolist") else repr(value)

    return json.dumps(config, sort_keys=True, default=plain)


# Some diffusers schedulers compute a full 1000-step schedule in __init__ (KDPM2 takes ~0.3 s
# on a CPU), so each (class, options, model config) is built once with from_config and every
# job gets a deep copy of that never-handed-out prototype: a fresh instance in the same state.
_PROTOTYPES: dict[tuple[str, str, str, str], Any] = {}
_PROTOTYPES_LOCK = threading.Lock()
_MAX_PROTOTYPES = 512


def make_scheduler(
    choice: SamplerChoice, base_config: Mapping[str, Any], seed: int | None = None
) -> SchedulerMixin:
    """A fresh scheduler for `choice`, configured from the model's scheduler config.

    `base_config` (e.g. ``pipe.scheduler.config``) is read, never changed; model settings
    (beta schedule, prediction type, ...) come from it, sampler settings from the table:
    the result is what ``Cls.from_config(config, **options)`` builds. `seed` seeds samplers
    whose scheduler holds its own noise (DPM++ SDE's Brownian tree, `noise_sampler_seed`).
    """
    cls_name, options, seed_option = scheduler_plan(choice)
    cls = getattr(diffusers, cls_name)
    config = _scheduler_config(cls, base_config)
    key = (cls_name, choice.sampler, choice.schedule, _config_key(config))
    with _PROTOTYPES_LOCK:
        prototype = _PROTOTYPES.get(key)
    if prototype is None:
        kwargs = dict(options)
        if seed_option is not None:
            kwargs[seed_option] = None  # set per job below
        prototype = cls.from_config(config, **kwargs)
        with _PROTOTYPES_LOCK:
            if len(_PROTOTYPES) >= _MAX_PROTOTYPES:
                _PROTOTYPES.clear()
            prototype = _PROTOTYPES.setdefault(key, prototype)
    scheduler = copy.deepcopy(prototype)
    if seed_option is not None:
        # what DPMSolverSDEScheduler.__init__ does with its noise_sampler_seed argument
        scheduler.register_to_config(**{seed_option: seed})
        setattr(scheduler, seed_option, seed)
    return scheduler
