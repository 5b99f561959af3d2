"""The engine: the job queue, one worker per device, model availability and shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from app.config import Settings
from app.engine.availability import LoadFailures
from app.engine.hub import HubAccess, missing_repos
from app.engine.jobs import GenParams, Job, JobQueue, new_job_id
from app.engine.readiness import WAITING, WORKER_NOT_READY, model_states, preload_split, readiness_body
from app.engine.reload import ReloadReport, fingerprint, reload_into
from app.engine.worker import Worker
from app.errors import CraftError, ErrorKind, InvalidParameter, Unavailable
from app.metrics import Metrics
from app.registry import ModelSpec, Registry

logger = logging.getLogger(__name__)


def parse_devices(spec: str) -> list[torch.device]:
    """'auto' → every CUDA GPU, else the CPU; otherwise a comma-separated list."""
    if spec.strip().lower() == "auto":
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [torch.device("cpu")]
    devices = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            device = torch.device(part)
        except RuntimeError:
            raise InvalidParameter(
                "CRAFTSERVE_DEVICES", part, "use 'auto', 'cpu' or 'cuda:N', comma-separated"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParameter("CRAFTSERVE_DEVICES", part, "no CUDA device is available")
        devices.append(device)
    return devices


class _LiveSpecs(Mapping[str, ModelSpec]):
    """The registry's current model specs: a reload swaps `registry.models`, and the workers
    see the new table through this view."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> ModelSpec:
        return self._registry.models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.models)

    def __len__(self) -> int:
        return len(self._registry.models)


