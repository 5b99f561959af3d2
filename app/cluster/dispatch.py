"""The ingress's routing under Ray Serve: one fair queue for the whole cluster, and which
replica each job goes to. Plain Python (no Ray), driven by RemoteEngine.

Why not Serve's own routing: Serve hands a call to a replica that holds its model (model
multiplexing) until that replica holds `max_ongoing_requests` calls, so one hot model ran on
one replica while the others sat idle, and the calls that waited did so first in, first out,
not by key. Here a replica holds at most `slots` calls (RAY_REPLICA_SLOTS, default
2 x MAX_BATCH: the batch it runs and the next one), and every other job waits at the ingress
in a queue where keys take turns as on one box; whenever a replica has room, the next job in
fair order that it can serve goes to it (`place`).

Which replica a job goes to, for a job of model M:

1. a replica with room that holds M (loaded, loading, or in its model LRU), the least
   loaded first (one whose preload finished before one still loading);
2. no replica holds M (a cold model): M takes a replica in its turn, as a model switch on
   one box would: one with a free model place first, then one whose least recently used
   model is held elsewhere too, then one whose LRU model is idle; that replica is reserved
   for M (takes no other model's jobs) until what it runs for its LRU model has drained;
3. holders of M exist but are all full: the job waits for one, unless M is hot: its waiting
   jobs would take its holders longer than `replicate_after_s` (RAY_REPLICATE_AFTER_S) to
   drain, at the seconds per image measured for M. A hot model is loaded on another
   replica with room that has a free model place, or whose LRU model has no job waiting and
   was not used there within `stay_s` (RAY_MODEL_STAY_S). So models that differ stay apart:
   a model in use on a replica is never evicted there for another model's load, and two hot
   models do not take each other's replicas in turn.

The ingress mirrors each replica's model LRU (the replica evicts the least recently used of
MAX_MODELS_PER_DEVICE models when a job brings another), updating it as it sends jobs, and
takes the replica's own list (posted on the board) whenever nothing of the ingress is in
flight there. An upscaling job (model "") takes no model place and goes to the least loaded
replica with room.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.engine.jobs import Job, in_turns

# A replica's report on the board may be this old (it reports every 0.5 s, the ingress reads
# every 0.5 s): a model list older than the last job sent there does not replace the mirror.
REPORT_LAG_S = 1.5


def replica_slots(settings: Settings) -> int:
    """Calls one replica holds at once: RAY_REPLICA_SLOTS, else 2 x MAX_BATCH."""
    return settings.ray_replica_slots or 2 * settings.max_batch


@dataclass
class ReplicaView:
    """What the ingress knows of one generation replica."""

    name: str
    models: list[str] = field(default_factory=list)  # its model LRU, least recently used first
    preloaded: bool = True
    in_flight: int = 0  # calls sent and not ended
    per_model: Counter = field(default_factory=Counter)  # those calls by model
    last_used: dict[str, float] = field(default_factory=dict)  # model: when last sent here
    reserved_for: str | None = None  # draining for this model's load: no other model's jobs
    sent: int = 0  # jobs sent here in all
    last_sent: float = -1e18  # when the last one was sent


class Dispatcher:
    """The fair queue at the ingress and the placement rules (module docstring)."""

    def __init__(self, *, slots: int, max_models: int, max_batch: int, replicate_after_s: float,
                 stay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.max_models = max_models
        self.max_batch = max_batch
        self.replicate_after_s = replicate_after_s
        self.stay_s = stay_s
        self.clock = clock
        self._by_client: OrderedDict[str, deque[Job]] = OrderedDict()
        self._size = 0
        self.replicas: dict[str, ReplicaView] = {}
        self._sent: dict[Job, str] = {}  # jobs sent and not ended: the replica's name
        self._per_image: dict[str, float] = {}  # model: seconds per image, a running mean

    # ---- the queue -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    def add(self, job: Job) -> None:
        self._by_client.setdefault(job.client, deque()).append(job)
        self._size += 1

    def remove(self, job: Job) -> bool:
        """Take a waiting job out of the queue; False when it was sent (or is unknown)."""
        jobs = self._by_client.get(job.client)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self._size -= 1
        if not jobs:
            del self._by_client[job.client]
        return True

    def order(self) -> list[Job]:
        """The waiting jobs in the order keys take turns (each key's first job, then each
        one's second, ...), as things stand."""
        return in_turns(self._by_client.values())

    def replica_of(self, job: Job) -> str | None:
        return self._sent.get(job)

    def _waiting_for(self, model: str) -> int:
        return sum(1 for jobs in self._by_client.values() for job in jobs if job.params.model == model)

    # ---- what the replicas say (the board) -----------------------------------------------
    def update(self, replicas: Mapping[str, Mapping[str, Any]]) -> None:
        """The board's snapshot: replicas come and go; a replica's own model list replaces the
        mirror whenever nothing of this ingress is in flight there and its report is newer
        than the last job sent there."""
        now = self.clock()
        for name in [n for n in self.replicas if n not in replicas]:
            del self.replicas[name]  # gone: its calls end with errors and are forgotten then
        for name, state in replicas.items():
            if not state.get("alive", True):
                self.replicas.pop(name, None)
                continue
            held = list(state.get("held", state.get("loaded", [])))
            view = self.replicas.get(name)
            if view is None:
                view = self.replicas[name] = ReplicaView(name=name, models=held)
            elif view.in_flight == 0 and now - view.last_sent > REPORT_LAG_S:
                view.models = held
            view.preloaded = bool(state.get("preloaded", True))
        for view in self.replicas.values():
            view.in_flight = sum(1 for n in self._sent.values() if n == view.name)

    def measured(self, model: str, generation_s: float, batch_size: int) -> None:
        """A finished job's batch: the model's seconds per image (a running mean)."""
        if not model or batch_size < 1:
            return
        per_image = generation_s / batch_size
        old = self._per_image.get(model)
        self._per_image[model] = per_image if old is None else 0.7 * old + 0.3 * per_image

    # ---- placement -----------------------------------------------------------------------
    def place(self) -> list[tuple[Job, str]]:
        """Jobs to send now, each with its replica's name, in fair order; the caller sends
        them and calls `ended` when each call ends."""
        now = self.clock()
        self._release_reservations()
        sent: list[tuple[Job, str]] = []
        while self._size:
            for client, jobs in self._by_client.items():
                view = self._choose(jobs[0], now)
                if view is not None:
                    job = jobs.popleft()
                    self._size -= 1
                    if jobs:
                        self._by_client.move_to_end(client)  # served: to the back of the line
                    else:
                        del self._by_client[client]
                    self._send(job, view, now)
                    sent.append((job, view.name))
                    break
            else:
                break  # no head can go anywhere now
        return sent

    def ended(self, job: Job) -> None:
        """A sent job's call ended (answered, failed, cancelled, its replica gone)."""
        name = self._sent.pop(job, None)
        view = self.replicas.get(name) if name else None
        if view is not None:
            view.in_flight -= 1
            view.per_model[job.params.model] -= 1

    def moved(self, job: Job, name: str) -> None:
        """The call ran on another replica than the one chosen (Serve's router could not reach
        the chosen one): count it there."""
        if self._sent.get(job) in (None, name) or name not in self.replicas:
            return
        self.ended(job)
        self._send(job, self.replicas[name], self.clock())

    def _send(self, job: Job, view: ReplicaView, now: float) -> None:
        model = job.params.model
        self._sent[job] = view.name
        view.in_flight += 1
        view.sent += 1
        view.last_sent = now
        view.per_model[model] += 1
        if not model:
            return
        if view.reserved_for == model:
            view.reserved_for = None
        if model in view.models:
            view.models.remove(model)
        view.models.append(model)  # most recently used; the replica's LRU does the same
        while len(view.models) > self.max_models:
            view.last_used.pop(view.models.pop(0), None)
        view.last_used[model] = now

    def _release_reservations(self) -> None:
        waiting = {job.params.model for jobs in self._by_client.values() for job in jobs}
        for view in self.replicas.values():
            if view.reserved_for is not None and (view.reserved_for not in waiting
                                                  or view.reserved_for in view.models):
                view.reserved_for = None

    def _has_room(self, view: ReplicaView, model: str) -> bool:
        return view.in_flight < self.slots and view.reserved_for in (None, model)

    def _choose(self, job: Job, now: float) -> ReplicaView | None:
        model = job.params.model
        live = list(self.replicas.values())

        def load(view: ReplicaView) -> tuple:
            return (not view.preloaded, view.in_flight, view.sent)

        if not model:  # upscaling: no model place, any replica with room
            room = [v for v in live if v.in_flight < self.slots and v.reserved_for is None]
            return min(room, key=load, default=None)
        holders = [v for v in live if model in v.models]
        free = [v for v in holders if self._has_room(v, model)]
        if free:
            return min(free, key=load)
        cold = not holders
        if not cold and not self._hot(model, holders):
            return None  # a holder takes it when it has room
        ranked = sorted(((cost, v) for v in live if model not in v.models
                         if (cost := self._cost(v, model, cold, live, now)) is not None),
                        key=lambda cv: (cv[0], *load(cv[1])))
        for _, view in ranked:
            if self._has_room(view, model) and not self._victim_busy(view):
                return view
        if ranked and not any(v.reserved_for == model for v in live):
            cost, view = ranked[0]
            if view.reserved_for is None and cost > 0 and cold:
                view.reserved_for = model  # it drains its LRU model's calls, then takes this one
        return None

    def _hot(self, model: str, holders: list[ReplicaView]) -> bool:
        """The model's waiting jobs would take its holders longer than replicate_after_s."""
        waiting = self._waiting_for(model)
        per_image = self._per_image.get(model)
        if per_image is None:  # nothing measured yet: a backlog beyond a full round is hot
            return waiting > len(holders) * self.slots
        return waiting * per_image / len(holders) > self.replicate_after_s

    def _victim(self, view: ReplicaView) -> str | None:
        """The model the replica evicts to take another one, if its places are all taken."""
        return view.models[0] if len(view.models) >= self.max_models else None

    def _victim_busy(self, view: ReplicaView) -> bool:
        victim = self._victim(view)
        return victim is not None and view.per_model[victim] > 0

    def _cost(self, view: ReplicaView, model: str, cold: bool, live: Iterable[ReplicaView],
              now: float) -> int | None:
        """How much loading `model` on this replica takes from others (lower is better), or
        None where it may not: 0 a free model place; 2 its LRU model is idle (nothing waits
        for it, not used here within stay_s); for a cold model (held nowhere) also 1 its LRU
        model is held elsewhere too, 3 anything else, as a model switch on one box."""
        victim = self._victim(view)
        if victim is None:
            return 0
        idle = (self._waiting_for(victim) == 0
                and now - view.last_used.get(victim, -1e18) >= self.stay_s)
        if not cold:  # a hot model: only a free place or an idle model, so that two hot
            return 2 if idle else None  # models do not take each other's replicas in turn
        if any(victim in other.models for other in live if other is not view):
            return 1
        return 2 if idle else 3

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per replica: calls in flight, jobs sent in all, reservation (for /ready)."""
        return {v.name: {"in_flight": v.in_flight, "sent": v.sent, "reserved_for": v.reserved_for}
                for v in self.replicas.values()}
