"""Cold burst: does the first burst of concurrent requests after /ready cost more than later ones?

The engine runs every batch size 1..MAX_BATCH once while a model loads (app.engine.pipelines),
so the first burst should pay no one-time costs. This starts the real server (tiny SDXL, CPU),
waits for /ready, then sends `--bursts` bursts of `--size` concurrent requests (two API keys,
as two clients would) and prints each burst's slowest latency and the ratio first / median of
the later ones, measured in one run. Target: a ratio near 1 (the host is noisy: within 1.5).

    .venv/bin/python scripts/bench_cold.py [--bursts 5] [--size 4] [--px 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from tests.live import LiveServer  # noqa: E402

KEYS = ["bench-key-a", "bench-key-b"]


def burst(url: str, size: int, px: int, steps: int, seed0: int) -> float:
    """The slowest of `size` concurrent requests, in seconds (all must answer 200)."""
    times: list[float] = []
    failures: list[str] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        answer = httpx.post(url + "/sd", timeout=600, json={
            "token": KEYS[i % 2], "model": "tiny-sdxl", "prompt": "a lighthouse", "steps": steps,
            "width": px, "height": px, "seed": seed0 + i, "sampler": "DPM++ 2M Karras",
        })
        times.append(time.perf_counter() - started)
        if answer.status_code != 200:
            failures.append(answer.text[:200])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"a request failed: {failures[0]}")
    return max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--size", type=int, default=4, help="concurrent requests a burst (MAX_BATCH 4)")
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    (folder / "models.yaml").write_text(
        "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n", encoding="utf-8")
    server = LiveServer(Settings(models=folder / "models.yaml", api_keys=KEYS)).start()
    try:
        state = server.wait_ready()
        if not state.get("ready"):
            raise SystemExit(f"not ready: {state}")
        slowest = [burst(server.url, args.size, args.px, args.steps, 100 * b) for b in range(args.bursts)]
    finally:
        server.stop()
    later = statistics.median(slowest[1:])
    print(f"bursts of {args.size} x {args.px}px, {args.steps} steps: slowest per burst "
          + ", ".join(f"{s:.2f}s" for s in slowest))
    print(f"first burst / median later burst: {slowest[0] / later:.2f}")


if __name__ == "__main__":
    main()
