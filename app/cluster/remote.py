"""RemoteEngine: the Engine's methods, with every job run by a generation replica.

The app (routes, auth, dialects, the job API) calls the members of `EngineAPI`
(app.engine.protocol) as on a single box. A job here is the same `Job`
(future, step, preview, started_at), driven by one streaming call to the generation
deployment, whose events (app.cluster.wire) fill it in. What a single box does in its queue
is done here and in the replicas:

- fair queue and routing: a job waits at this ingress in one queue for the whole cluster,
  keys taking turns, until a replica has room for it (app.cluster.dispatch decides which:
  one holding its model, a hot model loaded on more replicas); a replica holds at most
  RAY_REPLICA_SLOTS calls (2 x MAX_BATCH), so a free replica gets the next job at once;
- bound: at most replicas x max(MAX_QUEUE, MAX_BATCH) + RAY_MAX_QUEUED calls are in the
  cluster (waiting here or sent); past that a job is answered 503 with Retry-After, in the
  dialect's shape like every other 503;
- deadline: a job not started by its deadline is answered 503 here, and the replica gets
  what is left of the deadline for its own queue;
- a replica that dies fails its own calls (Ray's actor errors): those jobs are answered 503
  naming the cause; other replicas' jobs go on, and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import weakref
from typing import Any

from app.cluster.board import REPORT_EVERY_S
from app.cluster.dispatch import Dispatcher, replica_slots
from app.cluster.wire import DONE, ERROR, PREVIEW, PROGRESS, STARTED, JobCall, error_from_wire
from app.config import Settings
from app.engine.jobs import GenParams, Job, JobResult
from app.engine.readiness import NO_REPLICA, model_states, preload_split, readiness_body
from app.engine.reload import ReloadReport, fingerprint, reload_into
from app.errors import CraftError, ErrorKind, InternalError, NotSupported, Unavailable
from app.metrics import Metrics
from app.registry import Registry

logger = logging.getLogger(__name__)


class RemoteEngine:
    """The ingress's engine under Ray Serve (see the module docstring)."""

    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics, *,
                 generator: Any, board: Any) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.generator = generator  # the generation deployment's handle
        self.board = board  # app.cluster.board's actor
        # The jobs sent and not yet started by a replica, in the order they came (a dict as
        # an ordered set): this ingress's view of the waiting jobs (see queue_position).
        self._waiting: dict[Job, None] = {}
        self.dispatcher = Dispatcher(
            slots=replica_slots(settings),
            max_models=settings.max_models_per_device, max_batch=settings.max_batch,
            replicate_after_s=settings.ray_replicate_after_s, stay_s=settings.ray_model_stay_s)
        self._placed: dict[Job, asyncio.Future] = {}  # resolved with the replica chosen
        metrics.queue_depth.set_function(lambda: len(self._waiting))
        self.replicas: dict[str, dict[str, Any]] = {}  # the board's latest snapshot
        self.fingerprints = {name: fingerprint(spec) for name, spec in registry.models.items()}
        self.last_reload: ReloadReport | None = None
        self._reload_lock = threading.Lock()
        self._applied_reload: int | None = None  # the board's reload number applied here
        self._running: dict[Job, asyncio.Task] = {}
        self._poller: asyncio.Task | None = None
        self.accepting = False

    @property
    def preload(self) -> list[str]:
        return preload_split(self.registry, self.settings.max_models_per_device)[0]

    def describe(self) -> str:
        return "Ray Serve generation replicas"

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        self.accepting = True
        self._poller = asyncio.get_running_loop().create_task(self._poll_board())

    async def _poll_board(self) -> None:
        while True:
            try:
                board = await self.board.snapshot.remote()
                self.replicas = board["replicas"]
                self.dispatcher.update(self.replicas)
                self._pump()
                if self._applied_reload is None:
                    self._applied_reload = board["reload_epoch"]
                elif board["reload_epoch"] > self._applied_reload:  # a reload asked elsewhere
                    await asyncio.to_thread(self._follow_reload, board["reload_epoch"])
            except Exception:  # noqa: BLE001 - a board being restarted: ask again
                logger.warning("reading the replica board failed", exc_info=True)
            await asyncio.sleep(REPORT_EVERY_S)

    def begin_shutdown(self) -> None:
        self.accepting = False
        for job in list(self._waiting):
            self.cancel(job, Unavailable("the server is shutting down; retry shortly",
                                         retry_after=30, kind=ErrorKind.SHUTDOWN))

    def abort_running(self) -> None:
        for job in list(self._running):
            self.cancel(job, Unavailable("the server shut down before this job finished",
                                         kind=ErrorKind.SHUTDOWN))

    def stop(self, grace_s: float | None = None) -> None:
        """Serve drains the ingress before its shutdown: what is left here is answered 503."""
        self.begin_shutdown()
        self.abort_running()
        if self._poller is not None:
            self._poller.cancel()

    # ---- requests ------------------------------------------------------------------
    def submit(self, params: GenParams, client: str, deadline_s: float | None = None) -> Job:
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry shortly", retry_after=30,
                              kind=ErrorKind.SHUTDOWN)
        capacity = (len(self.dispatcher.replicas) * max(self.settings.max_queue, self.settings.max_batch)
                    + self.settings.ray_max_queued)
        if len(self.dispatcher) + self.dispatcher.in_flight >= capacity:
            raise Unavailable(
                f"every generation replica is full and {len(self.dispatcher)} jobs already wait "
                f"for one (the cluster takes {capacity}: replicas x CRAFTSERVE_MAX_QUEUE + "
                "CRAFTSERVE_RAY_MAX_QUEUED); retry later", retry_after=10, kind=ErrorKind.QUEUE_FULL)
        loop = asyncio.get_running_loop()
        deadline = self.settings.queue_deadline_s if deadline_s is None else deadline_s
        job = Job(params=params, client=client, loop=loop, deadline_s=deadline)
        self._waiting[job] = None
        self._placed[job] = loop.create_future()
        self.dispatcher.add(job)
        # A fresh context: each call gets its own Serve request id. Calls made within the HTTP
        # request's context share its id, and Serve's router matches the replica it chose to a
        # waiting call by that id, so of two images of one request one was never sent.
        self._running[job] = loop.create_task(self._drive(job), context=contextvars.Context())
        loop.call_later(deadline, self._expire, weakref.ref(job))  # an answered job is freed
        self._pump()
        return job

    def _pump(self) -> None:
        """Send what the replicas have room for now (the dispatcher's choice)."""
        for job, replica in self.dispatcher.place():
            placed = self._placed.get(job)
            if placed is not None and not placed.done():
                placed.set_result(replica)

    def _expire(self, ref: weakref.ref) -> None:
        """A job no replica started by its deadline (it waited at this ingress for a free
        replica) is answered 503 and taken back."""
        job = ref()
        if job is not None and job.started_at is None and not job.future.done():
            self.cancel(job, Unavailable(
                f"the job waited {time.monotonic() - job.enqueued_at:.0f} s for a generation "
                f"replica, longer than its deadline of {job.deadline_s:g} s (setting "
                "CRAFTSERVE_QUEUE_DEADLINE_S); the cluster is overloaded",
                retry_after=30, kind=ErrorKind.DEADLINE))

    async def _drive(self, job: Job) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        stream = None
        try:
            replica = await self._placed[job]  # it waits here until a replica has room
            stream = self.generator.options(
                stream=True, multiplexed_model_id=job.params.model,
            ).run.remote(JobCall.of(job, replica))
            async for kind, payload in stream:
                if kind == STARTED:
                    self._waiting.pop(job, None)
                    job.started_at = time.monotonic()
                    if payload != replica:  # Serve's router could not reach the chosen one
                        self.dispatcher.moved(job, payload)
                elif kind == PROGRESS:
                    job.step = payload
                elif kind == PREVIEW:
                    job.preview = payload
                elif kind == DONE:
                    if job.started_at is None:  # it ran within one look of the replica's
                        job.started_at = time.monotonic() - payload.generation_s
                    self._count(job.params, payload)
                    self.dispatcher.measured(job.params.model, payload.generation_s,
                                             payload.batch_size)
                    job.resolve(payload)
                elif kind == ERROR:
                    job.fail(error_from_wire(payload))
            if not job.future.done():
                raise RuntimeError("the replica's stream ended without an answer")
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()  # the replica takes the job back from its engine
            raise
        except BackPressureError:
            job.fail(Unavailable(
                "every generation replica is full and "
                f"{self.settings.ray_max_queued} requests already wait for one (setting "
                "CRAFTSERVE_RAY_MAX_QUEUED); retry later", retry_after=10, kind=ErrorKind.QUEUE_FULL))
        except (RayActorError, ActorUnavailableError) as exc:
            logger.warning("job %s: its replica is gone: %s", job.id, type(exc).__name__)
            job.fail(Unavailable(
                "the generation replica running this job stopped (its process died or was "
                "removed); Ray Serve starts a replacement: retry", retry_after=5,
                kind=ErrorKind.REPLICA_LOST))
        except Exception:
            logger.exception("job %s: the call to the generation deployment failed", job.id)
            job.fail(InternalError(f"internal error (job {job.id}); the server log has the details"))
        finally:
            self._waiting.pop(job, None)
            self._running.pop(job, None)
            self._placed.pop(job, None)
            if not self.dispatcher.remove(job):  # it was sent: its replica has room again
                self.dispatcher.ended(job)
            self._pump()

    def _count(self, params: GenParams, result: JobResult) -> None:
        self.metrics.images.labels(params.model, result.sampler_label).inc()
        self.metrics.queue_wait.observe(result.queue_wait_s)

    def jobs_of(self, client: str) -> list[Job]:
        running = [job for job in self._running if job.client == client
                   and job.started_at is not None and not job.future.done()]
        return running + self.waiting(client)

    def waiting(self, client: str) -> list[Job]:
        """The client's jobs no replica has started yet, in the order they came."""
        return [job for job in self._waiting if job.client == client]

    def queue_position(self, job: Job) -> int | None:
        """The job's place among every key's jobs that no replica has started yet: those
        sent to a replica and waiting in its queue first (in the order they came), then those
        waiting here in the fair queue's order; None once started. Each replica serves its own
        queue fairly and several run at once, so the place is an estimate."""
        if job not in self._waiting:
            return None
        sent = [j for j in self._waiting if self.dispatcher.replica_of(j) is not None]
        for place, waiting in enumerate(sent + self.dispatcher.order(), start=1):
            if waiting is job:
                return place
        return None

    def cancel(self, job: Job, answer: CraftError | None = None) -> None:
        """Take the job back: its call is cancelled, and the replica takes it out of its
        queue, or stops it at the next step. A job is answered at once here (`answer`, else a
        503 nobody reads: its request is the one that left)."""
        job.cancelled.set()
        task = self._running.get(job)
        if task is not None:
            task.cancel()
        self._waiting.pop(job, None)
        job.fail(answer or Unavailable("the job was cancelled", kind=ErrorKind.CANCELLED))

    # ---- reload --------------------------------------------------------------------
    def reload(self) -> ReloadReport:
        """Read models.yaml again here (what the routes check requests against) and have every
        replica do the same within a second (through the board). Blocking: off the loop."""
        import ray

        with self._reload_lock:
            report = self._reload_here()
            if report.error is None:
                epoch = ray.get(self.board.request_reload.remote())
                self._applied_reload = max(self._applied_reload or 0, epoch)
            return report

    def _follow_reload(self, epoch: int) -> None:
        """A reload asked of the board by someone else (SIGHUP to `craftserve serve --ray`)."""
        with self._reload_lock:
            if epoch > (self._applied_reload or 0):
                self._applied_reload = epoch
                self._reload_here()

    def _reload_here(self) -> ReloadReport:
        report, prints = reload_into(self.registry, self.fingerprints)
        self.last_reload = report
        if prints is not None:
            self.fingerprints = prints
            logger.info("%s (every generation replica follows)", report.summary())
        return report

    # ---- device memory -------------------------------------------------------------
    _PER_REPLICA = ("under Ray Serve each generation replica loads and unloads its own models "
                    "(Serve's model multiplexing, at most CRAFTSERVE_MAX_MODELS_PER_DEVICE each), so "
                    "this server cannot {}; requests load the model where they run")

    def unload_model(self, name: str, timeout_s: float = 300.0) -> bool:
        raise NotSupported(self._PER_REPLICA.format(f"unload model '{name}' on request"))

    def load_model(self, name: str, timeout_s: float = 300.0) -> bool:
        raise NotSupported(self._PER_REPLICA.format(f"load model '{name}' on request"))

    # ---- readiness -----------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict]:
        """Ready when at least one replica is up and every preload model is loaded on at least
        one replica. `workers` lists the replicas, each with its own model states, so a
        replica that failed to load a model shows which one and why."""
        replicas = list(self.replicas.values())
        preload = self.preload

        def failure(name: str) -> str | None:
            failed = [f"{r['name']}: {state}" for r in replicas
                      if (state := r["models"].get(name, "")).startswith("unavailable")]
            return "; ".join(failed) or None

        loaded = {name for r in replicas for name, state in r["models"].items() if state == "loaded"}
        models = model_states(self.registry, preload, loaded, failure)
        routed = self.dispatcher.snapshot()
        workers = [
            {"name": r["name"], "device": r["device"], "alive": r["alive"],
             "preloaded": r["preloaded"], "models": r["loaded"], "pid": r["pid"],
             "model_states": r["models"], "queue_depth": r["queue_depth"], "running": r["running"],
             "in_flight": routed.get(r["name"], {}).get("in_flight", 0),
             "sent": routed.get(r["name"], {}).get("sent", 0)}
            for r in replicas
        ]
        self.metrics.workers_ready.set(sum(1 for r in replicas if r["alive"] and r["preloaded"]))
        no_replica = [] if replicas else [NO_REPLICA]
        ready, body = readiness_body(
            models=models, preload=preload, accepting=self.accepting, workers=workers,
            queue_depth=len(self._waiting) + sum(r["queue_depth"] for r in replicas),
            last_reload=self.last_reload, first=no_replica,
        )
        body["ingress_waiting"] = len(self.dispatcher)  # jobs no replica has room for yet
        return ready, body
