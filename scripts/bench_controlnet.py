"""ControlNet units: what one unit costs against plain text to image, and what batching gains.
Two figures, each a ratio measured in one run on the worker's own generation code
(`Worker.generate`, without its thread and queue):

1. txt2img with one ControlNet unit against plain txt2img of the same steps on the same model,
   paired (alternating, `--rounds` each). The tiny model always; with `--full-size`, also the
   full-size random SDXL (`builtin:random-sdxl`) at a small size, its ControlNet made by
   `ControlNetModel.from_unet` (SDXL's full ControlNet, about half the UNet). On the CPU that
   case runs in bfloat16 (`--full-size-dtype`): in float32 the UNet, its ControlNet and the
   text encoders need about 19 GiB; bfloat16 halves that, and CPUs with AMX run it fast.
2. 8 clients' ControlNet jobs (each its own control picture and seed, the same unit) as one
   batch against the same jobs one at a time, with GPU-like batching
   (CRAFTSERVE_CPU_EXACT_BATCHES=false: the networks see the whole batch, as on a GPU):
   target >= 3x on the tiny model at 64 px.

    .venv/bin/python scripts/bench_controlnet.py [--steps 20] [--rounds 5] [--size 256]
        [--full-size] [--full-size-px 128] [--full-size-steps 4] [--threads 1]

The ControlNets have random weights (speed does not depend on the values); their zeroed output
layers are randomised so that the unit's residuals are not all zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

NET_NAME = "bench-controlnet"


def picture(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):  # noqa: ANN201
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load(source: str, exact: bool, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    """The model as the worker loads it (`load_model`); `dtype` other than float32 replaces the
    engine's CPU choice (float32) for this script only."""
    from app.engine import pipelines
    from app.registry import ModelSpec

    spec = ModelSpec(name="bench", source=source, kind="builtin", family="sdxl", family_known=True,
                     default_sampler=None, dtype="auto", vae=None, preload=False)
    chosen = pipelines.choose_dtype
    pipelines.choose_dtype = lambda spec, device: dtype
    try:
        return pipelines.load_model(spec, torch.device("cpu"), allow_downloads=False, lora_cache_size=1,
                                    exact_batches=exact)
    finally:
        pipelines.choose_dtype = chosen


def make_controlnet(model):  # noqa: ANN001, ANN201
    """SDXL's ControlNet for the model's UNet (`from_unet`), built in the UNet's dtype."""
    from diffusers import ControlNetModel

    unet = model.pipe.unet
    tiny = sum(p.numel() for p in unet.parameters()) < 50_000_000
    extra = {"conditioning_embedding_out_channels": (16, 16, 32, 32)} if tiny else {}
    torch.manual_seed(0)
    with default_dtype(unet.dtype), torch.no_grad():
        net = ControlNetModel.from_unet(unet, **extra)
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn_like(param) * 0.3)
    return net.to(dtype=unet.dtype).eval().requires_grad_(False)


class _Spec:
    """What the worker reads of a served ControlNet's spec (its net is handed over loaded)."""

    name = NET_NAME
    weights = Path(NET_NAME)
    folder = None


def worker_for(model, net):  # noqa: ANN001, ANN201
    """The worker's generation code without its thread and queue, the net already loaded."""
    from app.engine.controlnet import ControlNets
    from app.engine.upscalers import Upscalers
    from app.engine.worker import Worker

    worker = Worker.__new__(Worker)
    worker.upscalers = Upscalers(torch.device("cpu"))
    worker.upscaler_specs = dict
    worker.controlnet_specs = lambda: {NET_NAME: _Spec()}
    worker.controlnets = ControlNets(torch.device("cpu"))
    worker.controlnets._loaded[(str(_Spec.weights), str(model.pipe.unet.dtype))] = net  # noqa: SLF001
    return worker


def jobs(count: int, size: int, steps: int, controlled: bool, loop):  # noqa: ANN001, ANN201
    from app.engine.control_units import ControlImages, ControlUnit
    from app.engine.jobs import GenParams, Job
    from app.samplers import resolve_sampler

    unit = ControlUnit(name=NET_NAME, weights=str(_Spec.weights), weight=1.0)
    made = []
    for i in range(count):
        params = GenParams(model="bench", prompt=f"a lighthouse, take {i}", negative_prompt="",
                           sampler=resolve_sampler("Euler"), steps=steps, width=size, height=size,
                           cfg_scale=5.0, loras=(), seed=i,
                           controlnet=(unit,) if controlled else (),
                           control_images=ControlImages([picture(size, 100 + i)]) if controlled else None)
        made.append(Job(params, f"client-{i}", loop, 3600))
    return made


