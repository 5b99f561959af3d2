"""Idle connections against a fresh client: does the server stay responsive?

Starts `craftserve serve` on the tiny model (its own process, default settings but the
given idle timeout), measures a fresh client's GET /health and a small POST /sd with no other
connection open, then opens N idle TCP connections (connected, sending nothing, as a slowloris
client does), measures the fresh client again, and finally counts how many of the idle ones the
server has closed after 2 x IDLE_TIMEOUT_S + 1 s.

    python scripts/bench_idle.py --connections 10000 --idle-timeout 10

Prints the medians and the ratio loaded / unloaded. The client raises its own file-descriptor
limit to its hard limit; the server inherits it (each idle connection costs the server one
descriptor until it closes it: `ulimit -n` bounds how many can be open at once).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-idle-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(client: httpx.Client, rounds: int) -> tuple[float, float]:
    health, generate = [], []
    body = {"token": KEY, "model": "tiny-sdxl", "prompt": "a lighthouse", "steps": 2,
            "width": 64, "height": 64, "seed": 1}
    for _ in range(rounds):
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        health.append(time.perf_counter() - started)
        started = time.perf_counter()
        answer = client.post("/sd", json=body)
        assert answer.status_code == 200, answer.text
        generate.append(time.perf_counter() - started)
    return statistics.median(health), statistics.median(generate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--idle-timeout", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wanted = args.connections + 256
    if wanted > hard:
        print(f"the file-descriptor limit is {hard}: at most {hard - 256} connections")
        args.connections = hard - 256
    folder = Path(tempfile.mkdtemp())
    (folder / "models.yaml").write_text("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n")
    port = _free_port()
    env = dict(os.environ, CRAFTSERVE_API_KEYS=KEY, CRAFTSERVE_LOG_LEVEL="warning",
               CRAFTSERVE_IDLE_TIMEOUT_S=str(args.idle_timeout))
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                               "--models", str(folder / "models.yaml")], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as client:
            _timed(client, 2)  # warm-up: first calls pay lazy imports and allocator growth
            base_health, base_generate = _timed(client, args.rounds)
        started = time.perf_counter()
        for _ in range(args.connections):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        opened_s = time.perf_counter() - started
        with httpx.Client(base_url=url, timeout=60) as client:  # a fresh client, new connection
            load_health, load_generate = _timed(client, args.rounds)
        time.sleep(2 * args.idle_timeout + 1)
        closed = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        print(f"idle connections opened: {len(idle)} in {opened_s:.1f} s")
        print(f"fresh client, GET /health median: {base_health * 1000:.1f} ms alone, "
              f"{load_health * 1000:.1f} ms with the idle connections open "
              f"(ratio {load_health / base_health:.2f})")
        print(f"fresh client, POST /sd 64x64 2 steps median: {base_generate * 1000:.1f} ms alone, "
              f"{load_generate * 1000:.1f} ms with them (ratio {load_generate / base_generate:.2f})")
        print(f"closed by the server {2 * args.idle_timeout + 1:.0f} s later: {closed} of {len(idle)}")
    finally:
        for sock in idle:
            sock.close()
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
