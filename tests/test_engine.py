"""The serving engine: fairness, batching, deadlines, cancellation, devices, failures, metrics.

Queue-level tests use a fake job payload (the queue never looks inside); everything else
runs the real server with the tiny pipelines.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import torch

from app.auth import key_label
from app.engine.jobs import GenParams, Job, JobQueue, WorkerSlot
from app.samplers import resolve_sampler
from tests.conftest import API_KEY, TINY_MODELS, body, png

TWO_MODELS = """
models:
  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}
  tiny-sd15: {source: builtin:tiny-sd15}
"""


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class HeldWorker:
    """Holds a worker before each pipeline call until released, recording what it ran."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.real = worker.generate
        self.gate = threading.Event()
        self.ran: list[list[str]] = []
        worker.generate = self._generate

    def _generate(self, model, jobs):
        self.gate.wait(60)
        self.ran.append([job.client for job in jobs])
        return self.real(model, jobs)

    def release(self) -> None:
        self.gate.set()

    def restore(self) -> None:
        self.gate.set()
        self.worker.generate = self.real


def queued_behind_one(server, jobs: list[dict]) -> list[httpx.Response]:  # noqa: ANN001
    """Post `jobs` to /sd while the worker is held on a first job, so they wait in the queue
    together and the worker takes them as one batch once released: their answers."""
    held = HeldWorker(server.app.state.engine.workers[0])
    try:
        with server.client() as c, ThreadPoolExecutor(len(jobs) + 1) as pool:
            blocker = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: held.worker.running)
            futures = [pool.submit(c.post, "/sd", json=j) for j in jobs]
            wait_for(lambda: len(server.app.state.engine.queue) == len(jobs))
            held.release()
            png(blocker.result())
            return [f.result() for f in futures]
    finally:
        held.restore()


# ---- the queue alone (fake payloads) ---------------------------------------------------
def fake_params(seed: int, steps: int = 4) -> GenParams:
    return GenParams(model="m", prompt="p", negative_prompt="", sampler=resolve_sampler("Euler"),
                     steps=steps, width=64, height=64, cfg_scale=7.0, loras=(), seed=seed)


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_queue_serves_clients_in_turn(loop) -> None:
    queue = JobQueue(max_queue=100, max_batch=1, batch_window_s=0)
    slot = WorkerSlot("w")
    for i in range(6):
        queue.submit(Job(params=fake_params(i), client="flood", loop=loop, deadline_s=60))
    for i in range(2):
        queue.submit(Job(params=fake_params(100 + i), client="polite", loop=loop, deadline_s=60))
    order = [queue.take(slot)[0].client for _ in range(8)]
    assert order[:4] == ["flood", "polite", "flood", "polite"]
    assert order[4:] == ["flood"] * 4


