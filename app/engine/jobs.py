"""Jobs and the bounded, fair job queue between the HTTP side and the device workers.

The HTTP side and the workers meet only here: a route submits a Job and awaits its
future; a worker blocks in `take()` for the next batch. The queue is

- bounded: `submit` refuses with 503 and a Retry-After estimated from recent throughput;
- fair: clients (API keys) with waiting jobs are served in turn, so one client's flood
  cannot starve another;
- batching: a worker takes the fair-next job plus compatible waiting jobs (same batch
  key), up to `max_batch`, waiting up to `batch_window` for more only while several
  requests have been in flight recently (a lone client never pays the window);
- deadline-aware: a job that waits past its deadline is answered 503 at that moment (a
  timer on the job's event loop, so the answer is on time even while every worker is
  busy) and never run; this is the only place a queue deadline is enforced;
- affinity-aware: a worker prefers jobs whose model it already holds, and leaves a job to
  an idle worker that holds its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.control_units import ControlImages, ControlUnit
from app.engine.image_ops import Source
from app.errors import ErrorKind, Unavailable
from app.samplers import SamplerChoice


def round_up8(value: int) -> int:
    return int(math.ceil(value / 8) * 8)


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix of a text-to-image job: the first pass at the job's size, its result
    upscaled to `upscale_size` (latents by a latent mode, else pixels by an upscaler), centre-
    cropped to `size` where both hr_resize sides were given with another aspect ratio, then an
    image-to-image pass at `strength` with its own steps, sampler, prompts and CFG."""

    size: tuple[int, int]  # (width, height) of the answer
    upscale_size: tuple[int, int]  # (width, height) the first pass is upscaled to
    upscaler: str  # a latent mode of app.engine.upscalers.LATENT_MODES or a pixel upscaler's name
    steps: int  # the second pass's steps before strength (A1111: hr_second_pass_steps or steps)
    strength: float
    sampler: SamplerChoice
    cfg_scale: float
    # The second pass's prompts (A1111: hr_prompt, else the job's): per job, so jobs with other
    # prompts still share a batch (each job's prompts are encoded for it).
    prompt: str = field(default="", compare=False)
    negative_prompt: str = field(default="", compare=False)

    @property
    def latent(self) -> bool:
        return self.upscaler.startswith("Latent")

    @property
    def denoising_steps(self) -> int:
        return denoising_steps(self.steps, self.strength)


@dataclass(frozen=True)
class Refiner:
    """SDXL's refiner (A1111's refiner_checkpoint / refiner_switch_at): another served SDXL
    model takes over a pass at `switch_at`, the fraction of the schedule's timesteps (diffusers'
    `denoising_end` / `denoising_start`: the job's model runs the timesteps t >= round(1000 x
    (1 - switch_at)), the refiner the rest, from the model's latents). With the hires fix it
    refines the second pass only (A1111's default, "Hires fix: which pass to enable refiner
    for" = second pass)."""

    model: str
    switch_at: float  # 0 <= switch_at < 1 (1 is no refiner: the edge leaves it out)


def denoising_steps(steps: int, strength: float) -> int:
    """The steps an image-to-image pass runs: int(steps x strength) (A1111's and diffusers'
    rule), at least 1."""
    return max(1, min(steps, int(steps * strength)))


