#!/usr/bin/env python3
"""Ray Serve scale-out benchmark (issues 13 and 22), in one run:

  1. single-client p50 through Ray Serve (one CPU replica) vs the plain server (`craftserve
     serve`), requests alternated one by one, on tiny-sdxl for bench_http's job (64x64, 8
     steps) and a longer one (256x256, 20 steps)                       target <= 1.15
  2. scheduling: images/s at 1, 2 and 4 replicas under a saturating load (closed-loop
     clients, each its own key, more than the replicas hold), each as a ratio to one replica:
     a. one hot model, not preloaded (the first requests load it; hot-model replication
        spreads it)                                   targets: 2 replicas >= 1.8, 4 >= 3.4
     b. two models, half the clients each, MAX_MODELS_PER_DEVICE=1
     with, for each run, the share of the jobs the busiest replica ran, how often (sampled
     every 0.1 s from /ready) a replica had nothing in flight while jobs waited at the
     ingress, and the model loads each replica made while measured (two models, 2 replicas:
     target at most one load per replica per minute).

Part 2 uses `builtin:sleep-sdxl`, a load-testing model (not an image model): each denoising
step sleeps a fixed 50 ms for the whole batch and uses no CPU, as a step on a GPU does, so 4
replicas can be measured on a 2-core host. MAX_BATCH 4, 20 steps: one batch takes ~1.05 s,
so one replica makes ~3.8 images/s at most.

Usage: .venv/bin/python scripts/bench_scale.py [--pairs 40] [--seconds 20] [--skip-single]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http import KEY, MODELS, Server, free_port, post  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SLEEP_MODELS = ("models:\n  hot: {source: 'builtin:sleep-sdxl'}\n"
                "  other: {source: 'builtin:sleep-sdxl'}\n")
CLIENT_KEYS = [f"bench-client-{i:03d}" for i in range(128)]


def wait_ready(url: str, replicas: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = httpx.get(url + "/ready", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=5).json()
            if state["ready"] and len(state["workers"]) == replicas:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the Ray app was not ready with {replicas} replicas in time")


def ray_app(models: Path, port: int, replicas: int, cpus: float, **settings) -> str:
    from app.cluster.deploy import deploy
    from app.config import Settings

    values = {"max_queue": 256, "max_batch": 4, **settings}
    config = Settings(models=models, api_keys=[KEY, *CLIENT_KEYS], port=port, log_level="warning",
                      ray_min_replicas=replicas, ray_max_replicas=replicas,
                      ray_cpus_per_replica=cpus, ray_gpus_per_replica=0, ray_max_queued=512,
                      auth_failures_per_minute=0, **values)
    url = deploy(config)
    wait_ready(url, replicas)
    return url


class Load:
    """Closed-loop clients, each with its own key, sending `model_of(i)` jobs until stopped;
    answers are counted from `measure_from` on, by replica."""

    def __init__(self, url: str, clients: int, model_of, steps: int) -> None:  # noqa: ANN001
        self.url, self.clients, self.model_of, self.steps = url, clients, model_of, steps
        self.stop = threading.Event()
        self.measuring = threading.Event()
        self.done: Counter[str] = Counter()
        self.errors: Counter[int] = Counter()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(clients)]

    def _client(self, index: int) -> None:
        body = {"token": CLIENT_KEYS[index], "model": self.model_of(index), "prompt": "load",
                "sampler": "Euler", "steps": self.steps, "width": 64, "height": 64, "cfg_scale": 7}
        with httpx.Client(base_url=self.url, timeout=300) as c:
            seed = index * 100_000
            while not self.stop.is_set():
                seed += 1
                answer = c.post("/sd", json={**body, "seed": seed})
                if not self.measuring.is_set():
                    continue
                if answer.status_code == 200:
                    self.done[answer.headers.get("x-worker", "?")] += 1
                else:
                    self.errors[answer.status_code] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def watch(url: str, stop: threading.Event, out: dict) -> None:
    """Sample /ready every 0.1 s: samples where a replica had nothing in flight while jobs
    waited at the ingress, and each replica's model loads (a model appearing in its list)."""
    samples = idle = 0
    loads: Counter[str] = Counter()
    last: dict[str, set[str]] = {}
    with httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as c:
        while not stop.is_set():
            try:
                state = c.get("/ready").json()
            except (httpx.HTTPError, ValueError):
                continue
            samples += 1
            workers = state["workers"]
            if state.get("ingress_waiting", 0) > 0 and any(w["in_flight"] == 0 for w in workers):
                idle += 1
            for w in workers:
                now = set(w["models"])
                if w["name"] in last:
                    loads[w["name"]] += len(now - last[w["name"]])
                last[w["name"]] = now
            time.sleep(0.1)
    out.update(samples=samples, idle=idle, loads=loads)


