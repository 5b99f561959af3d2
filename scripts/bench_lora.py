#!/usr/bin/env python3
"""LoRA cost on the offline tiny-sdxl model, through the real server.

Starts `craftserve serve` on loopback with tiny LoRA files (written here, PEFT and kohya
formats) and times, side by side, 64×64 / 8-step requests:

  - no LoRA
  - first load: a LoRA never used before (the file is read and the adapter injected)
  - cached, same set: the LoRA used by the previous request again
  - cached switch: alternating between two cached LoRAs (only activation changes)

and prints what the target is stated in: the time a cached switch adds to a request
(switch vs the same request with its LoRA already active; target under 10 %), beside
what running with a LoRA at all costs. Absolute times on a shared CPU mean little.
Usage: .venv/bin/python scripts/bench_lora.py [--requests 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_http import KEY, Server  # noqa: E402

MODELS = """models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
lora_dirs: [{folder}]
"""


def write_loras(folder: Path, fresh: int) -> None:
    from app.engine.tiny import build_tiny_sdxl
    from tests.lora_files import write_kohya_lora, write_peft_lora

    pipe = build_tiny_sdxl()
    write_peft_lora(pipe, folder / "switch-a.safetensors", seed=1)
    write_kohya_lora(pipe, folder / "switch-b.safetensors", seed=2)
    for i in range(fresh):
        write_peft_lora(pipe, folder / f"fresh-{i}.safetensors", seed=10 + i)


def timed(client: httpx.Client, loras: dict, seed: int, steps: int) -> float:
    started = time.perf_counter()
    answer = client.post("/sd", json={"token": KEY, "model": "tiny-sdxl", "prompt": "a fox",
                                      "sampler": "Euler", "steps": steps, "width": 64,
                                      "height": 64, "seed": seed, "loras": loras})
    answer.raise_for_status()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per case")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "loras"
        folder.mkdir()
        write_loras(folder, fresh=n)
        server = Server(1, 0, Path(tmp), MODELS.format(folder=folder), lora_cache_size=str(n + 4))
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=300) as c:
                for seed in range(3):  # warm-up
                    timed(c, {}, seed, args.steps)
                    timed(c, {"switch-a": 1.0}, seed, args.steps)
                    timed(c, {"switch-b": 1.0}, seed, args.steps)
                cases: dict[str, list[float]] = {k: [] for k in
                                                 ("none", "first", "same", "switch")}
                # Interleave the cases so machine noise hits them alike.
                for i in range(n):
                    cases["none"].append(timed(c, {}, i, args.steps))
                    cases["first"].append(timed(c, {f"fresh-{i}": 1.0}, i, args.steps))
                    timed(c, {"switch-a": 1.0}, i, args.steps)
                    cases["same"].append(timed(c, {"switch-a": 1.0}, i, args.steps))
                    cases["switch"].append(timed(c, {"switch-b": 1.0}, i, args.steps))
        finally:
            server.stop()
    p50 = {k: statistics.median(v) * 1000 for k, v in cases.items()}
    print(f"{'no LoRA':>14} {'first load':>12} {'cached same':>12} {'cached switch':>14}   (p50 ms)")
    print(f"{p50['none']:14.1f} {p50['first']:12.1f} {p50['same']:12.1f} {p50['switch']:14.1f}")
    print()
    switch_cost = (p50["switch"] - p50["same"]) / p50["same"] * 100
    print(f"cached switch adds {switch_cost:+5.1f} % to a request     (target < 10 %: activation only,"
          " vs the same request with its LoRA already active)")
    print(f"running with a LoRA at all:   {p50['same'] / p50['none']:5.3f} x no LoRA (PEFT's extra "
          "matmuls; large on the tiny model)")
    print(f"cached switch / no LoRA:      {p50['switch'] / p50['none']:5.3f}")
    print(f"first load / no LoRA:         {p50['first'] / p50['none']:5.3f}")
    print(f"settings: tiny-sdxl 64x64, {args.steps} steps, {n} requests per case, one worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
