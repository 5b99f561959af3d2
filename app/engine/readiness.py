"""What both engines say about readiness: the preload list, each model's state, /ready's body.

The Engine (this machine's workers) and RemoteEngine (the Ray ingress, over its replicas)
differ only in where they learn which models are loaded or failed and what their `workers`
list holds; the rules and the JSON are written once, here.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from app.engine.reload import ReloadReport
from app.registry import Registry


def preload_split(registry: Registry, per_device: int) -> tuple[list[str], list[str]]:
    """The models marked preload that each device loads at start (the first `per_device`, in
    the models file's order), and those left to load on their first request."""
    wanted = [name for name, spec in registry.models.items() if spec.preload]
    return wanted[:per_device], wanted[per_device:]


def model_states(registry: Registry, preload: Container[str], loaded: Container[str],
                 failure: Callable[[str], str | None]) -> dict[str, str]:
    """Each model's state: loaded, else its failure (`failure(name)`, None when none), else
    loading (a preload model) or "loads on first request"."""
    states: dict[str, str] = {}
    for name in registry.models:
        failed = None if name in loaded else failure(name)
        if name in loaded:
            states[name] = "loaded"
        elif failed:
            states[name] = failed
        elif name in preload:
            states[name] = "loading"
        else:
            states[name] = "loads on first request"
    return states


def readiness_body(*, models: dict[str, str], preload: Iterable[str], accepting: bool,
                   workers: list[dict], queue_depth: int, last_reload: ReloadReport | None,
                   first: Iterable[str] = (), last: Iterable[str] = ()) -> tuple[bool, dict]:
    """(ready, /ready's body). Ready when there is no reason not to be: the reasons are
    `first`, each preload model not loaded, shutting down, then `last`."""
    reasons = [*first, *(f"{n}: {models[n]}" for n in preload if models[n] != "loaded")]
    if not accepting:
        reasons.append("the server is shutting down")
    reasons += last
    ready = not reasons
    body = {"ready": ready, "reasons": reasons, "models": models, "workers": workers,
            "queue_depth": queue_depth}
    if last_reload is not None:
        body["last_reload"] = last_reload.as_dict()
    return ready, body
