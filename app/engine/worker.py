"""The device worker: the one owner of a device and of the pipelines loaded on it.

A worker thread takes batches from the JobQueue, has models loaded on demand (an LRU of at
most `max_models_per_device`), makes a fresh scheduler for every batch from the model's
pristine config, activates exactly the batch's LoRAs and resets them afterwards, and
answers every job of the batch, whatever happens. It never dies with a job: deliberate
errors go to their jobs, anything else is logged with its traceback and answered 500.

Models load on the worker's loader thread, never on the worker thread: a batch for a model
that is not loaded goes back to the queue (no worker takes that model's jobs while it loads,
and the wait does not count against their deadlines), and the worker goes on with the jobs of
the models it holds. So loading a model, downloading it, or failing to (the Hub not answering)
never delays the jobs of loaded models. A loaded model is installed on the worker thread
between batches (evicting the least recently used first); a failed load is recorded, and the
model's waiting jobs, like later requests for it until LOAD_RETRY_S passes, are answered 503
at once.

A job never fails the jobs batched with it, whoever sent them: prompts are checked one job at
a time before anything is encoded (the model's tokenizer, CRAFTSERVE_MAX_PROMPT_CHUNKS), and a
batch that fails for a reason that is not the whole batch's (a bug, one job's input) is run
again in halves down to the job at fault (`_run_jobs`); only that job gets the error. A model
that cannot be loaded, and memory that runs out after the retries, concern every job alike.

It meets the rest of the server only through what it is given: the queue it takes from,
the settings, the model specs, the metrics and the load-failure record.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue as queue_module
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from app.config import Settings
from app.engine.availability import LoadFailures
from app.engine.controlnet import ControlNets, controlnet_pipeline
from app.engine.determinism import jobs_in_call
from app.engine.hub import HubAccess, WaitingForWeights
from app.engine.image_ops import finish
from app.engine.img2img import (
    blank_masked_latents,
    blank_sources,
    encode_latents,
    inpainting_unet,
    pipeline_for,
)
from app.engine.jobs import (
    GenParams,
    Job,
    JobQueue,
    JobResult,
    UpscaleParams,
    WorkerSlot,
    denoising_steps,
    round_up8,
)
from app.engine.optimize import eager
from app.engine.pipelines import LoadedModel, load_model
from app.engine.previews import approx_cheap
from app.engine.prompts import PromptEncoder
from app.engine.refiner import Handover
from app.engine.refiner import plan as handover_plan
from app.engine.schedulers import make_scheduler
from app.engine.sharing import share, shares_with
from app.engine.upscalers import Upscalers, upscale_latents
from app.errors import (
    CraftError,
    ErrorKind,
    InternalError,
    InvalidParameter,
    LoraError,
    TooManyPromptChunks,
    Unavailable,
)
from app.families import REFINER_ONLY_RULE
from app.metrics import Metrics
from app.registry import ModelSpec

logger = logging.getLogger(__name__)

OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _Interrupted(Exception):
    """Raised from the step callback when every client of a running batch is gone."""


def _concerns_the_batch(exc: CraftError) -> bool:
    """An error every job of the batch would get alone too, so none is run again: the model
    cannot be served, memory ran out even after the retries (Unavailable), the batch's LoRAs
    (every job of a batch has the same) cannot be used, another server-side error. A bug (not
    a CraftError), or a CraftError about a request's own input, may be one job's."""
    return isinstance(exc, Unavailable | LoraError) or exc.status >= 500


def _internal(job: Job) -> InternalError:
    return InternalError(f"internal error while generating (job {job.id}); the server log has the "
                         "details and the server goes on serving")


class Worker:
    def __init__(
        self,
        name: str,
        device: torch.device,
        *,
        queue: JobQueue,
        settings: Settings,
        specs: Mapping[str, ModelSpec],
        metrics: Metrics,
        failures: LoadFailures,
        preload: Sequence[str] = (),
        hub: HubAccess | None = None,
        upscaler_specs: Callable[[], Mapping[str, Any]] = dict,
        controlnet_specs: Callable[[], Mapping[str, Any]] = dict,
    ) -> None:
        self.name = name
        self.device = device
        self.queue = queue
        self.settings = settings
        self.specs = specs
        self.metrics = metrics
        self.failures = failures
        self.preload = tuple(preload)
        self.hub = hub
        self.upscaler_specs = upscaler_specs  # the served model upscalers, by name (a reload swaps them)
        self.upscalers = Upscalers(device)  # loaded on this thread when a job needs one
        self.controlnet_specs = controlnet_specs  # the served ControlNets, by name
        self.controlnets = ControlNets(device)  # loaded on this thread when a batch needs them
        self.slot = WorkerSlot(name)
        queue.register(self.slot)
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.preloaded = threading.Event()
        self.running: list[Job] = []
        self._stale: set[str] = set()  # loaded models a reload removed or changed
        self._wanted: list[str] = []  # models to load between batches (Engine.load_model)
        self._recheck = False  # a reload happened: preload what is not loaded
        self._stale_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        # The loader thread: models to load (None stops it), what it loaded (or None: failed)
        self._load_requests: queue_module.SimpleQueue[tuple[str, bool] | None] = queue_module.SimpleQueue()
        self._arrived: list[tuple[str, LoadedModel | None, bool]] = []
        self._requested: set[str] = set()  # asked of the loader, not installed yet (worker thread)
        self._discard: set[str] = set()  # loading when a reload changed them: not installed
        self._preload_pending = 0  # preload requests not installed yet (worker thread)
        self._loader = threading.Thread(target=self._load_loop, name=f"{name}-loader", daemon=True)

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        self._loader.start()
        self._thread.start()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        if self.device.type == "cuda":
            # Anything that uses "the current device" (streams, cuDNN handles, libraries
            # that call torch.cuda.current_device()) must mean this worker's GPU, not cuda:0.
            torch.cuda.set_device(self.device)
        try:
            self._preload()
        finally:
            if not self._preload_pending:
                self.preloaded.set()
        while True:
            batch = self.queue.take(self.slot)
            if not batch:
                if self.queue.closed:
                    self._load_requests.put(None)
                    return
                self._tidy()  # nudged: a model arrived, or a reload removed or changed models
                continue
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
        """Ask the loader for the preload models not loaded (in the models file's order);
        `preloaded` is set once each has been installed or has failed."""
        for name in self.preload:
            if name not in self.models and name not in self._requested:
                self._request_load(name, preload=True)

    # ---- the loader thread -----------------------------------------------------------
    def _request_load(self, name: str, *, preload: bool = False, jobs: Sequence[Job] = ()) -> None:
        """(Worker thread.) Have `name` loaded in the background; `jobs` (a batch taken for
        it) go back to the queue meanwhile. Room is made first: the least recently used
        models are evicted so that the loaded ones and those loading fit the LRU."""
        if jobs:
            self.queue.put_back(list(jobs), self.slot, name)
        else:
            self.queue.start_loading(self.slot, name)
        if name in self._requested:
            return
        while self.models and len(self.models) + len(self._requested) >= self.settings.max_models_per_device:
            self._evict(next(iter(self.models)))
        self._requested.add(name)
        with self._stale_lock:
            self._discard.discard(name)  # a reload before this request changes nothing for it
        if preload:
            self._preload_pending += 1
        self._load_requests.put((name, preload))

    def _load_loop(self) -> None:
        while True:
            request = self._load_requests.get()
            if request is None:
                return
            name, preload = request
            started = time.monotonic()
            loaded: LoadedModel | None = None
            spec = self.specs.get(name)
            try:
                if spec is None:
                    raise Unavailable(f"model '{name}' is no longer served: a reload removed it "
                                      "from the models file", retry_after=3600,
                                      kind=ErrorKind.MODEL_UNAVAILABLE)
                loaded = self._load(spec)
            except Unavailable as exc:
                self.failures.record(name, exc)
                self._fail_waiting(name, exc)
                if isinstance(exc, WaitingForWeights):  # the Hub notice named it, once for all
                    logger.info("%s: %s is not loaded: it waits for its weights", self.name, name)
                elif preload:
                    logger.warning("%s: preload of %s failed: %s", self.name, name, exc.message)
                else:
                    logger.warning("%s: loading %s failed: %s", self.name, name, exc.message)
            except BaseException:  # pragma: no cover - _load turns everything into Unavailable
                logger.exception("%s: loading %s failed", self.name, name)
            succeeded = loaded is not None
            with self._stale_lock:
                self._arrived.append((name, loaded, preload))
            # this thread holds no model between loads: an evicted or unloaded one is freed
            loaded = None
            self.queue.done_loading(self.slot, name, time.monotonic() - started, succeeded)
            self.queue.nudge_slot(self.slot)

    def _install_arrived(self) -> None:
        """(Worker thread.) Take the loader's results: the models it loaded join the LRU."""
        with self._stale_lock:
            arrived, self._arrived = self._arrived, []
            names = {a[0] for a in arrived}
            discard, self._discard = self._discard & names, self._discard - names
        for name, loaded, preload in arrived:
            self._requested.discard(name)
            if preload:
                self._preload_pending -= 1
            if loaded is None:
                continue
            if name in discard:  # a reload changed it while it loaded: load the new one
                self.slot.models.discard(name)
                self._request_load(name)
                continue
            self._install(name, loaded)
        if self._preload_pending <= 0 and not self.preloaded.is_set():
            self.preloaded.set()

    def _install(self, name: str, loaded: LoadedModel) -> None:
        while len(self.models) >= self.settings.max_models_per_device:
            self._evict(next(iter(self.models)))
        self.failures.clear(name)
        self.metrics.model_load.labels(name).observe(loaded.load_seconds)
        self._add(name, loaded)

    def _add(self, name: str, loaded: LoadedModel) -> None:
        """A loaded model joins the LRU; a loaded refiner-only model then uses the VAE and
        second text encoder of a loaded SDXL model where they are equal to its own
        (app.engine.sharing), and its own copies are freed."""
        self.models[name] = loaded
        self.slot.models.add(name)
        if share(self.models, self.name):
            self._free_memory()

    # ---- models --------------------------------------------------------------------
    def mark_stale(self, names: Iterable[str], recheck: bool = True) -> None:
        """Unload these models between batches (any thread may call this; a reload does, and
        then `recheck` loads the preload models that are not loaded; a Ray replica's model
        LRU evicting a model does not want that)."""
        names = set(names)
        with self._stale_lock:
            self._stale.update(names)
            self._discard.update(names)  # one loading now is loaded afresh when it arrives
            self._wanted = [name for name in self._wanted if name not in names]
            self._recheck = self._recheck or recheck

    def want_loaded(self, names: Iterable[str]) -> None:
        """Load these models between batches (any thread may call this), as preload does."""
        with self._stale_lock:
            self._wanted += [name for name in names if name not in self._wanted]

    def _tidy(self) -> None:
        """Unload the models marked stale: on this thread, between batches, so a running job
        finishes on the model it started with."""
        with self._stale_lock:
            stale, self._stale = self._stale, set()
            recheck, self._recheck = self._recheck, False
            wanted, self._wanted = self._wanted, []
        for name in stale:
            if name in self.models:
                self._evict(name)
        self._install_arrived()
        if recheck:
            self._preload()  # a changed preload model loads again; one a reload added loads now
        for name in wanted:  # a failure is recorded in `failures`, where the asker reads it
            if name not in self.models:
                self._request_load(name)

    def model(self, name: str) -> LoadedModel:
        """The loaded model `name`, loading it on this thread (and evicting the least recently
        used) if needed; the worker's own loop loads in the background instead (`_run_batch`).
        A failed load is recorded, so requests for it are answered 503 at once for a while."""
        self._tidy()
        spec = self.specs.get(name)
        if spec is None:
            raise Unavailable(f"model '{name}' is no longer served: a reload removed it from the "
                              "models file", retry_after=3600, kind=ErrorKind.MODEL_UNAVAILABLE)
        loaded = self.models.get(name)
        if loaded is not None:
            self.models.move_to_end(name)
            return loaded
        while len(self.models) >= self.settings.max_models_per_device:
            self._evict(next(iter(self.models)))
        try:
            loaded = self._load(spec)
        except Unavailable as exc:
            self.failures.record(name, exc)
            self._fail_waiting(name, exc)
            raise
        self.failures.clear(name)
        self.metrics.model_load.labels(name).observe(loaded.load_seconds)
        self._add(name, loaded)
        return loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        settings = self.settings
        try:
            return load_model(
                spec,
                self.device,
                allow_downloads=settings.allow_downloads,
                hub=self.hub,
                lora_cache_size=settings.lora_cache_size,
                compile=settings.compile,
                exact_batches=settings.cpu_exact_batches,
                warm_batch_sizes=settings.warm_batch_sizes(),
                compile_cache=settings.compile_cache,
            )
        except Unavailable:
            raise
        except Exception as exc:
            logger.exception("%s: loading %s failed", self.name, spec.name)
            raise Unavailable(
                f"model '{spec.name}' cannot be served now: loading it failed "
                f"({type(exc).__name__}); the server log has the details",
                kind=ErrorKind.MODEL_UNAVAILABLE,
            ) from exc

    def _fail_waiting(self, name: str, error: Unavailable) -> None:
        """Jobs already queued for a model that just failed to load get the same answer now,
        rather than one more load attempt each (unless another worker holds the model)."""
        if any(name in slot.models for slot in self.queue.slots if slot is not self.slot):
            return
        waiting = self.queue.remove_model(name)
        if waiting:
            self._fail(waiting, Unavailable(error.message, retry_after=error.retry_after,
                                            kind=ErrorKind.MODEL_UNAVAILABLE), finished=True)

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
        if not isinstance(batch[0].params, UpscaleParams) and self._not_loaded(batch):
            return
        now = time.monotonic()
        for job in batch:
            job.started_at = now
            self.metrics.queue_wait.observe(now - job.enqueued_at)
        live = self._present(batch)
        if not live:
            return
        if isinstance(live[0].params, UpscaleParams):
            self._run_upscales(live)
            return
        name = live[0].params.model
        try:
            model = self.model(name)
        except CraftError as exc:  # the model: every job of the batch needs it, none is rerun
            self._fail(live, exc)
            return
        except Exception:
            logger.exception("%s: batch %s failed", self.name, [j.id for j in live])
            self._fail(live, _internal(live[0]))
            return
        live = self._checked_prompts(model, live)
        if live:
            self._run_jobs(model, live, first=True)

    def _not_loaded(self, batch: list[Job]) -> bool:
        """True when the batch's model is not loaded here and the batch was dealt with: back
        to the queue while the loader loads the model, or answered 503 at once when loading
        it failed less than LOAD_RETRY_S ago."""
        name = batch[0].params.model
        self._tidy()
        if name in self.models or name not in self.specs:
            return False  # loaded; or removed by a reload, which self.model() answers
        try:
            self.failures.check(name)
        except Unavailable as exc:
            live = self._present(batch)
            self._fail(live, exc)
            return True
        self._request_load(name, jobs=batch)
        return True

    def _run_upscales(self, jobs: list[Job]) -> None:
        """Upscaling jobs, one at a time: the picture through its upscaler(s) on this device."""
        for job in jobs:
            started = time.perf_counter()
            p: UpscaleParams = job.params  # type: ignore[assignment]
            if job.cancelled.is_set():
                self._present([job])
                continue
            try:
                image = self.upscale(p.image, p.upscaler, *p.size, jobs=[job])
                if p.upscaler_2 and p.visibility > 0:
                    second = self.upscale(p.image, p.upscaler_2, *p.size, jobs=[job])
                    image = Image.blend(image, second, p.visibility)
                if image.size != p.out_size:
                    canvas = Image.new("RGB", p.out_size)
                    canvas.paste(image, (p.out_size[0] // 2 - image.width // 2,
                                         p.out_size[1] // 2 - image.height // 2))
                    image = canvas
            except _Interrupted:
                self._fail([job], Unavailable("every client of this job went away; it was stopped",
                                              kind=ErrorKind.INTERRUPTED))
                continue
            except CraftError as exc:
                self._fail([job], exc)
                continue
            except Exception:
                logger.exception("%s: upscaling job %s failed", self.name, job.id)
                self._fail([job], _internal(job))
                continue
            seconds = time.perf_counter() - started
            self._finish([job], seconds)
            wait = (job.started_at or job.enqueued_at) - job.enqueued_at
            logger.info("job %s client=%s upscaler=%r size=%dx%d wait=%.3fs gen=%.3fs", job.id,
                        job.client, p.upscaler, *p.out_size, wait, seconds)
            job.resolve(JobResult(image=image, seed=0, sampler_label=p.upscaler, queue_wait_s=wait,
                                  generation_s=seconds, batch_size=1, worker=self.name))

    def _present(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose clients are still there; the others are answered (cancelled) now."""
        gone = [job for job in jobs if job.cancelled.is_set()]
        if gone:
            self._fail(gone, Unavailable("the client went away before its job started",
                                         kind=ErrorKind.CANCELLED))
        return [job for job in jobs if not job.cancelled.is_set()] if gone else jobs

    def _checked_prompts(self, model: LoadedModel, jobs: list[Job]) -> list[Job]:
        """The jobs whose prompts this model's tokenizer can read and which encode to at most
        CRAFTSERVE_MAX_PROMPT_CHUNKS chunks (an exact count; the HTTP side refused what was
        surely over before queueing). Any other job is answered on its own now, before
        anything is encoded: 422 over the limit, 500 naming the job if its prompt breaks the
        tokenizer."""
        encoder = model.prompts
        if encoder is None:  # the pipeline encodes (and truncates) every prompt itself
            return jobs
        limit = self.settings.max_prompt_chunks
        kept = []
        for job in jobs:
            p = job.params
            try:
                texts = [("prompt", p.prompt), ("negative_prompt", p.negative_prompt)]
                if p.hires is not None:
                    texts += [("hr_prompt", p.hires.prompt), ("hr_negative_prompt", p.hires.negative_prompt)]
                for field, text in texts:
                    if text and encoder.needs_encoding(text, p.clip_skip, p.embeddings):
                        count = encoder.chunk_count(text, p.embeddings)
                        if count > limit:
                            raise TooManyPromptChunks(field, count, limit)
            except CraftError as exc:
                self._fail([job], exc)
                continue
            except Exception:
                logger.exception("%s: job %s: its prompts cannot be tokenized", self.name, job.id)
                self._fail([job], _internal(job))
                continue
            kept.append(job)
        return kept

    def _run_jobs(self, model: LoadedModel, jobs: list[Job], *, first: bool = False) -> None:
        """Generate `jobs` as one batch and answer each. An error that concerns the whole batch
        (`_concerns_the_batch`) answers them all. Any other, a bug or an error about one job's
        input, never fails the jobs batched with the job at fault: the batch is split in halves
        and each half run again, down to the job (or jobs) at fault, which alone get the error.
        One job at fault among n costs about 2 * log2(n) more pipeline calls, of smaller
        batches; the others' images are those they get alone (batching keeps each job's bytes)."""
        jobs = jobs if first else self._present(jobs)
        if not jobs:
            return
        started = time.perf_counter()
        try:
            images = self._generate_with_recovery(model, jobs)
        except _Interrupted:
            self._fail(jobs, Unavailable("every client of this job went away; it was stopped",
                                         kind=ErrorKind.INTERRUPTED))
            return
        except Exception as exc:
            if isinstance(exc, CraftError) and _concerns_the_batch(exc):
                self._fail(jobs, exc)
            elif len(jobs) > 1:
                logger.warning("%s: a batch of %d jobs failed (%s); running its halves again to "
                               "find the job at fault", self.name, len(jobs), type(exc).__name__,
                               exc_info=first)
                half = len(jobs) // 2
                self._run_jobs(model, jobs[:half])
                self._run_jobs(model, jobs[half:])
            elif isinstance(exc, CraftError):
                self._fail(jobs, exc)
            else:
                logger.exception("%s: job %s failed", self.name, jobs[0].id)
                self._fail(jobs, _internal(jobs[0]))
            return
        self._report(model, jobs, images, time.perf_counter() - started)

    def _finish(self, jobs: list[Job], seconds: float | None = None) -> None:
        """Tell the queue these jobs are done, before answering them: a lone client's next
        request must not find its previous job still counted as in flight."""
        self.queue.finished(len(jobs), seconds)

    def _fail(self, jobs: list[Job], error: CraftError, *, finished: bool = False) -> None:
        if not finished:
            self._finish(jobs)
        if error.kind.stopped:  # no answer reaches the edge: count here
            self.metrics.errors.labels(error.kind).inc(len(jobs))
        for job in jobs:
            job.fail(error)

    def _report(self, model: LoadedModel, jobs: list[Job], images: list, seconds: float) -> None:
        self._finish(jobs, seconds)
        metrics = self.metrics
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
                "wait=%.3fs gen=%.3fs%s",
                job.id, job.client, params.model, params.sampler.label, params.steps,
                params.width, params.height, job.params.seed, len(jobs), wait, seconds,
                # prompts are the users' data: logged only when the owner turns it on
                f" prompt={job.params.prompt!r} negative={job.params.negative_prompt!r}"
                if self.settings.log_prompts else "",
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
        """On out-of-memory, decode with less memory (VAE slicing and tiles half the VAE's
        default size) and retry: the batch first, then one job at a time."""
        try:
            return self.generate(model, jobs)
        except OutOfMemory:
            logger.warning("%s: out of memory on a batch of %d; retrying with VAE slicing and "
                           "small VAE tiles", self.name, len(jobs))
        attempts = [jobs] if len(jobs) == 1 else [jobs, None]
        refiner = jobs[0].params.refiner
        pipes = [model.pipe] + ([self.models[refiner.model].pipe]
                                if refiner is not None and refiner.model in self.models else [])
        # eager: the tiles' shapes were never compiled, and compiling costs memory (the refiner
        # decodes its own latents with its own VAE)
        with contextlib.ExitStack() as stack:
            # one VAE once: a refiner may use the model's own (app.engine.sharing), whose tiles
            # would otherwise be halved twice
            for vae in {id(pipe.vae): pipe.vae for pipe in pipes}.values():
                stack.enter_context(_low_memory_decode(vae))
            for pipe in pipes:
                stack.enter_context(eager(pipe))
            for attempt in attempts:
                self._free_memory()
                try:
                    if attempt is not None:
                        return self.generate(model, attempt)
                    logger.warning("%s: out of memory again; one job at a time", self.name)
                    return [image for job in jobs for image in self.generate(model, [job])]
                except OutOfMemory:
                    continue
        self._free_memory()
        raise Unavailable(
            f"out of memory on {self.device} even one image at a time with VAE tiling; "
            "try a smaller size or retry when the server is less busy",
            retry_after=30,
            kind=ErrorKind.OUT_OF_MEMORY,
        )

    def generate(self, model: LoadedModel, jobs: list[Job]) -> list:
        """The images of a batch of compatible jobs, each at its answer's size: one pipeline
        call (two with the hires fix), or one per prompt length when some job's prompts need
        A1111 encoding (app.engine.prompts) and their encodings differ in length. The batch's
        LoRAs are active throughout (they change the text encoders too, so prompts are encoded
        here). Image-to-image and inpainting jobs run on the model's pipelines for those tasks
        (app.engine.img2img), each job with its own picture and mask."""
        params = jobs[0].params
        if model.refiner_only:  # a Hub repo the registry could not read before its download
            raise InvalidParameter("model", model.spec.name, REFINER_ONLY_RULE)
        images: dict[str, Any] = {}
        # SDXL's refiner: another served model, loaded beside this one (the LRU keeps the most
        # recent; the edge asks for CRAFTSERVE_MAX_MODELS_PER_DEVICE >= 2)
        refiner = self.model(params.refiner.model) if params.refiner is not None else None
        try:
            model.loras.apply(params.loras)
            # A compiled pipe runs batches with LoRAs eagerly: their adapter layers would
            # otherwise recompile on the request path for every new LoRA state.
            uncompiled = eager(model.pipe) if params.loras else contextlib.nullcontext()
            with uncompiled:
                for group, embeds in _prompt_groups(model, jobs):
                    output = self._first_pass(model, group, embeds, jobs, refiner)
                    if params.hires is not None:
                        output = self._hires_pass(model, group, output, jobs, refiner)
                    images.update((job.id, image) for job, image in zip(group, output, strict=True))
        finally:
            model.loras.reset()
        return [_finished(images[job.id], job.params) for job in jobs]

    def _first_pass(self, model: LoadedModel, group: list[Job], embeds: dict[str, Any] | None,
                    batch: list[Job], refiner: LoadedModel | None = None) -> list:
        """The job's own pass: text to image (latents when a hires pass follows), image to
        image or inpainting; with a refiner (and no hires fix, whose second pass it refines)
        handed over to it at the switch (app.engine.refiner)."""
        params = group[0].params
        task = params.task
        pipe = pipeline_for(model, task)
        control: dict[str, Any] = {}
        if params.controlnet:  # (units for the hires pass alone leave this pass plain)
            control_pipe, control = self._controlnet(model, group, task)
            pipe = control_pipe or pipe
        pipe.scheduler = make_scheduler(params.sampler, model.scheduler_config, params.seed)
        width, height = params.gen_size
        kwargs: dict[str, Any] = {"width": width, "height": height}
        if task == "txt2img" and inpainting_unet(model.pipe):
            image, mask = blank_sources(len(group), width, height)
            kwargs.update(image=image, mask_image=mask, strength=1.0)
        elif task != "txt2img":
            kwargs.update(self._image_arguments(pipe, group, width, height))
        if params.hires is not None:
            kwargs["output_type"] = "latent" if params.hires.latent else "pil"
        handover = None
        stop_after = None
        if refiner is not None and params.hires is None:
            assert params.refiner is not None
            strength = 1.0 if task == "txt2img" else params.strength
            handover = self._handover(model, params, params.steps, strength)
            if handover is not None and handover.refiner_alone and task != "txt2img":
                arguments = self._image_arguments(pipeline_for(refiner, task), group, width, height)
                return self._refine(model, refiner, group, batch, steps=params.steps, cfg=params.cfg_scale,
                                    sampler=params.sampler, offset=0, **arguments)
            if handover is not None:  # the model's latents at the switch
                kwargs["output_type"] = "latent"
                if control and task != "txt2img":  # diffusers' ControlNet img2img takes no denoising_end
                    stop_after = handover.base_steps
                else:
                    kwargs["denoising_end"] = handover.switch
        kwargs.update(control)
        with jobs_in_call(model.pipe, len(group)):
            if task == "inpaint" and params.fill in (2, 3):
                pipe.craft_fill = (params.fill, [j.params.source.mask for j in group],
                                   [j.params.seed for j in group])
            try:
                output = self._call(pipe, group, embeds, batch, steps=params.steps, cfg=params.cfg_scale,
                                    seeds=[j.params.seed for j in group], stop_after=stop_after, **kwargs)
            finally:
                if task == "inpaint":
                    pipe.craft_fill = None
        if handover is not None:
            assert refiner is not None
            return self._refine(model, refiner, group, batch, steps=params.steps, cfg=params.cfg_scale,
                                sampler=params.sampler, offset=handover.base_steps,
                                image=_stacked(output.images), denoising_start=handover.switch)
        return list(output.images)

    def _handover(self, model: LoadedModel, params: GenParams, steps: int, strength: float,
                  ) -> Handover | None:
        """Where a pass of `steps` at `strength` goes to the refiner (None: it never does)."""
        assert params.refiner is not None
        sampler = params.hires.sampler if params.hires is not None else params.sampler
        scheduler = make_scheduler(sampler, model.scheduler_config, params.seed)
        return handover_plan(scheduler, steps, strength, params.refiner.switch_at)

    def _refine(self, model: LoadedModel, refiner: LoadedModel, group: list[Job], batch: list[Job], *,
                steps: int, cfg: float, sampler: Any, offset: int, hires: bool = False,
                **kwargs: Any) -> list:
        """The refiner's part of a pass: its image-to-image pipeline (its own UNet, text
        encoders and VAE, or a loaded model's equal VAE and encoder 2: app.engine.sharing),
        from the model's latents with `denoising_start` or, where the refiner runs the pass
        alone, from the pass's picture at its strength. The schedule is made from the job's
        model's scheduler config, so both sides cut the same timesteps. Each job's prompts are
        encoded by the refiner's own encoders (app.engine.prompts)."""
        pipe = pipeline_for(refiner, "img2img")
        seeds = [job.params.seed for job in group]
        pipe.scheduler = make_scheduler(sampler, model.scheduler_config, seeds[0])
        image = kwargs.pop("image")
        output: dict[int, Any] = {}
        # a refiner using the model's own text encoder 2 (app.engine.sharing) encodes without
        # the batch's LoRAs, which belong to the job's model only
        plain = model.loras.suspended() if shares_with(refiner, model) else contextlib.nullcontext()
        with plain:
            for sub, embeds in _prompt_groups(refiner, group, hires=hires):
                index = [group.index(job) for job in sub]
                picked = image[index] if isinstance(image, torch.Tensor) else [image[i] for i in index]
                with jobs_in_call(refiner.pipe, len(sub)):
                    result = self._call(pipe, sub, embeds, batch, steps=steps, cfg=cfg,
                                        seeds=[j.params.seed for j in sub], offset=offset, hires=hires,
                                        image=picked, **kwargs)
                output.update(zip(index, result.images, strict=True))
        return [output[i] for i in range(len(group))]

    def _controlnet(self, model: LoadedModel, group: list[Job], task: str, *, hires: bool = False,
                    ) -> tuple[Any, dict[str, Any]]:
        """The model's ControlNet pipeline for the task with the batch's units of the pass set
        (`hires`: the hires fix's second pass, else the job's own; each unit's hr_option says
        which it guides), and the call's ControlNet arguments: each job's control images for
        the pass (app.engine.controlnet applies the weights, windows and modes itself;
        diffusers' own are left neutral). (None, {}) when no unit guides the pass."""
        params = group[0].params
        picked = [(k, unit.in_hires() if hires else unit) for k, unit in enumerate(params.controlnet)
                  if (unit.high_res if hires else unit.low_res)]
        if not picked:
            return None, {}
        units = [unit for _, unit in picked]
        specs = self.controlnet_specs()
        nets = []
        for unit in units:
            spec = specs.get(unit.name)
            if spec is None:
                raise Unavailable(f"ControlNet '{unit.name}' is no longer served: a reload removed it",
                                  retry_after=3600, kind=ErrorKind.MODEL_UNAVAILABLE)
            nets.append(self.controlnets.get(unit, spec, model.pipe.unet))
        pipe = controlnet_pipeline(model, task, nets[0])
        if hires:  # the window counts the second pass's own steps
            assert params.hires is not None
            total, cfg = params.hires.denoising_steps, params.hires.cfg_scale
        else:
            total = params.steps if task == "txt2img" else denoising_steps(params.steps, params.strength)
            cfg = params.cfg_scale
        pipe.controlnet.set_units(nets, units, total, cfg=cfg > 1)
        # One (jobs, 3, h, w) tensor in 0..1 per unit, each job its own picture (diffusers'
        # multi-ControlNet pipelines take no per-prompt lists; these are the values its image
        # processor makes of the pictures).
        images = [_control_tensor([_pass_images(job.params.control_images, hires)[k] for job in group])
                  for k, _ in picked]
        count = len(units)
        kwargs: dict[str, Any] = {
            ("image" if task == "txt2img" else "control_image"): images,
            "controlnet_conditioning_scale": [1.0] * count,
            "control_guidance_start": [0.0] * count,
            "control_guidance_end": [1.0] * count,
        }
        return pipe, kwargs

    def _image_arguments(self, pipe: Any, group: list[Job], width: int, height: int) -> dict[str, Any]:
        params = group[0].params
        sources = [job.params.source for job in group]
        kwargs: dict[str, Any] = {"strength": params.strength}
        if params.source.latent_resize:  # A1111's resize mode 3: the latents are resized
            latents = [encode_latents(pipe, s.image, torch.Generator("cpu").manual_seed(j.params.seed))
                       for s, j in zip(sources, group, strict=True)]
            kwargs["image"] = torch.cat([
                torch.nn.functional.interpolate(lat, size=(height // 8, width // 8), mode="bilinear")
                for lat in latents])
        else:
            kwargs["image"] = [s.image for s in sources]
        if params.task == "inpaint":
            kwargs["mask_image"] = [s.mask for s in sources]
        else:  # the image-to-image pipelines take their size from the picture
            kwargs.pop("width", None)
        return kwargs

    def _hires_pass(self, model: LoadedModel, group: list[Job], first: list, batch: list[Job],
                    refiner: LoadedModel | None = None) -> list:
        """A1111's hires fix: the first pass upscaled (latents, or pixels by an upscaler),
        cropped to the answer's aspect where asked, then an image-to-image pass (with a
        refiner, handed over to it at the switch, as A1111 refines the second pass)."""
        hires = group[0].params.hires
        assert hires is not None
        up_w, up_h = hires.upscale_size
        out_w, out_h = round_up8(hires.size[0]), round_up8(hires.size[1])
        if hires.latent:
            latents = upscale_latents(torch.stack(first), round_up8(up_h), round_up8(up_w), hires.upscaler)
            top, left = (latents.shape[2] - out_h // 8) // 2, (latents.shape[3] - out_w // 8) // 2
            image: Any = latents[:, :, top:top + out_h // 8, left:left + out_w // 8]
        else:
            image = [_centre_crop(self.upscale(picture, hires.upscaler, up_w, up_h, batch), out_w, out_h)
                     for picture in first]
        pipe = pipeline_for(model, "img2img")
        control: dict[str, Any] = {}
        if group[0].params.controlnet:  # the units that guide this pass, with its own maps
            control_pipe, control = self._controlnet(model, group, "img2img", hires=True)
            pipe = control_pipe or pipe
        seeds = [job.params.seed for job in group]
        pipe.scheduler = make_scheduler(hires.sampler, model.scheduler_config, seeds[0])
        kwargs: dict[str, Any] = {"image": image, "strength": hires.strength, **control}
        if inpainting_unet(model.pipe):
            kwargs.update(mask_image=[Image.new("L", (out_w, out_h), 255)] * len(group),
                          width=out_w, height=out_h)
            if hires.latent:  # no pixels to mask: the fully masked picture's latents
                kwargs["masked_image_latents"] = blank_masked_latents(pipe, len(group), out_w, out_h)
        offset = group[0].params.steps
        if refiner is not None:
            handover = self._handover(model, group[0].params, hires.steps, hires.strength)
            if handover is not None:
                return self._refined_hires(model, refiner, pipe, group, batch, kwargs, image, handover,
                                           offset)
        by_index = self._second_pass(model, pipe, group, batch, kwargs, image, offset)
        return [by_index[i] for i in range(len(group))]

    def _second_pass(self, model: LoadedModel, pipe: Any, group: list[Job], batch: list[Job],
                     kwargs: dict[str, Any], image: Any, offset: int, **extra: Any) -> dict[int, Any]:
        """The hires fix's image-to-image calls, one per group of the hires prompts' length:
        {index in `group`: what the pipeline answered for that job}."""
        hires = group[0].params.hires
        assert hires is not None
        answered: dict[int, Any] = {}
        for sub, embeds in _prompt_groups(model, group, hires=True):
            index = [group.index(job) for job in sub]
            sub_kwargs = dict(kwargs)
            sub_kwargs["image"] = (image[index] if isinstance(image, torch.Tensor)
                                   else [image[i] for i in index])
            for name in ("mask_image", "masked_image_latents"):  # the same for every job
                if name in sub_kwargs:
                    sub_kwargs[name] = sub_kwargs[name][:len(sub)]
            if "control_image" in sub_kwargs:  # each job's own maps; the units' steps count afresh
                sub_kwargs["control_image"] = [c[index] for c in sub_kwargs["control_image"]]
                pipe.controlnet.restart()
            with jobs_in_call(model.pipe, len(sub)):
                result = self._call(pipe, sub, embeds, batch, steps=hires.steps, cfg=hires.cfg_scale,
                                    seeds=[j.params.seed for j in sub], offset=offset, hires=True,
                                    **sub_kwargs, **extra)
            answered.update(zip(index, result.images, strict=True))
        return answered

    def _refined_hires(self, model: LoadedModel, refiner: LoadedModel, pipe: Any, group: list[Job],
                       batch: list[Job], kwargs: dict[str, Any], image: Any, handover: Handover,
                       offset: int) -> list:
        """The hires fix's second pass handed over to the refiner: the model's image-to-image
        pass to the switch (latents; `pipe`, with the ControlNet units of the pass if any: they
        guide the model's part, never the refiner's), then the refiner's; or the refiner's alone."""
        hires = group[0].params.hires
        assert hires is not None
        common = {"steps": hires.steps, "cfg": hires.cfg_scale, "sampler": hires.sampler, "hires": True}
        if handover.refiner_alone:
            return self._refine(model, refiner, group, batch, offset=offset, image=image,
                                strength=hires.strength, **common)
        pipe.scheduler = make_scheduler(hires.sampler, model.scheduler_config, group[0].params.seed)
        # diffusers' ControlNet img2img pipelines take no denoising_end: stopped after the
        # model's timesteps instead (the same latents: the schedule is the same)
        stop: dict[str, Any] = ({"stop_after": handover.base_steps} if "control_image" in kwargs
                                else {"denoising_end": handover.switch})
        latents = self._second_pass(model, pipe, group, batch, kwargs, image, offset,
                                    output_type="latent", **stop)
        return self._refine(model, refiner, group, batch, offset=offset + handover.base_steps,
                            image=torch.stack([latents[i] for i in range(len(group))]),
                            denoising_start=handover.switch, **common)

    def upscale(self, image: Any, name: str, width: int, height: int, jobs: Sequence[Job] = ()) -> Any:
        """A picture upscaled by a pixel upscaler on this worker's device; stopped between
        tiles once every one of `jobs` is cancelled."""
        def on_tile(done: int, total: int) -> None:
            if jobs and all(job.cancelled.is_set() for job in jobs):
                raise _Interrupted()

        return self.upscalers.upscale(image, name, width, height, self.upscaler_specs(), on_tile=on_tile)

    @staticmethod
    def _call(pipe, jobs: list[Job], embeds: dict[str, Any] | None, batch: list[Job], *,  # noqa: ANN001, ANN205
              steps: int, cfg: float, seeds: list[int], offset: int = 0, hires: bool = False,
              stop_after: int | None = None, **kwargs: Any):
        if embeds is not None:
            prompts: dict[str, Any] = embeds
        else:
            texts = [_texts(job.params, hires) for job in jobs]
            prompts = {
                "prompt": [prompt for prompt, _ in texts],
                # No negative prompt at all (not [""]) lets the pipeline do what the model's
                # config asks for an empty one (SDXL base: zeros, skipping two encoder calls).
                "negative_prompt": [negative for _, negative in texts] if texts[0][1] else None,
            }
        return pipe(
            **prompts,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            callback_on_step_end=_stop_when_abandoned(jobs, batch, offset, stop_after),
            **kwargs,
        )


def _stacked(images: Any) -> torch.Tensor:
    """A pipeline's latent output as one (n, 4, h, w) tensor."""
    return images if isinstance(images, torch.Tensor) else torch.stack(list(images))


def _pass_images(images: Any, hires: bool) -> tuple:
    """A job's control images for the pass: the first pass's, or the hires pass's."""
    return images.hires if hires else images.images


def _control_tensor(pictures: Sequence[Any]) -> torch.Tensor:
    """RGB pictures of one size as a (n, 3, h, w) float tensor in 0..1."""
    import numpy as np

    stacked = np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pictures])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def _texts(params: GenParams, hires: bool = False) -> tuple[str, str]:
    """The (prompt, negative prompt) of a job's pass: the hires pass has its own."""
    if hires and params.hires is not None:
        return params.hires.prompt, params.hires.negative_prompt
    return params.prompt, params.negative_prompt


def _finished(image: Any, params: GenParams) -> Any:
    """A generated picture as answered: inpainting's overlay (and "only masked"'s paste back,
    which answers at the original picture's size), else cropped to the answer's size (sides
    are generated at multiples of 8)."""
    if params.source is not None and params.source.overlay is not None:
        image = finish(image, params.source)
        if params.source.paste is not None:
            return image
    return _crop(image, *params.out_size)


def _centre_crop(image: Any, width: int, height: int) -> Any:
    return _crop(image, width, height)


def _prompt_groups(model: LoadedModel, jobs: list[Job], *, hires: bool = False,
                   ) -> list[tuple[list[Job], dict[str, Any] | None]]:
    """The batch as pipeline calls: [(jobs, None)] (the pipeline encodes the prompt strings)
    unless some job needs A1111 encoding; then every job's prompts are encoded here (for a
    plain prompt that is the pipeline's own encoding, bit for bit) and jobs are grouped by
    their number of 75-token chunks, since one call needs one prompt length. `hires`: the
    prompts of the hires fix's second pass."""
    encoder = model.prompts
    if encoder is None or not any(
        encoder.needs_encoding(text, job.params.clip_skip, job.params.embeddings)
        for job in jobs for text in _texts(job.params, hires)
    ):
        return [(jobs, None)]
    zero_negative = (model.family == "sdxl" and not _texts(jobs[0].params, hires)[1]
                     and bool(model.pipe.config.get("force_zeros_for_empty_prompt", False)))
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        p = job.params
        prompt, negative = _texts(p, hires)
        count = encoder.chunk_count(prompt, p.embeddings)
        if not zero_negative:
            count = max(count, encoder.chunk_count(negative, p.embeddings))
        groups.setdefault(count, []).append(job)
    return [(group, _embeds(encoder, [j.params for j in group], count, zero_negative, hires))
            for count, group in groups.items()]


def _embeds(encoder: PromptEncoder, jobs: Sequence[GenParams], count: int,
            zero_negative: bool, hires: bool = False) -> dict[str, Any]:
    """The pipeline's prompt_embeds (and negative, pooled) arguments for jobs of `count` chunks
    (`hires`: their hires pass's prompts); `zero_negative` leaves the negative to the pipeline
    (an empty SDXL one: zeros)."""
    def encode(text: str, params: GenParams):  # noqa: ANN202
        return encoder.encode(text, params.clip_skip, params.embeddings, min_chunks=count)

    cond = [encode(_texts(p, hires)[0], p) for p in jobs]
    kwargs: dict[str, Any] = {"prompt_embeds": torch.cat([c.hidden for c in cond])}
    if encoder.family == "sdxl":
        kwargs["pooled_prompt_embeds"] = torch.cat([c.pooled for c in cond])
    if not zero_negative:
        uncond = [encode(_texts(p, hires)[1], p) for p in jobs]
        kwargs["negative_prompt_embeds"] = torch.cat([u.hidden for u in uncond])
        if encoder.family == "sdxl":
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([u.pooled for u in uncond])
    return kwargs


@contextlib.contextmanager
def _low_memory_decode(vae: Any) -> Iterator[None]:
    """VAE slicing (one image of a batch at a time) and tiling with tiles half the VAE's
    default: diffusers' default tile is the VAE's sample size (SDXL: 1024 px, 128 latents),
    so plain tiling changes nothing for any size the API allows. Restored afterwards."""
    saved = (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.use_slicing = True
    vae.use_tiling = True
    vae.tile_sample_min_size = max(64, vae.tile_sample_min_size // 2)
    vae.tile_latent_min_size = max(8, vae.tile_latent_min_size // 2)
    try:
        yield
    finally:
        (vae.use_slicing, vae.use_tiling,
         vae.tile_sample_min_size, vae.tile_latent_min_size) = saved


def _stop_when_abandoned(jobs: list[Job], batch: list[Job], offset: int = 0, stop_after: int | None = None):
    """The step callback: records the call's progress (`offset`: the steps of the job's
    earlier passes), and stops it once every job of the batch is cancelled. `stop_after`: the
    call ends after that many steps with the latents of the last (diffusers' `interrupt`, which
    skips the remaining steps; a refiner's switch where the pipeline has no denoising_end)."""
    def callback(pipe, step, timestep, callback_kwargs):  # noqa: ANN001 - diffusers' signature
        if stop_after is not None and step + 1 >= stop_after:
            pipe._interrupt = True  # noqa: SLF001 - diffusers' documented way to stop a call
        for index, job in enumerate(jobs):
            job.step = offset + step + 1
            if job.preview_every and job.step % job.preview_every == 0:
                latents = callback_kwargs["latents"][index]
                job.preview = (job.step, approx_cheap(latents, "XL" in type(pipe).__name__))
        if all(job.cancelled.is_set() for job in batch):
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