def test_job_ids_cannot_be_guessed(loop) -> None:
    """96 random bits in hex: no order, no counter another key could walk through."""
    ids = [Job(params=fake_params(i), client="a", loop=loop, deadline_s=60).id for i in range(300)]
    assert all(re.fullmatch(r"job-[0-9a-f]{24}", job_id) for job_id in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    values = [int(job_id.removeprefix("job-"), 16) for job_id in ids]
    assert values != sorted(values)  # not made in order
    assert all(abs(b - a) > 2**32 for a, b in pairwise(values))  # nor one after another
    for place in range(4, 28):  # every hex digit varies: the randomness spans the whole id
        assert len({job_id[place] for job_id in ids}) >= 10


def test_queue_position_is_the_place_in_the_fair_order_across_clients(loop) -> None:
    """Key A queues 3 jobs, then key B 1: B's job is served second (the clients take turns),
    so its position is 2, and A's last job is 4th. `order()` is what `take()` then does."""
    queue = JobQueue(max_queue=100, max_batch=1, batch_window_s=0)
    a = [Job(params=fake_params(i), client="a", loop=loop, deadline_s=60) for i in range(3)]
    b = Job(params=fake_params(10), client="b", loop=loop, deadline_s=60)
    for job in [*a, b]:
        queue.submit(job)
    assert queue.order() == [a[0], b, a[1], a[2]]
    assert [queue.position(j) for j in [*a, b]] == [1, 3, 4, 2]
    slot = WorkerSlot("w")
    assert queue.take(slot) == [a[0]]
    assert [queue.position(j) for j in [*a, b]] == [None, 2, 3, 1]  # the order moved on
    c = Job(params=fake_params(20), client="c", loop=loop, deadline_s=60)
    queue.submit(c)  # a new client gets its turn before a's later jobs: that is the fairness
    expected = queue.order()
    assert expected == [b, a[1], c, a[2]]
    assert [queue.take(slot)[0] for _ in expected] == expected
    assert queue.position(c) is None and queue.order() == []


def test_queue_position_follows_cancellation_and_is_an_upper_bound_with_batching(loop) -> None:
    queue = JobQueue(max_queue=100, max_batch=4, batch_window_s=0)
    a = [Job(params=fake_params(i), client="a", loop=loop, deadline_s=60) for i in range(3)]
    b = Job(params=fake_params(10, steps=5), client="b", loop=loop, deadline_s=60)  # not a's batch
    for job in [*a, b]:
        queue.submit(job)
    assert queue.position(b) == 2
    assert queue.remove(a[1])
    assert [queue.position(j) for j in [*a, b]] == [1, None, 3, 2]
    assert queue.take(WorkerSlot("w")) == [a[0], a[2]]  # a[2] ran before its position said
    assert queue.position(b) == 1


def test_queue_batches_only_compatible_jobs(loop) -> None:
    queue = JobQueue(max_queue=100, max_batch=3, batch_window_s=0)
    slot = WorkerSlot("w")
    jobs = [Job(params=fake_params(i, steps=4 if i % 2 == 0 else 5), client=f"c{i}", loop=loop,
                deadline_s=60) for i in range(6)]
    for job in jobs:
        queue.submit(job)
    first = queue.take(slot)
    assert [j.params.seed for j in first] == [0, 2, 4]
    second = queue.take(slot)
    assert [j.params.seed for j in second] == [1, 3, 5]


def test_full_queue_and_expired_jobs(loop) -> None:
    queue = JobQueue(max_queue=2, max_batch=1, batch_window_s=0)
    old = Job(params=fake_params(1), client="a", loop=loop, deadline_s=0.01)
    queue.submit(old)
    queue.submit(Job(params=fake_params(2), client="a", loop=loop, deadline_s=60))
    with pytest.raises(Exception, match="queue is full") as info:
        queue.submit(Job(params=fake_params(3), client="b", loop=loop, deadline_s=60))
    assert info.value.headers["Retry-After"]
    time.sleep(0.05)
    taken = queue.take(WorkerSlot("w"))
    assert [j.params.seed for j in taken] == [2]  # the expired one was answered, not run
    loop.run_until_complete(asyncio.sleep(0))
    assert "deadline" in str(old.future.exception())


# ---- batching through the server ---------------------------------------------------------
def test_batched_images_match_the_same_jobs_run_alone(make_server) -> None:
    server = make_server(max_batch=4, batch_window_ms=200)
    jobs = [body(seed=s, prompt=f"prompt {s}", sampler="Euler a") for s in (11, 12, 13, 14)]
    together = queued_behind_one(server, jobs)
    assert [a.headers["x-batch-size"] for a in together] == ["4"] * 4
    with make_server(max_batch=1).client() as solo:
        alone = [solo.post("/sd", json=j) for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert b.headers["x-batch-size"] == "1"
        assert a.content == b.content


def test_flooding_client_cannot_starve_another(make_server) -> None:
    other_key = "second-key"
    server = make_server(max_batch=1, api_keys=[API_KEY, other_key])
    held = HeldWorker(server.app.state.engine.workers[0])
    try:
        with server.client() as c, ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(c.post, "/sd", json=body(seed=s)) for s in range(6)]
            wait_for(lambda: len(server.app.state.engine.queue) >= 5)
            futures += [pool.submit(c.post, "/sd", json=body(seed=50 + s, token=other_key))
                        for s in range(2)]
            wait_for(lambda: len(server.app.state.engine.queue) >= 7)
            held.release()
            assert all(f.result().status_code == 200 for f in futures)
    finally:
        held.restore()
    order = [clients[0] for clients in held.ran]
    second = key_label(other_key)
    assert order.index(second) <= 2
    assert [i for i, c in enumerate(order) if c == second][1] <= 4


# ---- deadlines and cancellation ----------------------------------------------------------
def test_job_past_its_deadline_is_503_and_never_runs(make_server) -> None:
    server = make_server(queue_deadline_s=0.5, max_batch=1)
    held = HeldWorker(server.app.state.engine.workers[0])
    try:
        with server.client() as c, ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: held.worker.running)
            late = c.post("/sd", json=body(seed=2))
            assert late.status_code == 503
            assert "deadline" in late.json()["detail"]
            assert int(late.headers["retry-after"]) >= 1
            held.release()
            png(first.result())
    finally:
        held.restore()
    assert len(held.ran) == 1