def timed(worker, model, batch) -> float:  # noqa: ANN001
    started = time.perf_counter()
    worker.generate(model, batch)
    return time.perf_counter() - started


def unit_cost(label: str, model, size: int, steps: int, rounds: int, loop) -> float:  # noqa: ANN001
    net = make_controlnet(model)
    worker = worker_for(model, net)
    timed(worker, model, jobs(1, size, steps, True, loop))  # first-call costs
    timed(worker, model, jobs(1, size, steps, False, loop))
    control, plain = [], []
    for _ in range(rounds):
        control.append(timed(worker, model, jobs(1, size, steps, True, loop)))
        plain.append(timed(worker, model, jobs(1, size, steps, False, loop)))
    ratio = statistics.median(control) / statistics.median(plain)
    unet = sum(p.numel() for p in model.pipe.unet.parameters())
    cn = sum(p.numel() for p in net.parameters())
    print(f"{label}: one unit / plain txt2img, {steps} steps at {size}^2: {ratio:.2f} (medians "
          f"{statistics.median(control) * 1000:.0f} / {statistics.median(plain) * 1000:.0f} ms; "
          f"ControlNet {cn / 1e6:.1f} M parameters = {cn / unet:.2f} of the UNet's; "
          f"{model.pipe.unet.dtype})")
    return ratio


def batching_gain(size: int, steps: int, rounds: int, loop) -> float:  # noqa: ANN001
    """8 clients' ControlNet jobs batched against one at a time; plain txt2img jobs the same
    way, alternating with them, for reference (what the unit changes in the gain)."""
    model = load("builtin:tiny-sdxl", exact=False)  # GPU-like: one network call for the batch
    worker = worker_for(model, make_controlnet(model))
    gains = {}
    for controlled in (True, False):
        timed(worker, model, jobs(8, size, steps, controlled, loop))
    times: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    for _ in range(rounds):
        for controlled in (True, False):
            batched, alone = times[controlled]
            batched.append(timed(worker, model, jobs(8, size, steps, controlled, loop)))
            alone.append(sum(timed(worker, model, [job]) for job in jobs(8, size, steps, controlled, loop)))
    for controlled in (True, False):
        batched, alone = times[controlled]
        gains[controlled] = statistics.median(alone) / statistics.median(batched)
    print(f"8 clients' ControlNet jobs at {size}^2, {steps} steps, one batch / one at a time: "
          f"{gains[True]:.2f}x images/s (medians {statistics.median(times[True][0]) * 1000:.0f} / "
          f"{statistics.median(times[True][1]) * 1000:.0f} ms; target >= 3); plain txt2img jobs "
          f"alongside: {gains[False]:.2f}x")
    return gains[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="the tiny model's side for the unit cost")
    parser.add_argument("--batch-size-px", type=int, default=64,
                        help="the batching case's side (the tiny model at 64 px: per-call costs "
                             "dominate, as a GPU's kernel launches do at real sizes)")
    parser.add_argument("--full-size", action="store_true",
                        help="also the unit cost on the full-size random SDXL (about 10 GiB in bf16)")
    parser.add_argument("--full-size-only", action="store_true", help="the full-size case alone")
    parser.add_argument("--full-size-px", type=int, default=128)
    parser.add_argument("--full-size-steps", type=int, default=4)
    parser.add_argument("--full-size-rounds", type=int, default=2)
    parser.add_argument("--full-size-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (0: its default); 1 on a machine other jobs share, "
                             "where its threads would wait on each other")
    args = parser.parse_args()
    import logging
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    loop = asyncio.new_event_loop()
    if not args.full_size_only:
        tiny = load("builtin:tiny-sdxl", exact=True)
        unit_cost("tiny SDXL", tiny, args.size, args.steps, args.rounds, loop)
        batching_gain(args.batch_size_px, args.steps, args.rounds, loop)
    if args.full_size or args.full_size_only:
        model = load("builtin:random-sdxl", exact=True, dtype=getattr(torch, args.full_size_dtype))
        unit_cost("full-size random SDXL", model, args.full_size_px, args.full_size_steps,
                  args.full_size_rounds, loop)


if __name__ == "__main__":
    main()