class Engine:
    """Owns the queue and the workers; the HTTP side talks to it, never to a worker."""

    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.queue = JobQueue(
            max_queue=settings.max_queue,
            max_batch=settings.max_batch,
            batch_window_s=settings.batch_window_ms / 1000,
        )
        metrics.queue_depth.set_function(lambda: len(self.queue))
        self.failures = LoadFailures(settings.load_retry_s)
        self.hub = HubAccess(allow_downloads=settings.allow_downloads, recheck_s=settings.load_retry_s,
                             models=lambda: self.registry.models)
        self.fingerprints = {name: fingerprint(spec) for name, spec in registry.models.items()}
        self.last_reload: ReloadReport | None = None
        self._reload_lock = threading.Lock()
        self.preload = self._preload_list(registry)
        self.workers = [
            Worker(
                f"worker-{i}-{device}",
                device,
                queue=self.queue,
                settings=settings,
                specs=_LiveSpecs(registry),
                metrics=metrics,
                failures=self.failures,
                preload=self.preload,
                hub=self.hub,
                upscaler_specs=lambda: self.registry.upscalers,
                controlnet_specs=lambda: self.registry.controlnets,
            )
            for i, device in enumerate(parse_devices(settings.devices))
        ]
        self.accepting = False
        # Models unloaded on request (A1111's unload-checkpoint) and not loaded again since:
        # /ready does not wait for them even if they are preload models.
        self._unloaded: set[str] = set()

    def _preload_list(self, registry: Registry) -> list[str]:
        preload, left = preload_split(registry, self.settings.max_models_per_device)
        if left:
            logger.warning(
                "models %s are marked preload but each device holds at most %d models "
                "(CRAFTSERVE_MAX_MODELS_PER_DEVICE): they load on their first request instead",
                left, self.settings.max_models_per_device,
            )
        # Models whose weights are here load first: one that must be downloaded first (or
        # waits for weights) does not hold up the others.
        return sorted(preload, key=lambda name: bool(missing_repos(registry.models[name])))

    def describe(self) -> str:
        """Where jobs run, for the start-up log line."""
        return ", ".join(str(w.device) for w in self.workers)

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.accepting = True

    def begin_shutdown(self) -> None:
        """Stop accepting and answer every waiting job 503; running jobs go on."""
        if not self.accepting and self.queue.closed:
            return
        self.accepting = False
        left = self.queue.close()
        for job in left:
            job.fail(Unavailable("the server is shutting down; retry shortly", retry_after=30,
                                 kind=ErrorKind.SHUTDOWN))
        if left:
            logger.info("shutdown: answered %d waiting jobs 503", len(left))

    def abort_running(self) -> None:
        """Answer the running jobs 503 and have their workers stop at the next step."""
        for worker in self.workers:
            for job in list(worker.running):
                job.cancelled.set()
                job.fail(Unavailable(
                    "the server shut down before this job finished (grace period "
                    f"{self.settings.shutdown_grace_s:g} s, setting CRAFTSERVE_SHUTDOWN_GRACE_S)",
                    kind=ErrorKind.SHUTDOWN,
                ))

    def stop(self, grace_s: float | None = None) -> None:
        """Finish running jobs within the grace period; interrupt and answer the rest."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.begin_shutdown()
        deadline = time.monotonic() + grace
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self.abort_running()

    # ---- requests ------------------------------------------------------------------
    def submit(self, params: GenParams, client: str, deadline_s: float | None = None, *,
               job_id: str | None = None) -> Job:
        """Queue one job (on the running event loop). `deadline_s`: its queue deadline when
        not the setting's (a Ray replica passes what is left of the request's); `job_id`: its
        id when it has one already (a Ray replica's job keeps the one the ingress gave)."""
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry shortly", retry_after=30,
                              kind=ErrorKind.SHUTDOWN)
        self.failures.check(params.model)
        job = Job(
            params=params,
            client=client,
            loop=asyncio.get_running_loop(),
            deadline_s=self.settings.queue_deadline_s if deadline_s is None else deadline_s,
            id=job_id or new_job_id(),
        )
        self.queue.submit(job)
        return job

    def jobs_of(self, client: str) -> list[Job]:
        """The client's running jobs, then its waiting ones in the order they will run."""
        running = [job for w in self.workers for job in list(w.running) if job.client == client]
        return running + self.queue.waiting(client)

    def waiting(self, client: str) -> list[Job]:
        """The client's waiting jobs, in the order they will run."""
        return self.queue.waiting(client)

    def queue_position(self, job: Job) -> int | None:
        """The job's place in the order the fair queue serves every key's waiting jobs, 1 =
        the next a free worker takes (JobQueue.position says how exact); None once taken."""
        return self.queue.position(job)

    def cancel(self, job: Job, answer: CraftError | None = None) -> None:
        """Drop a waiting job, answering it with `answer` when one is given (a job whose own
        request is not the one cancelling it still has a client waiting), or flag a running
        one: its worker stops the batch at the next step once every job of it is flagged."""
        if self.queue.remove(job):
            if answer is not None:
                job.fail(answer)
        else:
            job.cancelled.set()

    # ---- reload --------------------------------------------------------------------
    def reload(self) -> ReloadReport:
        """Read models.yaml and its folders again and serve what they say now (SIGHUP,
        POST /admin/reload, A1111's refresh routes). Blocking: call it off the event loop.

        Added models and LoRAs are served at once; waiting jobs of removed models are answered
        503; removed and changed models (entry or files) are unloaded by their workers between
        batches, so running jobs finish, and a changed model loads afresh on its next use.
        An invalid file changes nothing and the report says why."""
        with self._reload_lock:
            report, prints = reload_into(self.registry, self.fingerprints)
            if prints is None:
                self.last_reload = report
                return report
            self.fingerprints = prints
            self.hub.forget()  # weights may have been copied in, or the network come back
            for name in report.changed + report.added:
                self.failures.clear(name)  # a fixed file is tried again at once
            gone = Unavailable("the model was removed from the models file by a reload",
                               retry_after=3600, kind=ErrorKind.MODEL_UNAVAILABLE)
            for name in report.removed:
                self.failures.clear(name)
                for job in self.queue.remove_model(name):
                    job.fail(gone)
            self.preload = self._preload_list(self.registry)
            for worker in self.workers:
                worker.preload = tuple(self.preload)  # models added with preload: true load now
                worker.mark_stale(report.removed + report.changed)
            self.queue.nudge()
            self._unloaded.clear()  # the preload models load again (recheck)
            self.last_reload = report
            logger.info("%s", report.summary())
            return report

    # ---- device memory (A1111's unload-checkpoint / reload-checkpoint) ------------------
    def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def unload_model(self, name: str, timeout_s: float = 300.0) -> bool:
        """Release the model's device memory: every worker unloads it between batches (a
        running batch finishes on it first). True once no worker holds it; False after
        `timeout_s` (it is unloaded when the running batch ends). Until it is loaded again,
        /ready does not wait for it. Blocking: call it off the event loop."""
        self._unloaded.add(name)
        for worker in self.workers:
            worker.mark_stale([name], recheck=False)
        self.queue.nudge()
        return self._wait(lambda: all(name not in w.models for w in self.workers), timeout_s)

    def load_model(self, name: str, timeout_s: float = 300.0) -> bool:
        """Load the model on every worker between batches, as preload does (a failed load of
        it earlier is tried again at once). True once every worker holds it; False after
        `timeout_s` (it goes on loading); Unavailable (503) naming the reason when loading
        failed. Blocking: call it off the event loop."""
        self._unloaded.discard(name)
        self.failures.clear(name)
        for worker in self.workers:
            worker.want_loaded([name])
        self.queue.nudge()

        def settled() -> bool:
            return all(name in w.models for w in self.workers) or bool(self.failures.reason(name))

        done = self._wait(settled, timeout_s)
        reason = self.failures.reason(name)
        if reason and not all(name in w.models for w in self.workers):
            raise Unavailable(reason, kind=ErrorKind.MODEL_UNAVAILABLE)
        return done

    # ---- readiness -----------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict]:
        def failure(name: str) -> str | None:
            reason = self.failures.reason(name)
            if reason and self.failures.waiting_for_weights(name):
                return f"{WAITING}: {reason}"
            return f"unavailable: {reason}" if reason else None

        loaded = {name for w in self.workers for name in w.models}
        unloaded = set(self._unloaded)
        preload = [name for name in self.preload if name not in unloaded]
        models = model_states(self.registry, preload, loaded, failure)
        workers = [
            {
                "name": w.name,
                "device": str(w.device),
                "alive": w.alive,
                "preloaded": w.preloaded.is_set(),
                "models": list(w.models),
            }
            for w in self.workers
        ]
        not_ready = [w["name"] for w in workers if not (w["alive"] and w["preloaded"])]
        self.metrics.workers_ready.set(len(workers) - len(not_ready))
        return readiness_body(
            models=models, preload=preload, accepting=self.accepting, workers=workers,
            queue_depth=len(self.queue), last_reload=self.last_reload,
            last=[f"{name}: {WORKER_NOT_READY}" for name in not_ready],
        )