def scheduling_run(models: Path, port: int, replicas: int, two_models: bool,
                   args: argparse.Namespace) -> dict:
    from app.cluster.deploy import undeploy

    url = ray_app(models, port, replicas, cpus=0, max_models_per_device=1)
    clients = max(args.min_clients, 3 * replicas * 8)  # 3 x what the replicas hold (slots 8)
    model_of = (lambda i: "hot" if i % 2 == 0 else "other") if two_models else (lambda i: "hot")
    try:
        with Load(url, clients, model_of, args.sleep_steps) as load:
            time.sleep(args.warm)  # the models load (hot one replicated), queues fill
            stop, seen = threading.Event(), {}
            watcher = threading.Thread(target=watch, args=(url, stop, seen))
            watcher.start()
            load.measuring.set()
            started = time.perf_counter()
            time.sleep(args.seconds)
            load.measuring.clear()
            wall = time.perf_counter() - started
            stop.set()
            watcher.join()
    finally:
        undeploy()
    images = sum(load.done.values())
    return {"replicas": replicas, "clients": clients, "ips": images / wall, "images": images,
            "busiest": max(load.done.values()) / images if images else 0.0,
            "per_replica": sorted(load.done.values(), reverse=True), "errors": dict(load.errors),
            "idle": seen["idle"] / max(1, seen["samples"]), "wall": wall,
            "loads_per_min": max(seen["loads"].values(), default=0) * 60 / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="single-client requests to each")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--long-size", type=int, default=256, help="the longer job's side")
    parser.add_argument("--long-steps", type=int, default=20)
    parser.add_argument("--skip-single", action="store_true", help="only the scheduling runs")
    parser.add_argument("--seconds", type=float, default=20, help="measured time per run")
    parser.add_argument("--warm", type=float, default=8, help="load before measuring, per run")
    parser.add_argument("--sleep-steps", type=int, default=20)
    parser.add_argument("--min-clients", type=int, default=12)
    parser.add_argument("--replicas", default="1,2,4")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from app.cluster.deploy import undeploy

    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    tiny = workdir / "models.yaml"
    tiny.write_text(MODELS, encoding="utf-8")
    sleepy = workdir / "sleep-models.yaml"
    sleepy.write_text(SLEEP_MODELS, encoding="utf-8")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="craftserve",
             logging_level=logging.WARNING)
    p50: dict[tuple[int, int], dict[str, float]] = {}
    runs: dict[str, list[dict]] = {"one hot model": [], "two models": []}
    counts = [int(n) for n in args.replicas.split(",")]
    port = free_port()  # Serve's proxy keeps the port it started on: one for every run
    try:
        if not args.skip_single:
            plain = Server(max_batch=4, window_ms=25, workdir=workdir)
            try:
                plain.wait_ready()
                url = ray_app(tiny, port, replicas=1, cpus=2)
                shapes = [(args.size, args.steps), (args.long_size, args.long_steps)]
                with httpx.Client(base_url=plain.url, timeout=300) as p, \
                        httpx.Client(base_url=url, timeout=300) as r:
                    for size, steps in shapes:
                        shape = argparse.Namespace(size=size, steps=steps)
                        times: dict[str, list[float]] = {"plain": [], "ray": []}
                        for seed in range(5):  # warm both
                            post(p, seed, shape)
                            post(r, seed, shape)
                        for i in range(args.pairs):
                            order = [("plain", p), ("ray", r)] if i % 2 else [("ray", r), ("plain", p)]
                            for name, client in order:
                                times[name].append(post(client, 100 + i, shape))
                        p50[size, steps] = {n: statistics.median(v) for n, v in times.items()}
                        print(f"  ... single client {size}x{size}, {steps} steps: "
                              f"{p50[size, steps]}", flush=True)
            finally:
                plain.stop()
                undeploy()
        for name, two in (("one hot model", False), ("two models", True)):
            for replicas in counts:
                runs[name].append(scheduling_run(sleepy, port, replicas, two, args))
                print(f"  ... {name}, {replicas} replica(s): {runs[name][-1]['ips']:.2f} images/s",
                      flush=True)
    finally:
        undeploy()
        serve.shutdown()
        ray.shutdown()

    if p50:
        print("bench_scale: single client, tiny-sdxl on the CPU (2 cores), "
              f"{args.pairs} requests each, alternated:")
        for (size, steps), times in p50.items():
            plain_ms, ray_ms = times["plain"] * 1000, times["ray"] * 1000
            print(f"  {size}x{size}, {steps:2d} steps: plain p50 {plain_ms:7.1f} ms, Ray Serve p50 "
                  f"{ray_ms:7.1f} ms (+{ray_ms - plain_ms:.1f} ms), ratio {ray_ms / plain_ms:.3f} "
                  "(target <= 1.15)")
    print(f"bench_scale: scheduling, builtin:sleep-sdxl ({args.sleep_steps} steps x 50 ms, "
          f"max batch 4, 8 slots a replica), {args.seconds:g} s measured after {args.warm:g} s")
    targets = {2: 1.8, 4: 3.4}
    for name, results in runs.items():
        if not results:
            continue
        base = results[0]["ips"] if results[0]["replicas"] == 1 else None
        print(f"  {name}:")
        for r in results:
            ratio = f"{r['ips'] / base:4.2f}x" if base else "  -  "
            target = (f" (target >= {targets[r['replicas']]})"
                      if name == "one hot model" and r["replicas"] in targets else "")
            print(f"    {r['replicas']} replica{'s' if r['replicas'] > 1 else ' '}, {r['clients']:3d} "
                  f"clients: {r['ips']:6.2f} images/s, {ratio} one replica{target}; busiest "
                  f"replica {r['busiest'] * 100:3.0f} % of {r['images']} jobs; a replica idle "
                  f"while jobs waited: {r['idle'] * 100:4.1f} % of samples; most loads on one "
                  f"replica: {r['loads_per_min']:.1f}/min; errors {r['errors'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
