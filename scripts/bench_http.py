#!/usr/bin/env python3
"""HTTP serving benchmark on the offline tiny-sdxl model.

Starts `craftserve serve` as a real subprocess on loopback, drives it with C concurrent
clients (64×64, 8 steps by default), and runs the same jobs directly on the pipeline
in-process. In one run it measures, with batching on (max batch B) and off (max batch 1):

  - 1 client:  p50/p95 latency and images/s
  - C clients: p50/p95 latency and images/s

and prints the ratios the targets are stated in:

  - single-client server p50 / direct pipeline p50       target ≤ 1.10
  - C-client images/s, batching on / off                  target ≥ 2.5
    (also with CRAFTSERVE_CPU_EXACT_BATCHES=false: on the CPU, exact batches run the
    networks once per job, so the tiny model's batching gain mostly comes from there)
  - single-client p50, batching on / off                  target within ±10 %

Absolute times on a shared CPU mean little; the ratios are measured in the same run.
Usage: .venv/bin/python scripts/bench_http.py [--clients 8] [--requests 48] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
MODELS = "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, max_batch: int, window_ms: float, workdir: Path, models_text: str = MODELS,
                 **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        models = workdir / "models.yaml"
        models.write_text(models_text, encoding="utf-8")
        env = dict(os.environ, CRAFTSERVE_API_KEYS=KEY, CRAFTSERVE_MAX_BATCH=str(max_batch),
                   CRAFTSERVE_BATCH_WINDOW_MS=str(window_ms), CRAFTSERVE_LOG_LEVEL="warning",
                   CRAFTSERVE_MAX_QUEUE="256", **{f"CRAFTSERVE_{k.upper()}": v for k, v in settings.items()})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port),
             "--models", str(models)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def job(seed: int, args: argparse.Namespace) -> dict:
    return {"token": KEY, "model": "tiny-sdxl", "prompt": f"a lighthouse, variant {seed}",
            "sampler": "Euler", "steps": args.steps, "width": args.size, "height": args.size,
            "cfg_scale": 7, "seed": seed}


def post(client: httpx.Client, seed: int, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    client.post("/sd", json=job(seed, args)).raise_for_status()
    return time.perf_counter() - started


def drive(url: str, clients: int, requests: int, args: argparse.Namespace) -> tuple[list, float]:
    """`requests` requests from `clients` concurrent clients: (latencies, wall seconds)."""
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as c:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(lambda seed: post(c, seed, args),
                                      range(1000, 1000 + requests)))
        return latencies, time.perf_counter() - started


def summary(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": statistics.median(ordered), "p95": p95, "ips": len(ordered) / wall,
            "n": len(ordered)}


def direct_runner(args: argparse.Namespace):
    """The same job straight on the pipeline, in this process: the floor for the server."""
    import torch

    from app.engine.schedulers import make_scheduler
    from app.engine.tiny import build_tiny_sdxl
    from app.samplers import resolve_sampler

    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    choice = resolve_sampler("Euler")

    def run(seed: int) -> float:
        started = time.perf_counter()
        pipe.scheduler = make_scheduler(choice, config, seed)
        pipe(prompt=f"a lighthouse, variant {seed}", num_inference_steps=args.steps,
             width=args.size, height=args.size, guidance_scale=7.0,
             generator=torch.Generator("cpu").manual_seed(seed))
        return time.perf_counter() - started

    return run


def fmt(name: str, r: dict) -> str:
    return (f"{name:<48} p50 {r['p50'] * 1000:8.1f} ms   p95 {r['p95'] * 1000:8.1f} ms   "
            f"{r['ips']:7.2f} images/s   (n={r['n']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="timed requests per scenario")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--window-ms", type=float, default=25.0)
    args = parser.parse_args()
    started = time.perf_counter()
    run_direct = direct_runner(args)
    configs = {  # name: (max batch, CPU exact batches)
        "batching": (args.max_batch, "true"),
        "batching, CPU exactness off": (args.max_batch, "false"),
        "no batching": (1, "true"),
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for name, (max_batch, exact) in configs.items():
                folder = Path(tmp) / str(len(servers))
                folder.mkdir()
                servers[name] = Server(max_batch, args.window_ms, folder,
                                       cpu_exact_batches=exact)
            for server in servers.values():
                server.wait_ready()
            clients = {n: httpx.Client(base_url=s.url, timeout=300) for n, s in servers.items()}
            # One client: direct and servers interleaved, so drift in machine speed hits all.
            single: dict[str, list[float]] = {"direct": [], "batching": [], "no batching": []}
            for seed in range(-3, args.requests):
                times = {"direct": run_direct(seed + 3000),
                         "batching": post(clients["batching"], seed + 3000, args),
                         "no batching": post(clients["no batching"], seed + 3000, args)}
                if seed >= 0:  # the first three are warm-up
                    for name, value in times.items():
                        single[name].append(value)
            for name, values in single.items():
                label = "direct pipeline" if name == "direct" else f"server {name}"
                results[f"{name}, 1"] = summary(values, sum(values))
                print(fmt(f"{label}, 1 client", results[f"{name}, 1"]), flush=True)
            # C clients: each configuration in turn, twice (ABCABC), to average drift.
            many: dict[str, tuple[list, float]] = {name: ([], 0.0) for name in servers}
            for _ in range(2):
                for name, server in servers.items():
                    lat, wall = drive(server.url, args.clients, args.requests // 2, args)
                    many[name] = (many[name][0] + lat, many[name][1] + wall)
            for name, (lat, wall) in many.items():
                results[f"{name}, C"] = summary(lat, wall)
                print(fmt(f"server {name}, {args.clients} clients", results[f"{name}, C"]))
            for client in clients.values():
                client.close()
        finally:
            for server in servers.values():
                server.stop()
    c = args.clients
    single = results["batching, 1"]["p50"] / results["direct, 1"]["p50"]
    none_ips = results["no batching, C"]["ips"]
    speedup = results["batching, C"]["ips"] / none_ips
    fast = results["batching, CPU exactness off, C"]["ips"] / none_ips
    p50_change = results["batching, 1"]["p50"] / results["no batching, 1"]["p50"]
    print()
    print(f"single-client server p50 / direct p50:       {single:5.3f}   (target ≤ 1.10)")
    print(f"{c}-client images/s, batching on / off:       {speedup:5.2f}x  (target ≥ 2.5)")
    print(f"  the same with CPU exactness off:            {fast:5.2f}x")
    print(f"single-client p50, batching on / off:        {p50_change:5.3f}   (target 0.90–1.10)")
    print(f"settings: {args.size}x{args.size}, {args.steps} steps, max batch {args.max_batch}, "
          f"window {args.window_ms:g} ms, {os.cpu_count()} CPUs; total "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
