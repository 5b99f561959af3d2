#!/usr/bin/env python3
"""Ray Serve scale-out benchmark on the offline tiny-sdxl model (issue 13), in one run:

  - single-client p50 through Ray Serve (one CPU replica, 2 CPUs) vs the plain server
    (`craftserve serve`, same threads), requests alternated one by one, for bench_http's
    job (64x64, 8 steps: ~55 ms here) and a longer one (256x256, 20 steps)  target ≤ 1.15
    (Serve adds a fixed cost a request, two hops between processes: the ratio falls as the
    job grows)
  - images/s with C clients (8) for 1 replica (2 CPUs) vs 2 replicas (1 CPU each), on the
    same 2 cores, measured 1, 2, 1 so drift shows                       printed, see below

Both Ray layouts use the whole machine: one process with two threads, or two with one. On
a 2-core host a second replica adds no compute, only a second batch in flight and fewer
threads per operator; the gain it shows is that, not scale-out (on a GPU cluster each
replica brings its own GPU). Absolute times on a shared CPU mean little.

Usage: .venv/bin/python scripts/bench_scale.py [--pairs 40] [--clients 8] [--requests 64]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http import KEY, MODELS, Server, drive, free_port, post, summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def ray_app(models: Path, port: int, replicas: int, cpus: float) -> str:
    from app.cluster.deploy import deploy
    from app.config import Settings

    settings = Settings(models=models, api_keys=[KEY], port=port, log_level="warning",
                        max_queue=256, max_batch=4, ray_min_replicas=replicas,
                        ray_max_replicas=replicas, ray_cpus_per_replica=cpus,
                        ray_gpus_per_replica=0)
    url = deploy(settings)
    wait_ready(url, replicas)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="single-client requests to each")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--long-size", type=int, default=256, help="the longer job's side")
    parser.add_argument("--long-steps", type=int, default=20)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from app.cluster.deploy import undeploy

    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    models = workdir / "models.yaml"
    models.write_text(MODELS, encoding="utf-8")
    plain = Server(max_batch=4, window_ms=25, workdir=workdir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="craftserve",
             logging_level=logging.WARNING)
    port = free_port()
    try:
        plain.wait_ready()
        url = ray_app(models, port, replicas=1, cpus=2)
        # ---- single client, alternated request by request, two job lengths -------------
        shapes = [(args.size, args.steps), (args.long_size, args.long_steps)]
        p50: dict[tuple[int, int], dict[str, float]] = {}
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
                p50[size, steps] = {name: statistics.median(v) for name, v in times.items()}
        plain.stop()
        # ---- C clients: 1 replica, 2 replicas, 1 replica again ---------------------------
        runs = []
        for replicas, cpus in ((1, 2.0), (2, 1.0), (1, 2.0)):
            if runs:
                undeploy()
                url = ray_app(models, port, replicas=replicas, cpus=cpus)
            drive(url, args.clients, 8, args)  # warm
            latencies, wall = drive(url, args.clients, args.requests, args)
            runs.append((replicas, summary(latencies, wall)))
    finally:
        plain.stop()
        undeploy()
        serve.shutdown()
        ray.shutdown()

    print(f"bench_scale: tiny-sdxl {args.size}x{args.size}, {args.steps} steps, CPU "
          f"(2 cores), max batch 4")
    print(f"  single client, {args.pairs} requests each, alternated:")
    for (size, steps), times in p50.items():
        plain_ms, ray_ms = times["plain"] * 1000, times["ray"] * 1000
        print(f"    {size}x{size}, {steps:2d} steps: plain p50 {plain_ms:7.1f} ms, Ray Serve p50 "
              f"{ray_ms:7.1f} ms (+{ray_ms - plain_ms:.1f} ms), ratio {ray_ms / plain_ms:.3f} "
              "(target <= 1.15)")
    print(f"  {args.clients} clients, {args.requests} requests a run:")
    for replicas, s in runs:
        print(f"    {replicas} replica{'s' if replicas > 1 else ' '} ({2 // replicas} CPU each): "
              f"{s['ips']:6.2f} images/s, p50 {s['p50'] * 1000:7.1f} ms, p95 {s['p95'] * 1000:7.1f} ms")
    one = (runs[0][1]["ips"] + runs[2][1]["ips"]) / 2
    print(f"  images/s, 2 replicas / 1 replica (mean of the two 1-replica runs): "
          f"{runs[1][1]['ips'] / one:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
