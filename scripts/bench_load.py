"""Single-file load against a diffusers folder: load time and peak RSS, measured in one run.

Writes a full-size checkpoint with random weights (speed and memory do not depend on values)
twice from the same seed: as one original-layout file (SGM SDXL / CompVis SD 1.x, through
tests/original_layout.py) and as a diffusers folder. Then loads each `--rounds` times, each
load in a fresh subprocess (peak RSS from the child's resource.getrusage), alternating, with
the files dropped from the page cache before every load (posix_fadvise DONTNEED) so both read
from disk alike. The single file goes through craftserve's loader (app.engine.single_file,
bundled configs and tokenizers); the folder through DiffusionPipeline.from_pretrained, both
on the CPU in `--dtype` (float16: the serving dtype on a GPU; the files are fp16 too). A load
counts until every weight has been read once: from_pretrained maps the files and would
otherwise read (and count in RSS) each page only at the first generation.

Targets: single-file peak RSS at most 1.5x the checkpoint's size in memory at that dtype, and
its load time within 1.3x of the folder's. Memory: the writer holds one component at a time
(SDXL's UNet, 5.1 GB); each load holds one model (6.9 GB for SDXL in fp16).

    .venv/bin/python scripts/bench_load.py [--family sdxl] [--rounds 2] [--dir /tmp/bench-load] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r})
import torch
kind, path, family, dtype = sys.argv[1:5]
dtype = getattr(torch, dtype)
started = time.perf_counter()
if kind == "single":
    from app.engine.single_file import load_single_file
    from app.registry import ModelSpec
    spec = ModelSpec(name="bench", source=path, kind="single_file", family=family, family_known=True,
                     default_sampler=None, dtype="auto", vae=None, preload=False)
    pipe = load_single_file(spec, dtype)
else:
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
# from_pretrained maps safetensors files and reads a page only when it is used: touch every
# weight, so both loads end with the model in memory, as serving needs it
with torch.no_grad():
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            for p in getattr(pipe, name).parameters():
                p.sum()
seconds = time.perf_counter() - started
params = sum(p.numel() * p.element_size() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
             if getattr(pipe, name, None) is not None for p in getattr(pipe, name).parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": seconds, "peak_rss": peak, "param_bytes": params}}))
"""


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache, so every load reads from disk."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def load(kind: str, path: Path, family: str, dtype: str) -> dict:
    code = CHILD.format(root=str(ROOT))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, kind, str(path), family, dtype],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(family: str, folder: Path) -> tuple[Path, Path, int]:
    single, diffusers_dir = folder / f"{family}-random.safetensors", folder / f"{family}-random-diffusers"
    if not single.exists() or not (diffusers_dir / "model_index.json").exists():
        shutil.rmtree(diffusers_dir, ignore_errors=True)
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
                "from tests.original_layout import write_random_checkpoint; "
                f"print(write_random_checkpoint({family!r}, {str(single)!r}, "
                f"diffusers_folder=Path({str(diffusers_dir)!r})))")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
        print(f"wrote {single.name} and {diffusers_dir.name}/ in {time.perf_counter() - started:.0f} s")
    return single, diffusers_dir, single.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sdxl", "sd15"], default="sdxl")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-load"))
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    single, folder, size = write(args.family, args.dir)
    results: dict[str, list[dict]] = {"single": [], "folder": []}
    for _ in range(args.rounds):
        for kind, path in (("single", single), ("folder", folder)):
            evict([single, folder])
            results[kind].append(load(kind, path, args.family, args.dtype))
    gb = 1e9
    model_bytes = results["single"][0]["param_bytes"]
    rows = {}
    for kind, runs in results.items():
        rows[kind] = (statistics.median(r["seconds"] for r in runs), max(r["peak_rss"] for r in runs))
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        print(f"{kind:>6}: load {rows[kind][0]:6.1f} s (runs {each}), peak RSS {rows[kind][1] / gb:5.2f} GB")
    print(f"checkpoint file {size / gb:.2f} GB; model in memory at {args.dtype}: {model_bytes / gb:.2f} GB")
    ratio_rss = rows["single"][1] / model_bytes
    ratio_time = rows["single"][0] / rows["folder"][0]
    print(f"single-file peak RSS / model size: {ratio_rss:.2f} (target <= 1.5)")
    print(f"single-file / folder load time: {ratio_time:.2f} (target <= 1.3)")
    if not args.keep:
        single.unlink()
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
