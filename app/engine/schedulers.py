"""Fresh diffusers schedulers for resolved sampler choices.

app.samplers says what runs a choice (a diffusers class name and its options) without importing
diffusers; this module builds it, on the model's own scheduler config.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from functools import cache, lru_cache
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


class _Config:
    """A scheduler config as a cache key: equal when the configs are (compared as JSON)."""

    __slots__ = ("config", "_key")

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._key = _config_key(config)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Config) and other._key == self._key


# Some diffusers schedulers compute a full 1000-step schedule in __init__ (KDPM2 takes ~0.3 s
# on a CPU), so each (choice, model config) is built once with from_config and every job gets a
# deep copy of that never-handed-out prototype: a fresh instance in the same state.
@lru_cache(maxsize=512)
def _prototype(choice: SamplerChoice, config: _Config) -> SchedulerMixin:
    cls_name, options, _ = scheduler_plan(choice)
    return getattr(diffusers, cls_name).from_config(config.config, **options)


def make_scheduler(
    choice: SamplerChoice, base_config: Mapping[str, Any], seed: int | None = None
) -> SchedulerMixin:
    """A fresh scheduler for `choice`, configured from the model's scheduler config.

    `base_config` (e.g. ``pipe.scheduler.config``) is read, never changed; model settings
    (beta schedule, prediction type, ...) come from it, sampler settings from the table:
    the result is what ``Cls.from_config(config, **options)`` builds. `seed` seeds samplers
    whose scheduler holds its own noise (DPM++ SDE's Brownian tree): those are built with
    the seed as their constructor argument, every time (see scripts/bench_samplers.py: tens of
    ms, small beside the Brownian-tree sampling itself); the others are copied from a cached
    prototype.
    """
    cls_name, options, seed_option = scheduler_plan(choice)
    cls = getattr(diffusers, cls_name)
    config = _scheduler_config(cls, base_config)
    if seed_option is not None:
        return cls.from_config(config, **options, **{seed_option: seed})
    return copy.deepcopy(_prototype(choice, _Config(config)))
