"""The device worker: the one owner of a device and of the pipelines loaded on it.

A worker thread takes batches from the JobQueue, loads models on demand (an LRU of at
most `max_models_per_device`), makes a fresh scheduler for every batch from the model's
pristine config, activates exactly the batch's LoRAs and resets them afterwards, and
answers every job of the batch, whatever happens. It never dies with a job: deliberate
errors go to their jobs, anything else is logged with its traceback and answered 500.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from app.engine.determinism import jobs_in_call
from app.engine.jobs import Job, JobResult, WorkerSlot
from app.engine.pipelines import LoadedModel, load_model
from app.errors import CraftError, Unavailable
from app.samplers import make_scheduler

if TYPE_CHECKING:
    from app.engine.engine import Engine

logger = logging.getLogger(__name__)

OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class InternalError(CraftError):
    """A bug: the details are in the log under the job id, never in the answer."""

    status = 500
    kind = "internal"


class _Interrupted(Exception):
    """Raised from the step callback when every client of a running batch is gone."""


class Worker:
    def __init__(self, name: str, device: torch.device, engine: Engine) -> None:
        self.name = name
        self.device = device
        self.engine = engine
        self.slot = WorkerSlot(name)
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.preloaded = threading.Event()
        self.running: list[Job] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            self._preload()
        finally:
            self.preloaded.set()
        queue = self.engine.queue
        while True:
            batch = queue.take(self.slot)
            if not batch:
                return
            self.running = batch
            try:
                self._run_batch(batch)
            except BaseException:  # pragma: no cover - _run_batch answers everything itself
                logger.exception("%s: unexpected error outside a batch", self.name)
                self._finish(batch)
            finally:
                self.running = []
                self.slot.idle = True

    def _preload(self) -> None:
        for name in self.engine.preload:
            try:
                self._model(name)
            except CraftError as exc:
                logger.warning("%s: preload of %s failed: %s", self.name, name, exc.message)

    # ---- models --------------------------------------------------------------------
    def _model(self, name: str) -> LoadedModel:
        loaded = self.models.get(name)
        if loaded is not None:
            self.models.move_to_end(name)
            return loaded
        self.engine.raise_if_recently_failed(name)
        while len(self.models) >= self.engine.settings.max_models_per_device:
            self._evict(next(iter(self.models)))
        spec = self.engine.registry.models[name]
        try:
            loaded = load_model(
                spec,
                self.device,
                allow_downloads=self.engine.settings.allow_downloads,
                lora_cache_size=self.engine.settings.lora_cache_size,
                compile=self.engine.settings.compile,
                exact_batches=self.engine.settings.cpu_exact_batches,
            )
        except Unavailable as exc:
            self.engine.record_load_failure(name, exc)
            raise
        except Exception as exc:
            logger.exception("%s: loading %s failed", self.name, name)
            error = Unavailable(
                f"model '{name}' cannot be served now: loading it failed "
                f"({type(exc).__name__}); the server log has the details",
                kind="model_unavailable",
            )
            self.engine.record_load_failure(name, error)
            raise error from exc
        self.engine.clear_load_failure(name)
        self.engine.metrics.model_load.labels(name).observe(loaded.load_seconds)
        self.models[name] = loaded
        self.slot.models.add(name)
        return loaded

    def _evict(self, name: str) -> None:
        self.models.pop(name, None)
        self.slot.models.discard(name)
        self._free_memory()
        logger.info("%s: evicted model %s", self.name, name)

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- batches -------------------------------------------------------------------
    def _run_batch(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            job.started_at = now
            self.engine.metrics.queue_wait.observe(now - job.enqueued_at)
        live = [job for job in batch if not job.cancelled.is_set()]
        for job in batch:
            if job.cancelled.is_set():
                self._fail([job], Unavailable("the client went away before its job started",
                                              kind="cancelled"))
        if not live:
            return
        params = live[0].params
        started = time.perf_counter()
        try:
            model = self._model(params.model)
            images = self._generate_with_recovery(model, live)
        except _Interrupted:
            self._fail(live, Unavailable("every client of this job went away; it was stopped",
                                         kind="interrupted"))
            return
        except CraftError as exc:
            self._fail(live, exc)
            return
        except Exception:
            logger.exception("%s: batch %s failed", self.name, [j.id for j in live])
            self._fail(live, InternalError(
                f"internal error while generating (job {live[0].id}); the server log has "
                "the details and the server goes on serving"
            ))
            return
        seconds = time.perf_counter() - started
        self._report(model, live, images, seconds)

    def _finish(self, jobs: list[Job], seconds: float | None = None) -> None:
        """Tell the queue these jobs are done, before answering them: a lone client's next
        request must not find its previous job still counted as in flight."""
        self.engine.queue.finished(len(jobs), seconds)

    def _fail(self, jobs: list[Job], error: CraftError) -> None:
        self._finish(jobs)
        if error.kind in ("interrupted", "cancelled"):  # no answer reaches the edge: count here
            self.engine.metrics.errors.labels(error.kind).inc(len(jobs))
        for job in jobs:
            job.fail(error)

    def _report(self, model: LoadedModel, jobs: list[Job], images: list, seconds: float) -> None:
        self._finish(jobs, seconds)
        metrics = self.engine.metrics
        params = jobs[0].params
        metrics.generation.labels(params.model).observe(seconds)
        metrics.batch_size.observe(len(jobs))
        metrics.images.labels(params.model, params.sampler.label).inc(len(jobs))
        if self.device.type == "cuda":
            metrics.device_memory.labels(str(self.device)).set(
                torch.cuda.memory_allocated(self.device)
            )
        for job, image in zip(jobs, images, strict=True):
            wait = (job.started_at or job.enqueued_at) - job.enqueued_at
            logger.info(
                "job %s client=%s model=%s sampler=%r steps=%d size=%dx%d seed=%d batch=%d "
                "wait=%.3fs gen=%.3fs",
                job.id, job.client, params.model, params.sampler.label, params.steps,
                params.width, params.height, job.params.seed, len(jobs), wait, seconds,
            )
            job.resolve(JobResult(
                image=image,
                seed=job.params.seed,
                sampler_label=params.sampler.label,
                queue_wait_s=wait,
                generation_s=seconds,
                batch_size=len(jobs),
                worker=self.name,
            ))

    def _generate_with_recovery(self, model: LoadedModel, jobs: list[Job]) -> list:
        try:
            return self._generate(model, jobs)
        except OutOfMemory:
            logger.warning("%s: out of memory on a batch of %d; retrying one by one with "
                           "VAE tiling", self.name, len(jobs))
        self._free_memory()
        model.pipe.vae.enable_tiling()
        try:
            return [image for job in jobs for image in self._generate(model, [job])]
        except OutOfMemory:
            self._free_memory()
            raise Unavailable(
                f"out of memory on {self.device} even one image at a time with VAE tiling; "
                "try a smaller size or retry when the server is less busy",
                retry_after=30,
                kind="out_of_memory",
            ) from None
        finally:
            model.pipe.vae.disable_tiling()

    def _generate(self, model: LoadedModel, jobs: list[Job]) -> list:
        params = jobs[0].params
        loras = self.engine.lora_paths(params.loras)
        pipe = model.pipe
        try:
            model.loras.apply(loras)
            pipe.scheduler = make_scheduler(params.sampler, model.scheduler_config, params.seed)
            width, height = params.gen_size
            with jobs_in_call(pipe, len(jobs)):
                output = self._call(pipe, jobs, width, height)
        finally:
            model.loras.reset()
        # Jobs whose sizes round up to the same multiple of 8 share a batch: each is cropped
        # to its own size.
        return [_crop(image, job.params.width, job.params.height)
                for job, image in zip(jobs, output.images, strict=True)]

    @staticmethod
    def _call(pipe, jobs: list[Job], width: int, height: int):  # noqa: ANN001, ANN205
        params = jobs[0].params
        return pipe(
            prompt=[job.params.prompt for job in jobs],
            # No negative prompt at all (not [""]) lets the pipeline do what the model's
            # config asks for an empty one (SDXL base: zeros, skipping two encoder calls).
            negative_prompt=[j.params.negative_prompt for j in jobs] if params.negative_prompt
            else None,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg_scale,
            width=width,
            height=height,
            generator=[torch.Generator("cpu").manual_seed(j.params.seed) for j in jobs],
            callback_on_step_end=_stop_when_abandoned(jobs),
        )


def _stop_when_abandoned(jobs: list[Job]):
    def callback(pipe, step, timestep, callback_kwargs):  # noqa: ANN001 - diffusers' signature
        if all(job.cancelled.is_set() for job in jobs):
            raise _Interrupted()
        return callback_kwargs

    return callback


def _crop(image, width: int, height: int):  # noqa: ANN001 - PIL image
    """Centre-crop the generated (multiple-of-8) image to exactly the requested size."""
    if image.size == (width, height):
        return image
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