@dataclass(frozen=True)
class GenParams:
    """Everything a worker needs to make one image, already validated and resolved."""

    model: str
    prompt: str
    negative_prompt: str
    sampler: SamplerChoice
    steps: int
    width: int
    height: int
    cfg_scale: float
    loras: tuple[tuple[str, Path, float], ...]  # (name, file, weight), sorted by name
    seed: int
    # A1111's CLIP_stop_at_last_layers (1: the last layer); SD 1.x only, SDXL ignores it as A1111.
    clip_skip: int = 1
    # Textual inversion embeddings of the model's family the prompts may use: (name, file).
    embeddings: tuple[tuple[str, Path], ...] = ()
    # Image to image: the job's own picture (and mask), prepared by app.engine.image_ops;
    # `strength` is A1111's denoising_strength; `fill` its inpainting_fill (the latent modes 2
    # and 3 act in the worker). None: text to image.
    source: Source | None = None
    strength: float = 1.0
    fill: int = 1
    hires: Hires | None = None
    # ControlNet units (app.engine.controlnet): the batch's (part of the key), and the job's own
    # control images, one per unit at the generated size (compared by identity).
    controlnet: tuple[ControlUnit, ...] = ()
    control_images: ControlImages | None = field(default=None, compare=False)
    refiner: Refiner | None = None

    @property
    def gen_size(self) -> tuple[int, int]:
        """(width, height) actually generated: each side rounded up to a multiple of 8."""
        return round_up8(self.width), round_up8(self.height)

    @property
    def task(self) -> str:
        """txt2img, img2img or inpaint: which pipeline of the model runs the job."""
        if self.source is None:
            return "txt2img"
        return "img2img" if self.source.mask is None else "inpaint"

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of the answer: the hires fix's size, else the requested one."""
        return self.hires.size if self.hires is not None else (self.width, self.height)

    @property
    def total_steps(self) -> int:
        """The denoising steps the job runs in all (what progress counts to)."""
        first = self.steps if self.source is None else denoising_steps(self.steps, self.strength)
        return first + (self.hires.denoising_steps if self.hires is not None else 0)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call and keep their own bytes."""
        seed_part = self.seed if self.sampler.seeded_scheduler else None
        return (
            self.model,
            bool(self.negative_prompt),  # an empty one is handled by the model's own rule
            self.sampler,
            self.steps,
            self.gen_size,
            self.cfg_scale,
            self.loras,
            seed_part,
            self.task,
            self.strength if self.source is not None else None,
            self.fill if self.task == "inpaint" and self.fill in (2, 3) else None,
            self.source.latent_resize if self.source is not None else None,
            self.hires,
            bool(self.hires.negative_prompt) if self.hires is not None else None,
            self.controlnet,
            self.refiner,
        )
        # Prompts (their syntax, length, embeddings, clip skip) are per job: the worker encodes
        # each job's own and runs jobs whose encodings differ in length in separate calls.


@dataclass(frozen=True, eq=False)
class UpscaleParams:
    """An upscaling job (A1111's extras, VisionCraft's /upscale): no diffusion model, a worker
    and its device only. `upscaler` takes the picture to `size`; `upscaler_2` (if any) too,
    blended in at `visibility`; the result is centre-cropped (or padded) to `out_size`."""

    image: Any  # PIL image, RGB
    upscaler: str
    size: tuple[int, int]
    out_size: tuple[int, int]
    upscaler_2: str | None = None
    visibility: float = 0.0
    seed: int = 0  # (no randomness; the log line and the answer's facts read it)
    model: str = ""  # no model: the queue's model affinity and failure records pass it by
    steps: int = 1

    @property
    def total_steps(self) -> int:
        return 1

    def batch_key(self) -> tuple:
        return ("upscale", id(self))  # each runs alone


@dataclass
class JobResult:
    image: Any  # PIL.Image.Image, already cropped to the requested size
    seed: int
    sampler_label: str
    queue_wait_s: float
    generation_s: float
    batch_size: int
    worker: str = ""


def new_job_id() -> str:
    """A job's id: 96 random bits, so one key cannot guess (or count) another's jobs. Under
    Ray the ingress makes it and the replica's job keeps it (app.cluster.wire.JobCall)."""
    return "job-" + secrets.token_hex(12)


