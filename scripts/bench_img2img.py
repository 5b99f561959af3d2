"""Image to image: what strength costs, what batching gains, and whether decoding pictures
blocks the event loop. Three figures, each a ratio or a bound measured in one run:

1. img2img at strength s against txt2img of the same steps, paired (alternating, `--rounds`
   each): the ratio should be about s plus the VAE encode (diffusers runs int(steps x s) steps).
2. 8 clients' compatible img2img jobs (each its own picture and seed) as one batch against the
   same jobs one at a time, with GPU-like batching (CRAFTSERVE_CPU_EXACT_BATCHES=false: the
   networks see the whole batch, as on a GPU): target >= 3x on the tiny model.
3. The event loop's worst lateness (a 5 ms probe timer) while 8 requests' 1024x1024 PNGs are
   parsed from their JSON bodies, decoded and prepared as the routes do it, all at once
   (app.api.bodies, app.image_inputs, app.api.generation.prepare_sources): target <= 50 ms.

    .venv/bin/python scripts/bench_img2img.py [--strength 0.5] [--steps 20] [--rounds 5]
        [--size 256] [--model builtin:tiny-sdxl | builtin:random-sdxl]

`builtin:random-sdxl` is SDXL's full-size architecture with random weights (speed does not
depend on the values): on the CPU keep --size small (e.g. 128) and --steps low.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def picture(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def load(source: str, exact: bool):  # noqa: ANN201
    from app.engine.pipelines import load_model
    from app.registry import ModelSpec

    spec = ModelSpec(name="bench", source=source, kind="builtin", family="sdxl", family_known=True,
                     default_sampler=None, dtype="auto", vae=None, preload=False)
    return load_model(spec, torch.device("cpu"), allow_downloads=False, lora_cache_size=1,
                      exact_batches=exact)


class _Worker:
    """The worker's generation code without its thread and queue."""

    def __new__(cls):  # noqa: ANN204
        from app.engine.upscalers import Upscalers
        from app.engine.worker import Worker

        worker = Worker.__new__(Worker)
        worker.upscalers = Upscalers(torch.device("cpu"))
        worker.upscaler_specs = dict
        return worker


def jobs(count: int, size: int, steps: int, strength: float | None, loop):  # noqa: ANN001, ANN201
    from app.engine.image_ops import prepare_source
    from app.engine.jobs import GenParams, Job
    from app.samplers import resolve_sampler

    made = []
    for i in range(count):
        source = None if strength is None else prepare_source(picture(size, i), size, size)
        params = GenParams(model="bench", prompt=f"a lighthouse, take {i}", negative_prompt="",
                           sampler=resolve_sampler("Euler"), steps=steps, width=size, height=size,
                           cfg_scale=5.0, loras=(), seed=i, source=source,
                           strength=1.0 if strength is None else strength)
        made.append(Job(params, f"client-{i}", loop, 600))
    return made


def timed(worker, model, batch) -> float:  # noqa: ANN001
    started = time.perf_counter()
    worker.generate(model, batch)
    return time.perf_counter() - started


def strength_ratio(args: argparse.Namespace, loop) -> float:  # noqa: ANN001
    model = load(args.model, exact=True)
    worker = _Worker()
    timed(worker, model, jobs(1, args.size, args.steps, args.strength, loop))  # first-call costs
    timed(worker, model, jobs(1, args.size, args.steps, None, loop))
    img, txt = [], []
    for _ in range(args.rounds):
        img.append(timed(worker, model, jobs(1, args.size, args.steps, args.strength, loop)))
        txt.append(timed(worker, model, jobs(1, args.size, args.steps, None, loop)))
    from app.engine.img2img import encode_latents

    encodes = []
    for i in range(args.rounds):
        started = time.perf_counter()
        encode_latents(model.pipe, picture(args.size, i), torch.Generator("cpu").manual_seed(i))
        encodes.append(time.perf_counter() - started)
    ratio = statistics.median(img) / statistics.median(txt)
    print(f"  the VAE encode of the picture: {statistics.median(encodes) * 1000:.0f} ms = "
          f"{statistics.median(encodes) / statistics.median(txt):.2f} of txt2img's time")
    print(f"img2img at strength {args.strength} / txt2img, {args.steps} steps at {args.size}^2: "
          f"{ratio:.2f} (medians {statistics.median(img) * 1000:.0f} / "
          f"{statistics.median(txt) * 1000:.0f} ms;"
          f" {int(args.steps * args.strength)} of {args.steps} steps run)")
    return ratio