def test_disconnected_client_leaves_the_queue(make_server) -> None:
    server = make_server(max_batch=1)
    engine = server.app.state.engine
    held = HeldWorker(engine.workers[0])
    try:
        with server.client() as c, ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: held.worker.running)
            with pytest.raises(httpx.ReadTimeout), server.client(timeout=0.5) as impatient:
                impatient.post("/sd", json=body(seed=2))
            wait_for(lambda: len(engine.queue) == 0, timeout=10)
            held.release()
            png(first.result())
            png(c.post("/sd", json=body(seed=3)))
    finally:
        held.restore()
    assert len(held.ran) == 2  # the seed-2 job never ran


def test_running_job_whose_client_left_is_interrupted(make_server) -> None:
    server = make_server(max_batch=1)
    engine = server.app.state.engine
    worker = engine.workers[0]
    steps_seen: list[int] = []
    real = worker.generate

    def counting(model, jobs):
        original = model.pipe.__class__.__call__

        def call(pipe, *args, **kwargs):
            inner = kwargs["callback_on_step_end"]

            def cb(p, i, t, kw):
                steps_seen.append(i)
                time.sleep(0.05)
                return inner(p, i, t, kw)

            kwargs["callback_on_step_end"] = cb
            return original(pipe, *args, **kwargs)

        model.pipe.__class__.__call__ = call
        try:
            return real(model, jobs)
        finally:
            model.pipe.__class__.__call__ = original

    worker.generate = counting
    try:
        with pytest.raises(httpx.ReadTimeout), server.client(timeout=0.6) as impatient:
            impatient.post("/sd", json=body(steps=30))
        wait_for(lambda: not worker.running, timeout=20)
    finally:
        worker.generate = real
    assert 0 < len(steps_seen) < 30
    with server.client() as c:
        png(c.post("/sd", json=body()))
        assert 'craftserve_errors_total{kind="interrupted"} 1.0' in c.get("/metrics").text


# ---- devices and models ----------------------------------------------------------------
def test_two_cpu_workers_share_the_load(make_server) -> None:
    server = make_server(devices="cpu,cpu", max_batch=1)
    assert len(server.app.state.engine.workers) == 2
    with server.client() as c, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda s: c.post("/sd", json=body(seed=s, steps=8)), range(12)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.headers["x-worker"] for a in answers}) == 2