@dataclass(eq=False)
class Job:
    params: GenParams
    client: str  # a label of the API key, never the key
    loop: asyncio.AbstractEventLoop
    deadline_s: float
    future: asyncio.Future = field(init=False)
    id: str = field(default_factory=new_job_id)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: int = 0  # denoising steps done (written by the worker thread after each step)
    preview_every: int = 0  # > 0: every this many steps the worker leaves a preview
    preview: Any = None  # (step, (h, w, 3) uint8 tensor): the latest preview, if any
    # Someone follows its steps as they happen (the job API). On one box every job's step is
    # read directly; a Ray replica reports a watched job's steps every 0.1 s, others' every
    # 0.5 s (each report is a message between processes).
    watched: bool = False
    # Seconds the job waited while its model loaded in the background: they do not count
    # against its queue deadline (a job taken by a worker that loads inline never did either).
    held_s: float = 0.0

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()
        # A job can fail after its client left (interrupted, shut down): mark the
        # exception as seen so asyncio does not log it as never retrieved.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def expires_at(self) -> float:
        """time.monotonic() past which the job is not run (asyncio's loop.time() clock too)."""
        return self.enqueued_at + self.deadline_s + self.held_s

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.expires_at

    def _settle(self, setter: Callable[[Any], None], value: Any) -> None:
        def apply() -> None:
            if not self.future.done():
                setter(value)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(apply)

    def resolve(self, result: JobResult) -> None:
        self._settle(self.future.set_result, result)

    def fail(self, error: BaseException) -> None:
        self._settle(self.future.set_exception, error)


class WorkerSlot:
    """What the queue knows of a worker: whether it is idle and which models it holds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.idle = True
        self.models: set[str] = set()
        self.nudged = False  # take() returns [] once, so the worker can tidy up (a reload)
        # Models its loader thread is loading: their jobs wait in the queue, and no worker
        # takes them, while this worker runs the jobs of the models it holds.
        self.loading: set[str] = set()


def in_turns(queues: Iterable[Iterable[Job]]) -> list[Job]:
    """The jobs of several clients' queues as clients take turns: each queue's first job, then
    each one's second, and so on (the fair order of JobQueue and of the Ray ingress)."""
    order: list[Job] = []
    turns = [iter(jobs) for jobs in queues]
    while turns:
        still = []
        for turn in turns:
            job = next(turn, None)
            if job is not None:
                order.append(job)
                still.append(turn)
        turns = still
    return order