def batching_gain(args: argparse.Namespace, loop) -> float:  # noqa: ANN001
    model = load(args.model, exact=False)  # GPU-like: one network call for the batch
    worker = _Worker()
    size = args.batch_size_px
    timed(worker, model, jobs(8, size, args.steps, args.strength, loop))
    batched, alone = [], []
    for _ in range(args.rounds):
        batched.append(timed(worker, model, jobs(8, size, args.steps, args.strength, loop)))
        alone.append(sum(timed(worker, model, [job]) for job in jobs(8, size, args.steps,
                                                                       args.strength, loop)))
    gain = statistics.median(alone) / statistics.median(batched)
    print(f"8 clients' img2img jobs at {size}^2, one batch / one at a time: {gain:.2f}x images/s "
          "(target >= 3)")
    return gain


async def loop_lateness(size: int = 1024, requests: int = 8) -> float:
    from starlette.requests import Request

    from app.api.bodies import read_off_loop
    from app.api.generation import ImageInput, ImageRequest, prepare_sources
    from app.config import Settings
    from app.engine.jobs import round_up8
    from app.image_inputs import read_image

    settings = Settings(_env_file=None)
    bodies = []
    for i in range(requests):
        buffer = io.BytesIO()
        picture(size, 100 + i).save(buffer, format="PNG")
        text = json.dumps({"prompt": "x", "init_images": [base64.b64encode(buffer.getvalue()).decode()]})
        # as the server receives a body: 64 KiB socket reads
        data = text.encode()
        bodies.append([data[at:at + 65536] for at in range(0, len(data), 65536)])
    worst = 0.0
    stop = False

    async def probe() -> None:
        nonlocal worst
        while not stop:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - before - 0.005)

    class _Params:
        gen_size = (round_up8(size), round_up8(size))

    async def one(chunks: list[bytes]) -> None:
        left = list(chunks)

        async def receive() -> dict:
            chunk = left.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(left)}

        # the image routes' reading (app.api.bodies), then the JSON FastAPI is given
        request = Request({"type": "http", "method": "POST",
                           "headers": [(b"content-type", b"application/json")]}, receive)
        await read_off_loop(request)
        body = await request.json()
        image = await read_image("init_images[0]", body["init_images"][0], settings)
        request = ImageRequest(model="m", prompt="x", image=ImageInput(images=(image,)))
        await prepare_sources(request, _Params())  # type: ignore[arg-type]

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    await asyncio.gather(*(one(text) for text in bodies))
    stop = True
    await prober
    megabytes = sum(len(c) for chunks in bodies for c in chunks) / 2**20
    print(f"event loop's worst lateness while {requests} requests' {size}x{size} PNGs "
          f"({megabytes:.0f} MiB of JSON) are read: {worst * 1000:.1f} ms (target <= 50)")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="the strength case's side")
    parser.add_argument("--batch-size-px", type=int, default=64,
                        help="the batching case's side (the tiny model at 64 px: per-call costs "
                             "dominate, as a GPU's kernel launches do at real sizes)")
    parser.add_argument("--model", default="builtin:tiny-sdxl")
    args = parser.parse_args()
    import logging
    logging.disable(logging.WARNING)
    loop = asyncio.new_event_loop()
    strength_ratio(args, loop)
    batching_gain(args, loop)
    first = asyncio.run(loop_lateness())  # pays for the decoding thread's start and lazy imports
    worst = max(asyncio.run(loop_lateness()) for _ in range(3))
    print(f"event loop's worst lateness: first round {first * 1000:.1f} ms, then at most "
          f"{worst * 1000:.1f} ms over 3 rounds (target <= 50)")


if __name__ == "__main__":
    main()
