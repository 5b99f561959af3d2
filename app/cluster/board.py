"""The board: one small named actor where generation replicas post their state.

Ray Serve routes a call to some replica, never to each one, so what the ingress must know of
every replica (which models it holds, whether its preload finished or failed, its process) is
posted here by each replica twice a second, and a reload request (POST /admin/reload on the
ingress, SIGHUP to `craftserve serve --ray`) reaches the ingress and every replica as a number
each compares with the last one it applied. A replica not heard from for
`STALE_S` is taken as gone (killed, or scaled down); Serve starts its replacement.

It schedules nothing and routes nothing: routing, scaling and restarts are Ray Serve's.
"""

from __future__ import annotations

import time
from typing import Any

import ray

NAMESPACE = "craftserve"
REPORT_EVERY_S = 0.5
STALE_S = 3.0


class Board:
    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        self._reload_epoch = 0

    def report(self, name: str, state: dict[str, Any]) -> int:
        """A replica's state now; answers the reload number it should have applied."""
        self._replicas[name] = {**state, "seen": time.time()}
        return self._reload_epoch

    def leave(self, name: str) -> None:
        self._replicas.pop(name, None)

    def snapshot(self) -> dict[str, Any]:
        """The reload number, and the replicas heard from within STALE_S by name."""
        now = time.time()
        for name in [n for n, s in self._replicas.items() if now - s["seen"] > 10 * STALE_S]:
            del self._replicas[name]  # long gone: forget it
        return {"reload_epoch": self._reload_epoch,
                "replicas": {n: s for n, s in self._replicas.items() if now - s["seen"] <= STALE_S}}

    def request_reload(self) -> int:
        self._reload_epoch += 1
        return self._reload_epoch


def board_name(app_name: str) -> str:
    return f"{app_name}-board"


def get_board(app_name: str) -> ray.actor.ActorHandle:
    """The application's board, created by whoever asks first. Detached, so it outlives any
    replica that created it; `craftserve serve --ray` kills it when it takes the app down."""
    return ray.remote(num_cpus=0)(Board).options(
        name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
    ).remote()