class JobQueue:
    def __init__(
        self,
        *,
        max_queue: int,
        max_batch: int,
        batch_window_s: float,
    ) -> None:
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self._cond = threading.Condition(threading.RLock())
        self._by_client: OrderedDict[str, deque[Job]] = OrderedDict()
        self._size = 0
        self._closed = False
        self._slots: list[WorkerSlot] = []
        self._in_system = 0  # submitted and not yet finished
        self._busy_until = 0.0  # while > now, several requests were in flight recently
        self._seconds_per_image = 5.0  # running estimate, for Retry-After
        self._positions: dict[Job, int] | None = None  # the service order, until it changes

    # ---- the HTTP side -------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def register(self, slot: WorkerSlot) -> None:
        with self._cond:
            self._slots.append(slot)

    @property
    def slots(self) -> tuple[WorkerSlot, ...]:
        return tuple(self._slots)

    def retry_after(self) -> float:
        workers = max(1, len(self._slots))
        return max(1.0, (self._size + 1) * self._seconds_per_image / workers)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down; retry shortly", retry_after=30,
                                  kind=ErrorKind.SHUTDOWN)
            if self._size >= self.max_queue:
                raise Unavailable(
                    f"the queue is full ({self._size} jobs waiting, the limit is "
                    f"{self.max_queue}, setting CRAFTSERVE_MAX_QUEUE); retry later",
                    retry_after=self.retry_after(),
                    kind=ErrorKind.QUEUE_FULL,
                )
            self._by_client.setdefault(job.client, deque()).append(job)
            self._size += 1
            self._positions = None
            self._in_system += 1
            if self._in_system > 1:
                self._busy_until = time.monotonic() + 2.0
            self._cond.notify_all()
        self._arm(job)

    def _arm(self, job: Job, at_least: float = 0.0) -> None:
        """Answer the job at its deadline even while every worker is busy (take() would only
        notice when a worker comes back). A job already taken by then is left alone. The
        timer holds the job weakly: an answered job (and its image) is freed at once, not
        kept until its deadline."""
        delay = max(at_least, job.expires_at - time.monotonic())
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            job.loop.call_soon_threadsafe(job.loop.call_later, delay, self._expire_weak,
                                          weakref.ref(job))

    def remove(self, job: Job) -> bool:
        """Take a waiting job out of the queue. False when a worker already has it."""
        with self._cond:
            jobs = self._by_client.get(job.client)
            if jobs is None or job not in jobs:
                return False
            jobs.remove(job)
            self._size -= 1
            self._in_system -= 1
            self._positions = None
            if not jobs:
                del self._by_client[job.client]
            return True

    def waiting(self, client: str) -> list[Job]:
        """The client's waiting jobs, in the order they will run."""
        with self._cond:
            return list(self._by_client.get(client, ()))

    def order(self) -> list[Job]:
        """Every waiting job in the order the fair queue will serve them, as things stand.

        Clients take turns in the order `take` keeps them (a client just served goes to the
        back of the line), so the order is rounds: each waiting client's first job, then each
        one's second, and so on. Computed without taking anything, O(waiting jobs)."""
        with self._cond:
            return in_turns(self._by_client.values())

    def position(self, job: Job) -> int | None:
        """The job's place in `order()`, 1 = the next job a free worker takes; None when it is
        not waiting (running, finished, cancelled).

        It is the place as things stand: a client whose first job arrives later gets its turn
        before this client's later jobs (that is the fairness), and the place is an upper bound
        on the takes before the job runs, since a worker takes compatible waiting jobs along
        in one batch (and, with several workers, leaves a job to an idle worker already holding
        its model). The order is computed once per change of the queue and then looked up, so
        watching every waiting job each tick costs O(waiting jobs) in all."""
        with self._cond:
            if self._positions is None:
                self._positions = {j: i for i, j in enumerate(self.order(), start=1)}
            return self._positions.get(job)

    def remove_model(self, model: str) -> list[Job]:
        """Take every waiting job for `model` out of the queue (the caller answers them)."""
        with self._cond:
            found = [j for jobs in self._by_client.values() for j in jobs if j.params.model == model]
            return [job for job in found if self.remove(job)]

    def _expire_weak(self, ref: weakref.ref) -> None:
        job = ref()
        if job is not None:
            self._expire(job)

    def _expire(self, job: Job) -> None:
        """The deadline rule, the one place it is applied: a job still waiting at its
        deadline is answered 503 and never run."""
        with self._cond:
            loading = self._loading(job.params.model)
            if loading or not job.expired:
                # its model loads (that wait does not count) or a load extended its deadline
                if any(job in jobs for jobs in self._by_client.values()):
                    self._arm(job, at_least=0.5 if loading else 0.01)
                return
            if not self.remove(job):
                return
        job.fail(Unavailable(
            f"the job waited {time.monotonic() - job.enqueued_at:.0f} s in the queue, longer "
            f"than its deadline of {job.deadline_s:g} s (setting CRAFTSERVE_QUEUE_DEADLINE_S); "
            "the server is overloaded",
            retry_after=self.retry_after(),
            kind=ErrorKind.DEADLINE,
        ))

    def finished(self, count: int, seconds: float | None = None) -> None:
        """Workers report finished jobs; `seconds` (a generated batch) updates the estimate."""
        with self._cond:
            self._in_system -= count
            if count and seconds is not None:
                per_image = seconds / count
                self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image

    def close(self) -> list[Job]:
        """Stop accepting; return the jobs still waiting (the caller answers them)."""
        with self._cond:
            self._closed = True
            left = [job for jobs in self._by_client.values() for job in jobs]
            self._by_client.clear()
            self._in_system -= self._size
            self._size = 0
            self._positions = None
            self._cond.notify_all()
            return left

    @property
    def closed(self) -> bool:
        return self._closed

    def nudge(self) -> None:
        """Make every worker's take() return [] once (an idle worker tidies up, e.g. unloads
        the models a reload removed), without closing the queue."""
        with self._cond:
            for slot in self._slots:
                slot.nudged = True
            self._cond.notify_all()

    # ---- the worker side -----------------------------------------------------------
    def take(self, slot: WorkerSlot, poll_s: float = 0.5) -> list[Job]:
        """Block until a batch is available (or the queue closes, or the slot was nudged:
        then [])."""
        with self._cond:
            while True:
                self._drop_expired()
                if self._closed:
                    return []
                if slot.nudged:
                    slot.nudged = False
                    return []
                first = self._pick(slot)
                if first is not None:
                    break
                self._cond.wait(poll_s)
            slot.idle = False
            batch = [first]
            self._gather(first, batch)
            return batch

    def _pop(self, client: str, job: Job) -> None:
        jobs = self._by_client[client]
        jobs.remove(job)
        self._size -= 1
        self._positions = None
        if not jobs:
            del self._by_client[client]
        else:  # this client was served: it goes to the back of the line
            self._by_client.move_to_end(client)

    def _loading(self, model: str) -> bool:
        return any(model in slot.loading for slot in self._slots)

    def _pick(self, slot: WorkerSlot) -> Job | None:
        """Each client's first job whose model is not loading, clients in turn."""
        heads = [(c, next((j for j in jobs if not self._loading(j.params.model)), None))
                 for c, jobs in self._by_client.items()]
        for client, job in heads:
            if job is None:
                continue
            model = job.params.model
            held_elsewhere = any(
                s is not slot and s.idle and model in s.models for s in self._slots
            )
            if model in slot.models or not held_elsewhere:
                self._pop(client, job)
                return job
        return None

    def _gather(self, first: Job, batch: list[Job]) -> None:
        key = first.params.batch_key()
        window_end = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            added = False
            for client in list(self._by_client):
                for job in list(self._by_client.get(client, ())):
                    if job.params.batch_key() == key and not job.expired:
                        self._pop(client, job)
                        batch.append(job)
                        added = True
                        break  # one per client a round keeps the batch fair
                if len(batch) >= self.max_batch:
                    return
            if added:
                continue
            remaining = window_end - time.monotonic()
            if remaining <= 0 or time.monotonic() > self._busy_until:
                return
            self._cond.wait(remaining)

    def _drop_expired(self) -> None:
        """Apply the deadline rule before picking, in case the timer has not fired yet (its
        event loop busy or not running). Called with the lock held; the lock is reentrant."""
        for job in [j for jobs in self._by_client.values() for j in jobs
                    if j.expired and not self._loading(j.params.model)]:
            self._expire(job)

    # ---- models loading in the background (the worker's loader thread) ----------------
    def put_back(self, jobs: list[Job], slot: WorkerSlot, model: str) -> None:
        """The jobs of a batch whose model `slot`'s worker now loads in the background, back
        at the front of their clients' lines; no worker takes jobs of `model` until
        `done_loading`."""
        with self._cond:
            slot.loading.add(model)
            for job in reversed(jobs):
                self._by_client.setdefault(job.client, deque()).appendleft(job)
                self._size += 1
            self._positions = None
            slot.idle = True
            self._cond.notify_all()

    def start_loading(self, slot: WorkerSlot, model: str) -> None:
        with self._cond:
            slot.loading.add(model)
            self._positions = None

    def done_loading(self, slot: WorkerSlot, model: str, seconds: float, loaded: bool) -> None:
        """`slot`'s loader finished with `model` (loaded, or failed and its jobs answered):
        its jobs may be taken again, their deadlines extended by the time the load took. A
        loaded model counts as the slot's at once, so its jobs go to that worker."""
        with self._cond:
            slot.loading.discard(model)
            if loaded:
                slot.models.add(model)
            if not self._loading(model):
                for jobs in self._by_client.values():
                    for job in jobs:
                        if job.params.model == model:
                            job.held_s += seconds
            self._positions = None
            self._cond.notify_all()

    def nudge_slot(self, slot: WorkerSlot) -> None:
        """Make this worker's take() return [] once (a model it loaded is ready to install)."""
        with self._cond:
            slot.nudged = True
            self._cond.notify_all()
