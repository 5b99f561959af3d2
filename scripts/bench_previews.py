"""What previews cost: the time spent making "Approx cheap" previews (latent → RGB projection
on the worker, plus the PNG encode the event loop does off-thread) over the generation time.

    python scripts/bench_previews.py [--steps 30] [--size 512] [--every 5] [--model tiny-sdxl]

Runs the pipeline twice with the same seed: once with the job API's preview hook every
`--every` steps, once without; prints both times, the time spent in preview work and the
ratio (the issue asks for under 2 %). Defaults use the built-in tiny SDXL on the CPU; on a
real model and a GPU pass --model-path to a diffusers folder.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from app.engine.previews import approx_cheap  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--model-path", default=None, help="a diffusers SDXL folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.model_path:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(args.model_path, torch_dtype=torch.float16)
    else:
        from app.engine.tiny import build_tiny_sdxl

        pipe = build_tiny_sdxl()
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    spent = [0.0]

    def hook(pipe, step, timestep, kwargs):  # noqa: ANN001, ANN202
        if (step + 1) % args.every == 0:
            started = time.perf_counter()
            rgb = approx_cheap(kwargs["latents"][0], sdxl=True)
            buffer = io.BytesIO()
            Image.fromarray(rgb.numpy()).save(buffer, format="PNG", compress_level=1)
            spent[0] += time.perf_counter() - started
        return kwargs

    def run(callback) -> float:  # noqa: ANN001
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(prompt="a lighthouse at dusk", num_inference_steps=args.steps, width=args.size,
             height=args.size, generator=torch.Generator("cpu").manual_seed(1),
             callback_on_step_end=callback)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run(None)  # warm up
    plain = run(None)
    with_previews = run(hook)
    previews = args.steps // args.every
    print(f"steps {args.steps}, {args.size}x{args.size}, device {args.device}, "
          f"{previews} previews (every {args.every} steps)")
    print(f"generation without previews: {plain:.3f} s; with previews: {with_previews:.3f} s")
    print(f"time in preview work: {spent[0] * 1000:.2f} ms "
          f"({spent[0] / max(previews, 1) * 1000:.2f} ms a preview)")
    print(f"preview overhead ratio (preview work / generation): {spent[0] / with_previews:.4%}")


if __name__ == "__main__":
    main()
