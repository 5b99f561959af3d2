"""What both engines say about readiness: the preload list, each model's state, /ready's body.

The Engine (this machine's workers) and RemoteEngine (the Ray ingress, over its replicas)
differ only in where they learn which models are loaded or failed and what their `workers`
list holds; the rules and the JSON are written once, here.

/ready answers everyone (load balancers send no key), but a failed model's state and a failed
reload carry exception text: file paths, lines of the models file. `public_readiness` is what
a request without a key sees: ready or not, each model's state word, reasons in fixed words.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from app.engine.reload import ReloadReport
from app.registry import Registry

SHUTTING_DOWN = "the server is shutting down"
NO_REPLICA = "no generation replica is up yet (Ray Serve is starting or replacing them)"
WORKER_NOT_READY = "not ready"  # a worker's reason: "<worker>: not ready"
# The states a model can be in, as /ready shows them to a request without a key; a model in
# any other state (its failure, with the exception's text) shows as "unavailable", one whose
# weights are not here while the Hub cannot be reached as "waiting for weights".
STATE_WORDS = ("loaded", "loading", "loads on first request")
UNAVAILABLE = "unavailable"
WAITING = "waiting for weights"
# /ready's `status`: serving (every preload model loaded), serving while some models wait for
# their weights (the others serve: a machine without network or a model hub), loading, or
# cannot serve (no model can).
SERVING, SERVING_WAITING, LOADING, CANNOT_SERVE = (
    "serving", "serving, some models wait for weights", "loading", "cannot serve")


def preload_split(registry: Registry, per_device: int) -> tuple[list[str], list[str]]:
    """The models marked preload that each device loads at start (the first `per_device`, in
    the models file's order), and those left to load on their first request."""
    wanted = [name for name, spec in registry.models.items() if spec.preload]
    return wanted[:per_device], wanted[per_device:]


def model_states(registry: Registry, preload: Container[str], loaded: Container[str],
                 failure: Callable[[str], str | None]) -> dict[str, str]:
    """Each model's state: loaded, else its failure (`failure(name)`, None when none; a
    failure starting with WAITING is a model waiting for weights), else loading (a preload
    model) or "loads on first request"."""
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
    `first`, each preload model not loaded, shutting down, then `last`. A preload model that
    waits for its weights is no reason while some model is loaded: the server serves, and
    `status` and `waiting_for_weights` say which models wait."""
    preload = list(preload)
    waiting = [n for n, state in models.items() if str(state).startswith(WAITING)]
    serving = any(state == "loaded" for state in models.values())
    reasons = [*first, *(f"{n}: {models[n]}" for n in preload
                         if models[n] != "loaded" and not (serving and n in waiting))]
    if not accepting:
        reasons.append(SHUTTING_DOWN)
    reasons += last
    ready = not reasons
    if ready:
        status = SERVING_WAITING if waiting else SERVING
    elif accepting and any(models.get(n) == "loading" for n in preload):
        status = LOADING
    else:
        status = CANNOT_SERVE
    body = {"ready": ready, "status": status, "reasons": reasons, "models": models,
            "waiting_for_weights": waiting, "workers": workers, "queue_depth": queue_depth,
            "last_reload": last_reload.as_dict() if last_reload is not None else None}
    return ready, body


def state_word(state: str) -> str:
    """A model's state without its details: one of STATE_WORDS, "waiting for weights", else
    "unavailable"."""
    if state.startswith(WAITING):
        return WAITING
    return state if state in STATE_WORDS else UNAVAILABLE


def public_readiness(body: dict) -> dict:
    """/ready's body for a request without a key: `ready`, each model's state word, and the
    reasons in fixed words (a preload model's state word; shutting down; no replica yet; a
    worker not ready). No worker, device, path, models-file or exception text."""
    models = {name: state_word(str(state)) for name, state in body.get("models", {}).items()}
    reasons: list[str] = []
    for reason in body.get("reasons", []):
        name = max((n for n in models if reason.startswith(f"{n}: ")), key=len, default=None)
        if name is not None:
            public = f"{name}: {models[name]}"
        elif reason in (SHUTTING_DOWN, NO_REPLICA):
            public = reason
        elif reason.endswith(f": {WORKER_NOT_READY}"):
            public = f"a worker is {WORKER_NOT_READY}"
        else:
            public = "not ready"  # a reason this list does not know: none of its words
        if public not in reasons:
            reasons.append(public)
    return {"ready": bool(body.get("ready")), "status": body.get("status"), "reasons": reasons,
            "models": models, "waiting_for_weights": list(body.get("waiting_for_weights", []))}
