#!/usr/bin/env python3
"""What make_scheduler costs beside building the scheduler with from_config directly.

For every sampler at every schedule (on the SDXL scheduler config), times
app.engine.schedulers.make_scheduler (a deep copy of a cached prototype; seeded samplers are
built with their seed) against ``Cls.from_config(config, **options)`` for the same choice, the
two alternated call by call (which goes first alternates too), so that a noisy host slows both
alike. Prints, per kind, the time per call of each and their ratio measured in this one run;
absolute times on a shared CPU mean little.
Usage: .venv/bin/python scripts/bench_samplers.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402

from app.engine.schedulers import _scheduler_config, make_scheduler  # noqa: E402
from app.samplers import (  # noqa: E402
    SAMPLERS,
    SamplerChoice,
    comfy_scheduler_names,
    resolve_sampler,
    scheduler_plan,
)


def direct(choice: SamplerChoice, base_config: dict, seed: int) -> object:
    """The scheduler built without make_scheduler's cache."""
    cls_name, options, seed_option = scheduler_plan(choice)
    cls = getattr(diffusers, cls_name)
    seeding = {seed_option: seed} if seed_option else {}
    return cls.from_config(_scheduler_config(cls, base_config), **options, **seeding)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of each per choice")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    scheduler_file = ROOT / "app" / "configs" / "sdxl" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_file.read_text())
    choices = [
        resolve_sampler(entry.name if entry.a1111 else entry.comfy[0], schedule)
        for entry in SAMPLERS
        for schedule in comfy_scheduler_names()
    ]
    for choice in choices:  # first builds (prototypes, imports) are not what is measured
        make_scheduler(choice, config, 1)
        direct(choice, config, 1)

    timings: dict[bool, dict[str, list[float]]] = {
        seeded: {"make_scheduler": [], "from_config": []} for seeded in (False, True)
    }
    calls = [("make_scheduler", make_scheduler), ("from_config", direct)]
    for round_ in range(args.rounds):
        for i, choice in enumerate(choices):
            order = calls if (round_ + i) % 2 == 0 else calls[::-1]
            for name, build in order:
                started = time.perf_counter()
                build(choice, config, 1000 + i)
                timings[choice.seeded_scheduler][name].append(time.perf_counter() - started)

    print(f"{len(choices)} choices x {args.rounds} rounds, alternated call by call")
    for seeded, kind in ((False, "copied from a prototype"), (True, "seeded, built with the seed")):
        made, built = timings[seeded]["make_scheduler"], timings[seeded]["from_config"]
        if not made:
            continue
        ratios = [m / b for m, b in zip(made, built, strict=True)]
        print(
            f"{kind:<28} n={len(made):<4} make_scheduler {statistics.mean(made) * 1e3:8.3f} ms/call   "
            f"from_config {statistics.mean(built) * 1e3:8.3f} ms/call   "
            f"ratio {sum(made) / sum(built):.4f} (median per pair {statistics.median(ratios):.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
