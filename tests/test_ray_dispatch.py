"""The ingress's routing under Ray Serve (app.cluster.dispatch), without Ray: which replica
each job goes to, in which order, and when a model is loaded on another replica. The
expectations are worked out by hand from the rules in the module's docstring (slots per
replica, per-key turns, hot = waiting x seconds per image / holders > replicate_after_s,
models that differ stay apart); tests/test_ray.py checks the same on a real cluster."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from app.cluster.dispatch import REPORT_LAG_S, Dispatcher
from app.engine.jobs import Job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(loop, model: str = "m", client: str = "k") -> Job:
    return Job(params=SimpleNamespace(model=model), client=client, loop=loop, deadline_s=60)


def dispatcher(clock: Clock, replicas: dict[str, list[str]], **kwargs) -> Dispatcher:
    options = {"slots": 4, "max_models": 1, "max_batch": 2, "replicate_after_s": 2.0,
               "stay_s": 60.0, **kwargs}
    d = Dispatcher(clock=clock, **options)
    d.update({name: {"held": held, "alive": True, "preloaded": True} for name, held in replicas.items()})
    return d


def test_one_hot_model_on_two_holders_spreads_by_slots_and_the_rest_waits(loop) -> None:
    d = dispatcher(Clock(), {"a": ["m"], "b": ["m"]})
    jobs = [job(loop, client=f"k{i}") for i in range(32)]
    for j in jobs:
        d.add(j)
    placed = d.place()
    assert Counter(name for _, name in placed) == {"a": 4, "b": 4}  # slots = 4 each
    assert len(d) == 24 and d.in_flight == 8
    # a call on b ends: b (free, holding the model) gets the next job in fair order at once
    first_b = next(j for j, name in placed if name == "b")
    d.ended(first_b)
    again = d.place()
    assert again == [(jobs[8], "b")]


def test_keys_take_turns_across_the_cluster(loop) -> None:
    d = dispatcher(Clock(), {"a": ["m"]}, slots=1)
    flood = [job(loop, client="flood") for _ in range(5)]
    other = [job(loop, client="other") for _ in range(2)]
    for j in flood + other:
        d.add(j)
    order = []
    for _ in range(7):
        placed = d.place()
        assert len(placed) == 1
        order.append(placed[0][0])
        d.ended(placed[0][0])
    assert order == [flood[0], other[0], flood[1], other[1], flood[2], flood[3], flood[4]]


def test_a_hot_model_is_loaded_on_a_replica_with_a_free_place(loop) -> None:
    d = dispatcher(Clock(), {"a": ["m"], "b": []}, slots=2)
    d.measured("m", generation_s=2.0, batch_size=2)  # 1 s an image
    jobs = [job(loop, client=f"k{i}") for i in range(8)]
    for j in jobs:
        d.add(j)
    placed = Counter(name for _, name in d.place())
    # a takes 2; 6 wait, 6 x 1 s / 1 holder > 2 s: hot, so b loads m and takes 2
    assert placed == {"a": 2, "b": 2}
    assert d.replicas["b"].models == ["m"]


def test_a_model_that_drains_in_time_waits_for_its_holder(loop) -> None:
    d = dispatcher(Clock(), {"a": ["m"], "b": []}, slots=2)
    d.measured("m", generation_s=0.2, batch_size=2)  # 0.1 s an image
    for i in range(8):
        d.add(job(loop, client=f"k{i}"))
    # 6 waiting x 0.1 s = 0.6 s <= 2 s: not worth a load elsewhere
    assert Counter(name for _, name in d.place()) == {"a": 2}
    assert d.replicas["b"].models == []


def test_two_busy_models_on_two_replicas_stay_apart(loop) -> None:
    clock = Clock()
    d = dispatcher(clock, {"a": ["x"], "b": ["y"]}, slots=2)
    d.measured("x", 10.0, 1)  # x is very hot
    d.measured("y", 1.0, 1)
    xs = [job(loop, "x", f"x{i}") for i in range(20)]
    ys = [job(loop, "y", f"y{i}") for i in range(2)]
    for j in xs + ys:
        d.add(j)
    placed = d.place()
    assert Counter(name for _, name in placed) == {"a": 2, "b": 2}
    assert {j.params.model for j, name in placed if name == "b"} == {"y"}
    # y's calls end and nothing of y waits, but y was used on b within stay_s: x stays off b
    for j, name in placed:
        if name == "b":
            d.ended(j)
    clock.now += 30
    assert d.place() == [] and d.replicas["b"].models == ["y"]
    # once y has been idle there for stay_s, the hot x may take b
    clock.now += 31
    moved = d.place()
    assert [name for _, name in moved] == ["b", "b"] and d.replicas["b"].models == ["x"]


def test_a_cold_model_reserves_a_replica_and_gets_it_once_drained(loop) -> None:
    d = dispatcher(Clock(), {"a": ["x"], "b": ["x"]}, slots=2)
    d.measured("x", 0.01, 1)
    xs = [job(loop, "x", f"x{i}") for i in range(10)]
    for j in xs:
        d.add(j)
    first = d.place()
    assert len(first) == 4
    cold = job(loop, "y", "someone")
    d.add(cold)
    assert d.place() == []  # both replicas are full of x
    reserved = [v.name for v in d.replicas.values() if v.reserved_for == "y"]
    assert len(reserved) == 1
    r = reserved[0]
    other = "a" if r == "b" else "b"
    # x's calls on the reserved replica end one by one: no new x goes there meanwhile
    mine = [j for j, name in first if name == r]
    d.ended(mine[0])
    assert d.place() == []
    d.ended(mine[1])
    assert d.place() == [(cold, r)]
    assert d.replicas[r].models == ["y"] and d.replicas[other].models == ["x"]


def test_an_upscaling_job_takes_no_model_place(loop) -> None:
    d = dispatcher(Clock(), {"a": ["m"], "b": ["m"]}, slots=2)
    d.add(job(loop, "m", "k1"))
    d.place()
    upscale = job(loop, "", "k2")
    d.add(upscale)
    placed = d.place()
    assert len(placed) == 1 and placed[0][0] is upscale
    busy = next(n for n, v in d.replicas.items() if v.per_model["m"])
    assert placed[0][1] != busy  # the less loaded one
    assert all(v.models == ["m"] for v in d.replicas.values())


def test_the_board_replaces_the_mirror_only_when_idle_and_newer(loop) -> None:
    clock = Clock()
    d = dispatcher(clock, {"a": []}, slots=2, max_models=2)
    j = job(loop, "m")
    d.add(j)
    d.place()
    assert d.replicas["a"].models == ["m"]
    d.update({"a": {"held": [], "alive": True}})  # an old report: a call is in flight
    assert d.replicas["a"].models == ["m"]
    d.ended(j)
    d.update({"a": {"held": [], "alive": True}})  # idle, but the report may predate the send
    assert d.replicas["a"].models == ["m"]
    clock.now += REPORT_LAG_S + 0.1
    d.update({"a": {"held": ["n"], "alive": True}})  # e.g. a reload removed m
    assert d.replicas["a"].models == ["n"]
    d.update({})  # the replica is gone
    assert d.replicas == {}


# ---- builtin:sleep-sdxl, the load-testing model the scheduling benchmark runs on -----------
def test_the_sleep_model_takes_one_fixed_step_a_batch_whatever_its_size(tmp_path, monkeypatch) -> None:
    """Loaded as the worker loads it (CPU, batch-invariant wrapping asked for), its UNet
    sleeps SLEEP_STEP_S once a step for the whole batch (the wrapping would call it once per
    job): a batch of 4 sleeps as long as a batch of 1, and its time is sleep, not CPU."""
    import time

    import torch

    from app.engine import tiny
    from app.engine.determinism import jobs_in_call
    from app.engine.pipelines import load_model
    from app.registry import load_registry
    from tests.conftest import write_models_file

    models = write_models_file(tmp_path, "models:\n  s: {source: 'builtin:sleep-sdxl'}\n")
    spec = load_registry(models).models["s"]
    assert spec.family == "sdxl"
    pipe = load_model(spec, torch.device("cpu"), allow_downloads=False, lora_cache_size=1,
                      warm_batch_sizes=(1,)).pipe
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(tiny, "time", SimpleNamespace(sleep=sleep))
    steps = 6
    for batch in (1, 4):
        sleeps.clear()
        started, cpu = time.perf_counter(), time.process_time()
        with jobs_in_call(pipe, batch):  # as the worker calls a batch
            out = pipe(prompt=["p"] * batch, num_inference_steps=steps, width=64, height=64,
                       guidance_scale=7.0)
        wall, used = time.perf_counter() - started, time.process_time() - cpu
        assert len(out.images) == batch
        assert sleeps == [tiny.SLEEP_STEP_S] * steps  # once a step, whatever the batch
        assert wall >= steps * tiny.SLEEP_STEP_S
        assert used < wall  # mostly asleep (the tiny text encoders and VAE use a little)


def test_two_hot_models_on_four_replicas_do_not_take_each_others_replicas(loop) -> None:
    """Each model held by two replicas, both hot (backlogs far beyond what their holders
    drain in 2 s): neither is loaded on the other's replicas, however long it goes on."""
    clock = Clock()
    d = dispatcher(clock, {"a1": ["x"], "a2": ["x"], "b1": ["y"], "b2": ["y"]}, slots=2)
    d.measured("x", 1.0, 1)
    d.measured("y", 1.0, 1)
    for i in range(40):
        d.add(job(loop, "x" if i % 2 else "y", f"c{i}"))
    for _ in range(30):  # every replica finishes a call, a second later, again and again
        for j, _name in d.place():
            d.ended(j)
        clock.now += 1
        d.add(job(loop, "x", "more-x"))
        d.add(job(loop, "y", "more-y"))
    assert {n: v.models for n, v in d.replicas.items()} == {
        "a1": ["x"], "a2": ["x"], "b1": ["y"], "b2": ["y"]}