def test_models_lru_per_device_and_affinity(make_server) -> None:
    server = make_server(TWO_MODELS, devices="cpu,cpu", max_models_per_device=1, max_batch=1)
    engine = server.app.state.engine
    with server.client() as c:
        first = c.post("/sd", json=body(model="tiny-sd15"))
        png(first)
        sd15_worker = first.headers["x-worker"]
        holders = {w.name: list(w.models) for w in engine.workers}
        assert holders[sd15_worker] == ["tiny-sd15"]  # tiny-sdxl was evicted there
        for _ in range(3):
            xl = c.post("/sd", json=body(model="tiny-sdxl"))
            sd = c.post("/sd", json=body(model="tiny-sd15"))
            assert xl.headers["x-worker"] != sd15_worker
            assert sd.headers["x-worker"] == sd15_worker
        metrics = c.get("/metrics").text
        assert 'craftserve_model_load_seconds_count{model="tiny-sd15"} 1.0' in metrics


# ---- failures ---------------------------------------------------------------------------
def test_out_of_memory_retries_with_sliced_and_tiled_decoding(make_server) -> None:
    """After an OOM the batch is retried with VAE slicing and tiles half the VAE's default,
    then one job at a time; the decode really takes the tiled path (diffusers' default tile
    is the VAE's sample size, larger than any latent the API allows, so plain tiling would
    change nothing), and the VAE is as before afterwards."""
    server = make_server(max_batch=4, batch_window_ms=300)
    engine = server.app.state.engine
    worker = engine.workers[0]
    pipe = worker.models["tiny-sdxl"].pipe
    vae = pipe.vae
    calls: list[tuple[int, bool, bool]] = []
    tiled: list[tuple[int, ...]] = []
    original = type(pipe).__call__
    original_tiled = vae.tiled_decode
    defaults = (vae.tile_sample_min_size, vae.tile_latent_min_size)

    def fragile(self, *args, **kwargs):
        calls.append((len(kwargs["prompt"]), bool(self.vae.use_slicing), bool(self.vae.use_tiling)))
        if len(kwargs["prompt"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, *args, **kwargs)

    def spy_tiled(z, *args, **kwargs):
        tiled.append(tuple(z.shape))
        return original_tiled(z, *args, **kwargs)

    # 128 px: latents of 16, more than the tiny VAE's default tile (16) halved.
    size = {"width": 128, "height": 128}
    held = HeldWorker(worker)
    type(pipe).__call__ = fragile
    vae.tiled_decode = spy_tiled
    try:
        with server.client() as c, ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(c.post, "/sd", json=body(seed=1, **size))
            wait_for(lambda: worker.running)
            futures = [pool.submit(c.post, "/sd", json=body(seed=s, **size)) for s in (2, 3, 4)]
            wait_for(lambda: len(engine.queue) == 3)
            held.release()
            assert png(blocker.result()).size == (128, 128)
            assert all(png(f.result()).size == (128, 128) for f in futures)
    finally:
        type(pipe).__call__ = original
        del vae.tiled_decode
        held.restore()
    assert calls == [(1, False, False), (3, False, False), (3, True, True),
                     (1, True, True), (1, True, True), (1, True, True)]
    assert len(tiled) == 3 and all(shape[-2:] == (16, 16) for shape in tiled)
    assert not vae.use_tiling and not vae.use_slicing
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == defaults


def test_out_of_memory_even_alone_is_503(server, client: httpx.Client) -> None:
    pipe = server.app.state.engine.workers[0].models["tiny-sdxl"].pipe
    original = type(pipe).__call__

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    type(pipe).__call__ = no_memory
    try:
        answer = client.post("/sd", json=body())
    finally:
        type(pipe).__call__ = original
    assert answer.status_code == 503
    assert "out of memory" in answer.json()["detail"]
    png(client.post("/sd", json=body()))


def test_failed_model_load_is_retried_later_not_every_request(
    make_server, tmp_path: Path, tiny_sd15_folder: Path
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    models = TINY_MODELS + f"  flaky:\n    source: {broken}\n"
    server = make_server(models, load_retry_s=1.0)
    engine = server.app.state.engine
    with server.client() as c:
        first = c.post("/sd", json=body(model="flaky"))
        assert first.status_code == 503
        assert "model 'flaky' cannot be served now" in first.json()["detail"]
        started = time.monotonic()
        again = c.post("/sd", json=body(model="flaky"))
        assert again.status_code == 503 and time.monotonic() - started < 0.5
        assert engine.queue.retry_after() >= 1
        shutil.rmtree(broken)
        shutil.copytree(tiny_sd15_folder, broken)
        time.sleep(1.1)
        png(c.post("/sd", json=body(model="flaky")))


def test_metrics_cover_queue_time_batches_images_errors(client: httpx.Client) -> None:
    png(client.post("/sd", json=body()))
    client.post("/sd", json=body(steps=99))
    text = client.get("/metrics").text
    for name in ("craftserve_queue_depth", "craftserve_queue_wait_seconds_bucket",
                 "craftserve_generation_seconds_bucket", "craftserve_batch_size_bucket",
                 'craftserve_images_total{model="tiny-sdxl",sampler="DPM++ 2M Karras"}',
                 'craftserve_errors_total{kind="invalid_parameter"}',
                 "craftserve_model_load_seconds_count", "craftserve_workers_ready"):
        assert name in text, name


def test_job_log_line_names_the_key_label_never_the_key(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="app.engine.worker"):
        png(client.post("/sd", json=body(seed=77)))
    lines = [r.getMessage() for r in caplog.records if "seed=77" in r.getMessage()]
    assert len(lines) == 1
    assert "client=key-" in lines[0] and "wait=" in lines[0] and "gen=" in lines[0]
    assert API_KEY not in caplog.text


def test_sizes_sharing_a_multiple_of_8_batch_and_keep_their_own_size(make_server) -> None:
    server = make_server(max_batch=4, batch_window_ms=300)
    held = HeldWorker(server.app.state.engine.workers[0])
    sizes = [(100, 70), (104, 72), (97, 65)]  # all generated at 104x72
    try:
        with server.client() as c, ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: held.worker.running)
            futures = [pool.submit(c.post, "/sd", json=body(width=w, height=h))
                       for w, h in sizes]
            wait_for(lambda: len(server.app.state.engine.queue) == 3)
            held.release()
            png(blocker.result())
            answers = [f.result() for f in futures]
    finally:
        held.restore()
    for (w, h), answer in zip(sizes, answers, strict=True):
        assert answer.headers["x-batch-size"] == "3"
        assert png(answer).size == (w, h)


def test_jobs_waiting_for_a_model_whose_load_fails_are_answered_with_it(
    make_server, tmp_path: Path
) -> None:
    """One load attempt for a burst: the jobs queued behind the failing one get its answer
    at once instead of one more failing load each."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    server = make_server(TINY_MODELS + f"  flaky:\n    source: {broken}\n", max_batch=1)
    engine = server.app.state.engine
    worker = engine.workers[0]
    loads: list[str] = []
    real_load = worker._load

    def counting_load(spec):
        loads.append(spec.name)
        return real_load(spec)

    held = HeldWorker(worker)
    worker._load = counting_load
    try:
        with server.client() as c, ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(c.post, "/sd", json=body())
            wait_for(lambda: worker.running)
            futures = [pool.submit(c.post, "/sd", json=body(model="flaky", seed=s))
                       for s in range(3)]
            wait_for(lambda: len(engine.queue) == 3)
            assert "craftserve_queue_depth 3.0" in c.get("/metrics").text
            held.release()
            png(blocker.result())
            answers = [f.result() for f in futures]
            assert "craftserve_queue_depth 0.0" in c.get("/metrics").text
    finally:
        held.restore()
        del worker._load
    assert loads == ["flaky"]
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert all("model 'flaky' cannot be served now" in a.json()["detail"] for a in answers)


def test_each_worker_thread_makes_its_gpu_the_current_device(monkeypatch) -> None:
    """Without torch.cuda.set_device in the worker thread, anything that uses the current
    device lands on cuda:0 whatever the worker's device. No GPU here: the call is recorded."""
    from app.config import Settings
    from app.engine.availability import LoadFailures
    from app.engine.worker import Worker
    from app.metrics import Metrics

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: calls.append((threading.current_thread().name, str(device))))
    queue = JobQueue(max_queue=4, max_batch=1, batch_window_s=0)
    workers = [
        Worker(f"w{i}", torch.device("cuda", i), queue=queue, settings=Settings(), specs={},
               metrics=Metrics(), failures=LoadFailures(60))
        for i in (0, 1)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        assert worker.preloaded.wait(10)
    queue.close()
    assert all(worker.join(10) for worker in workers)
    assert sorted(calls) == [("w0", "cuda:0"), ("w1", "cuda:1")]


def test_queue_deadline_is_answered_by_the_queue_while_no_worker_takes_jobs(loop) -> None:
    """The one deadline rule: a waiting job is answered 503 at its deadline by a timer on its
    event loop, even when no worker calls take() (all busy)."""
    queue = JobQueue(max_queue=4, max_batch=1, batch_window_s=0)
    job = Job(params=fake_params(1), client="a", loop=loop, deadline_s=0.05)
    queue.submit(job)
    with pytest.raises(Exception, match="longer than its deadline of 0.05 s") as info:
        loop.run_until_complete(asyncio.wait_for(job.future, 5))
    assert info.value.kind == "deadline" and info.value.status == 503
    assert len(queue) == 0


def test_an_answered_job_is_freed_before_its_deadline(loop) -> None:
    """The deadline timer holds a job weakly: once a job is taken and answered, nothing keeps
    it (and its image) alive until its deadline."""
    import gc
    import weakref

    from app.engine.jobs import JobResult

    queue = JobQueue(max_queue=4, max_batch=1, batch_window_s=0)
    job = Job(params=fake_params(1), client="a", loop=loop, deadline_s=3600)
    queue.submit(job)
    loop.run_until_complete(asyncio.sleep(0))  # the timer is armed on the loop
    (taken,) = queue.take(WorkerSlot("w"))
    taken.resolve(JobResult(image=bytearray(10**6), seed=1, sampler_label="Euler",
                            queue_wait_s=0, generation_s=0, batch_size=1))
    loop.run_until_complete(asyncio.sleep(0))
    assert job.future.done()
    ref = weakref.ref(job)
    del job, taken
    gc.collect()
    assert ref() is None


def test_jobs_of_a_client_and_their_progress(make_server) -> None:
    """What progress routes read: a client's own running and waiting jobs, and the steps done."""
    from app.auth import key_label

    server = make_server(max_batch=1, api_keys=[API_KEY, "other-key"])
    engine = server.app.state.engine
    held = HeldWorker(engine.workers[0])
    seen: list = []
    real = held.real

    def recording(model, jobs):
        seen.extend(jobs)
        return real(model, jobs)

    held.real = recording
    try:
        with server.client() as c, ThreadPoolExecutor(3) as pool:
            mine = pool.submit(c.post, "/sd", json=body(seed=1, steps=5))
            wait_for(lambda: held.worker.running)
            queued = pool.submit(c.post, "/sd", json=body(seed=2, steps=3))
            wait_for(lambda: len(engine.queue) == 1)
            theirs = pool.submit(c.post, "/sd", json=body(seed=3, token="other-key"))
            wait_for(lambda: len(engine.queue) == 2)
            assert [j.params.seed for j in engine.jobs_of(key_label(API_KEY))] == [1, 2]
            assert [j.params.seed for j in engine.jobs_of(key_label("other-key"))] == [3]
            assert engine.jobs_of("key-nobody") == []
            held.release()
            for future in (mine, queued, theirs):
                png(future.result())
    finally:
        held.restore()
    assert [(j.params.seed, j.step, j.params.steps) for j in seen] == [(1, 5, 5), (2, 3, 3), (3, 4, 4)]
