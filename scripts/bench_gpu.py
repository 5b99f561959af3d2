#!/usr/bin/env python
"""craftserve GPU benchmark: diffusers defaults vs craftserve's engine vs the HTTP server.

Builds SDXL 1.0 base's full architecture from the configs in app/configs with random
weights (no download: speed does not depend on weight values) and, in one run, times
text-to-image generation (default 1024x1024, 30 steps, CFG 7):

  (a) plain diffusers defaults, as a user writes them: StableDiffusionXLPipeline in fp16,
      eager, the base model's VAE config (force_upcast: fp32 decode), batch 1;
  (b) craftserve's engine as it is: a real Engine built from a models file (source
      builtin:random-sdxl) and the engine's settings (CRAFTSERVE_* variables apply, e.g.
      CRAFTSERVE_MAX_BATCH and CRAFTSERVE_WARM_BATCHES are set from --batches, so the
      warm-up compiles exactly the batch sizes measured); the model is loaded by the engine's
      worker (`worker.model`: load, GPU fast path, warm-up), and each batch is the worker's
      own pipeline call (`worker.generate`), at batch 1, 2 and 4;
  (c) one request at a time end to end through the real HTTP server (create_app under
      uvicorn on 127.0.0.1, POST /sd, PNG received), after a warm-up request.

Nothing is applied or compiled here: on CUDA the run stops with exit status 2 and says what
is missing when the engine did not apply its fast path (fused QKV, channels-last, cuDNN
autotuning, an fp16-safe VAE, compilation when asked) or did not build the full-size model.

It prints ms per image, images/s, peak GPU memory, the ratios (a)/(b) and HTTP/(b) with the
targets, the host-device synchronisations of one engine call, and the elapsed total.
Warm-up runs (compilation included) are never timed. With --out, the JSON is rewritten as
each case finishes ("status": "running" until the end), so a run stopped by a time limit
keeps every figure it measured.

  python scripts/bench_gpu.py                 # on a CUDA GPU, torch.compile on
  python scripts/bench_gpu.py --no-compile    # the engine's default settings
  python scripts/bench_gpu.py --tiny          # CPU smoke run on the tiny model, ~a minute
  python scripts/bench_gpu.py --batches 1 --compile-cache c.bin   # compile batch 1 only,
                                              # reusing (and saving) inductor's artifacts

Results on the CPU or with --tiny prove the script runs; they say nothing of GPU speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a photograph of an astronaut riding a horse on mars, highly detailed, golden hour"
NEGATIVE = "blurry, low quality, watermark"
API_KEY = "bench-key"
MODEL_NAME = "bench"
RANDOM_SOURCE = "builtin:random-sdxl"
TINY_SOURCE = "builtin:tiny-sdxl"
GIB = 1024**3

# The targets, for one H100 at 1024x1024, 30 steps, CFG 7.
TARGET_SPEEDUP = 2.5  # (a)/(b) at batch 1, at least
TARGET_SECONDS_PER_IMAGE = 0.8  # (b), at most
TARGET_HTTP_OVERHEAD = 0.03  # HTTP within 3% of (b)
TARGET_TOTAL_S = 480.0  # the whole run, compile warm-up included


@dataclass
class Result:
    case: str
    batch: int
    seconds: list[float]  # per timed call
    peak_gib: float | None
    note: str = ""

    @property
    def ms_per_image(self) -> float:
        return statistics.median(self.seconds) * 1000 / self.batch

    @property
    def images_per_s(self) -> float:
        return 1000 / self.ms_per_image


@dataclass
class Report:
    config: dict
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sync: dict | None = None
    warmup_s: dict = field(default_factory=dict)
    optimizations: list[str] = field(default_factory=list)
    server_optimizations: list[str] | None = None
    out: Path | None = None  # the JSON file, rewritten as each case finishes

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.save("running")

    def save(self, status: str) -> None:
        """Write what is known so far to `out` (whole or not at all): a run stopped by a time
        limit keeps every case it finished."""
        if self.out is None:
            return
        data = {
            **self.config, "status": status, "elapsed_s": round(elapsed(), 1),
            "notes": self.notes, "sync": self.sync, "warmup_s": self.warmup_s,
            "optimizations": self.optimizations,
            "server_optimizations": self.server_optimizations,
            "results": [
                {**asdict(r), "ms_per_image": r.ms_per_image, "images_per_s": r.images_per_s}
                for r in self.results
            ],
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(data, indent=2), encoding="utf-8")
        partial.replace(self.out)

    def find(self, case: str, batch: int = 1) -> Result | None:
        return next((r for r in self.results if r.case == case and r.batch == batch), None)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"note: {text}")


def log(text: str) -> None:
    print(f"[{elapsed():7.1f}s] {text}", flush=True)


# ---- arguments ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny offline model on the CPU (defaults: 64x64, 4 steps)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--size", help="WIDTHxHEIGHT or N (default 1024; --tiny 128)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --tiny 4)")
    parser.add_argument("--cfg", type=float, default=7.0, help="guidance scale (default 7)")
    parser.add_argument("--batches", default="1,2,4", help="engine batch sizes (default 1,2,4)")
    parser.add_argument("--reps", type=int, help="timed calls per case (default 3; --tiny 2)")
    parser.add_argument("--max-case-s", type=float, default=40.0,
                        help="stop adding timed calls to a case after this long (default 40)")
    parser.add_argument("--sampler", default="Euler",
                        help="engine sampler; Euler is what (a) runs (default Euler)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's compile setting (default: on for CUDA)")
    parser.add_argument("--skip-http", action="store_true", help="skip (c), the HTTP server")
    parser.add_argument("--skip-baseline", action="store_true", help="skip (a)")
    parser.add_argument("--sync-check", action=argparse.BooleanOptionalAction, default=True,
                        help="count host-device syncs of one engine call (CUDA; default on)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: 1 with --tiny, where more threads only "
                             "spin-wait on a busy machine; else torch's default)")
    parser.add_argument("--compile-cache", type=Path,
                        help="inductor's artifacts file: loaded before the engine compiles, "
                             "written after its warm-up (CRAFTSERVE_COMPILE_CACHE)")
    parser.add_argument("--out", type=Path,
                        help="also write the results as JSON here, rewritten after each case")
    args = parser.parse_args(argv)
    args.width, args.height = _size(args.size or ("64" if args.tiny else "1024"))
    args.steps = args.steps or (4 if args.tiny else 30)
    args.reps = max(1, args.reps or (2 if args.tiny else 3))
    args.batch_sizes = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batches: give positive batch sizes, e.g. 1,2,4")
    if args.width % 8 or args.height % 8:
        parser.error("--size: width and height must be multiples of 8")
    return args


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


# ---- measuring ---------------------------------------------------------------------------


def sync(device) -> None:  # noqa: ANN001 - torch.device
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:  # noqa: ANN001
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def allocated_gib(device) -> float:  # noqa: ANN001
    import torch

    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def free_memory(device) -> None:  # noqa: ANN001
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(run: Callable[[], object], device, reps: int, max_s: float) -> list[float]:  # noqa: ANN001
    """Time `run` `reps` times (at least once, fewer when a case would pass `max_s`)."""
    seconds: list[float] = []
    while len(seconds) < reps:
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        seconds.append(time.perf_counter() - started)
        if sum(seconds) + seconds[-1] > max_s:
            break
    return seconds


# ---- (a) diffusers defaults ----------------------------------------------------------


def bench_baseline(args: argparse.Namespace, device, report: Report) -> None:  # noqa: ANN001
    import torch

    log("(a) building the plain diffusers pipeline")
    if args.tiny:
        from app.engine.tiny import build_tiny_sdxl

        pipe = build_tiny_sdxl().to(device)  # float32: what a CPU user runs
        dtype = "float32"
    else:
        from app.engine.random_sdxl import build_random_sdxl

        # = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float16)
        #   .to("cuda"): its VAE config says force_upcast, as the base model's does.
        pipe = build_random_sdxl(dtype=torch.float16, device=device, fp16_fix_vae=False)
        dtype = "float16"
    pipe.set_progress_bar_config(disable=True)

    def call(steps: int = args.steps) -> object:
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=args.cfg,
            width=args.width,
            height=args.height,
        ).images[0]

    log("(a) warm-up call (not timed)")
    call(steps=2)
    reset_peak(device)
    seconds = timed(call, device, args.reps, args.max_case_s)
    upcast = bool(getattr(pipe.vae.config, "force_upcast", False)) and dtype == "float16"
    report.add(Result(
        "(a) diffusers defaults, eager", 1, seconds, peak_gib(device),
        note=f"{dtype}, {type(pipe.scheduler).__name__}, VAE fp32 upcast: {upcast}",
    ))
    log(f"(a) batch 1: {statistics.median(seconds) * 1000:.0f} ms/image")


# ---- (b) the engine path -------------------------------------------------------------


class EngineCheckFailed(Exception):
    """The engine did not do on CUDA what it should: its figures would be mislabelled."""


def write_models(folder: Path, source: str, sampler: str) -> Path:
    models = folder / "models.yaml"
    models.write_text(
        f"models:\n  {MODEL_NAME}:\n    source: {source}\n    family: sdxl\n"
        f"    default_sampler: {sampler}\n    preload: true\n",
        encoding="utf-8",
    )
    return models


def engine_settings(args: argparse.Namespace, device, models: Path, **overrides):  # noqa: ANN001, ANN201
    from app.config import Settings

    return Settings(
        models=models, api_keys=[API_KEY], devices=str(device), compile=bool(args.compile),
        compile_cache=args.compile_cache, allow_downloads=False, log_level="warning", **overrides,
    )


def engine_shortfalls(args: argparse.Namespace, device, pipe) -> list[str]:  # noqa: ANN001
    """What the engine should have done to `pipe` on CUDA and did not (empty: all done)."""
    import torch

    from app.engine import optimize

    if device.type != "cuda":
        return []  # the CPU path applies nothing, by design
    missing = []
    applied = set(optimize.applied_optimizations(pipe))
    for name in ("fused-qkv", "channels-last", "cudnn-benchmark"):
        if name not in applied:
            missing.append(f"{name} was not applied (applied: {sorted(applied) or 'nothing'})")
    if args.compile:
        compiled = set(optimize.compiled_modules(pipe))
        failed = optimize.compile_failures(pipe)
        for part in ("unet", "vae.decoder"):
            if part in failed:
                missing.append(f"compile is on but compiling the {part} failed ({failed[part]})")
            elif part not in compiled:
                missing.append(f"compile is on but the {part} is not compiled")
    if pipe.unet.dtype == torch.float32:
        missing.append("the model runs in float32 on CUDA")
    vae = pipe.vae
    if vae.dtype == torch.float16 and vae.config.force_upcast:
        missing.append("the VAE is decoded in fp32 on every call (force_upcast)")
    if not args.tiny and not _is_full_size(pipe):
        missing.append(f"{RANDOM_SOURCE} did not build the full-size SDXL")
    return missing


def require_engine_did_its_job(args: argparse.Namespace, device, pipe, where: str) -> None:  # noqa: ANN001
    missing = engine_shortfalls(args, device, pipe)
    if missing:
        raise EngineCheckFailed(
            f"{where}: the engine did not apply its GPU fast path as it should on {device}, so "
            "its figures would not be craftserve's:\n  - " + "\n  - ".join(missing)
        )


def _is_full_size(pipe) -> bool:  # noqa: ANN001
    """SDXL base's UNet, counted as published: fused QKV adds layers, not architecture."""
    from app.engine.random_sdxl import EXPECTED_PARAMETERS, architecture_parameters

    return architecture_parameters(pipe.unet) == EXPECTED_PARAMETERS["unet"]


def make_jobs(args: argparse.Namespace, batch: int, steps: int, loop) -> list:  # noqa: ANN001
    from app.engine.jobs import GenParams, Job
    from app.samplers import resolve_sampler

    sampler = resolve_sampler(args.sampler)
    return [
        Job(
            params=GenParams(
                model=MODEL_NAME, prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler,
                steps=steps, width=args.width, height=args.height, cfg_scale=args.cfg,
                loras=(), seed=1000 + i,
            ),
            client="bench", loop=loop, deadline_s=1e9,
        )
        for i in range(batch)
    ]


def bench_engine(args: argparse.Namespace, device, report: Report) -> None:  # noqa: ANN001
    import torch

    from app.engine import optimize
    from app.engine.engine import Engine
    from app.metrics import Metrics
    from app.registry import load_registry

    source = TINY_SOURCE if args.tiny else RANDOM_SOURCE
    models = write_models(Path(tempfile.mkdtemp(prefix="craftserve-bench-")), source, args.sampler)
    # MAX_BATCH as the largest measured batch, and the warm-up (compilation) of exactly the
    # measured batch sizes: a size measured but not warmed would compile in the first call
    settings = engine_settings(args, device, models, max_batch=max(args.batch_sizes),
                               warm_batches=args.batch_sizes)
    engine = Engine(settings, load_registry(models), Metrics())
    worker = engine.workers[0]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # as the worker's own thread does
    warmed = ",".join(map(str, settings.warm_batch_sizes()))
    log(f"(b) loading {source} through the engine's worker (warm-up of batches {warmed} "
        "included)")
    started = time.perf_counter()
    model = worker.model(MODEL_NAME)
    report.warmup_s[f"(b) model load by the engine, warm-up of batches {warmed} "
                    "at the default size included"] = round(time.perf_counter() - started, 1)
    report.save("running")
    report.optimizations = list(optimize.applied_optimizations(model.pipe))
    report.config["engine_dtype"] = str(model.dtype).removeprefix("torch.")
    log(f"(b) fast path: {', '.join(report.optimizations) or 'none (CPU path)'}; "
        f"{report.config['engine_dtype']}")
    require_engine_did_its_job(args, device, model.pipe, "(b)")
    loop = asyncio.new_event_loop()  # Jobs need one for their futures; never run
    try:
        for batch in args.batch_sizes:
            # untimed: the first call at this shape (what a first request pays after /ready:
            # compilation or autotuning only where the engine's warm-up did not reach)
            started = time.perf_counter()
            worker.generate(model, make_jobs(args, batch, 2, loop))
            sync(device)
            spent = time.perf_counter() - started
            report.warmup_s[f"(b) first call at batch {batch}, 2 steps"] = round(spent, 1)
            report.save("running")
            log(f"(b) first call at batch {batch}: {spent:.1f} s")

            jobs = make_jobs(args, batch, args.steps, loop)
            reset_peak(device)
            seconds = timed(
                lambda jobs=jobs: worker.generate(model, jobs), device, args.reps,
                args.max_case_s,
            )
            result = Result("(b) craftserve engine", batch, seconds, peak_gib(device))
            report.add(result)
            log(f"(b) batch {batch}: {result.ms_per_image:.0f} ms/image")
        if args.sync_check and device.type == "cuda":
            report.sync = count_syncs(lambda steps: worker.generate(
                model, make_jobs(args, 1, steps, loop)))
            log(f"(b) host-device syncs: {report.sync}")
    finally:
        loop.close()
        worker.models.clear()  # the engine's model goes before (c) loads its own


def elapsed() -> float:
    return time.perf_counter() - START


def count_syncs(run: Callable[[int], object]) -> dict:
    """Synchronising CUDA calls of one engine call, split into per call and per step."""
    import torch

    def count(steps: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum(1 for w in caught if "synchroniz" in str(w.message))

    two, four = count(2), count(4)
    per_step = (four - two) / 2
    return {"per_call": two - 2 * per_step, "per_step": per_step, "calls_2_4_steps": [two, four]}


# ---- (c) the HTTP server -------------------------------------------------------------


@contextlib.contextmanager
def running_server(settings) -> Iterator:  # noqa: ANN001
    from tests.live import LiveServer

    server = LiveServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def bench_http(args: argparse.Namespace, device, report: Report) -> None:  # noqa: ANN001
    import httpx

    from app.engine import optimize

    source = TINY_SOURCE if args.tiny else RANDOM_SOURCE
    models = write_models(Path(tempfile.mkdtemp(prefix="craftserve-bench-")), source, args.sampler)
    # max_batch=1: the requests come one at a time anyway, and the engine then warms up
    # (and compiles) batch 1 only
    settings = engine_settings(args, device, models, max_batch=1)
    body = {
        "token": API_KEY, "model": MODEL_NAME, "prompt": PROMPT, "negative_prompt": NEGATIVE,
        "sampler": args.sampler, "steps": args.steps, "width": args.width,
        "height": args.height, "cfg_scale": args.cfg,
    }
    log(f"(c) starting the server ({source} on {device})")
    reset_peak(device)
    held = allocated_gib(device)  # what earlier phases still hold, left out of (c)'s peak
    if held > 0.5:
        report.note(f"(c) {held:.1f} GiB were still allocated by earlier phases; "
                    "(c)'s peak memory leaves them out")
    with running_server(settings) as server:
        state = server.wait_ready(timeout=420)
        if not state.get("ready"):
            raise EngineCheckFailed(f"(c): the server did not become ready: {state.get('reasons')}")
        loaded = _server_model(server)
        report.server_optimizations = list(optimize.applied_optimizations(loaded.pipe))
        log(f"(c) ready; server fast path: {', '.join(report.server_optimizations) or 'none'}")
        require_engine_did_its_job(args, device, loaded.pipe, "(c)")
        with httpx.Client(base_url=server.url, timeout=600) as client:

            def post(seed: int) -> httpx.Response:
                answer = client.post("/sd", json={**body, "seed": seed})
                if answer.status_code != 200 or answer.headers["content-type"] != "image/png":
                    raise RuntimeError(f"POST /sd answered {answer.status_code}: {answer.text}")
                return answer

            started = time.perf_counter()
            post(1)  # warm-up request, not timed
            report.warmup_s["HTTP warm-up request"] = round(time.perf_counter() - started, 1)
            report.save("running")
            seeds = iter(range(2, 10_000))
            generation_ms: list[float] = []
            last: list[bytes] = []

            def one() -> None:
                answer = post(next(seeds))
                generation_ms.append(float(answer.headers.get("x-generation-ms", "nan")))
                last[:] = [answer.content]

            seconds = timed(one, device, args.reps, args.max_case_s)
        peak = peak_gib(device)
        result = Result(
            "(c) HTTP POST /sd end to end", 1, seconds, None if peak is None else peak - held,
            note=(f"server-side generation {statistics.median(generation_ms):.0f} ms, "
                  f"PNG encoding {png_ms(last[0]):.0f} ms of a {len(last[0]) // 1024} KiB image"),
        )
        report.add(result)
        log(f"(c) batch 1: {result.ms_per_image:.0f} ms/image end to end")


def png_ms(png: bytes) -> float:
    """How long the server's PNG encoding takes for this image (best of 3, here)."""
    import io

    from PIL import Image

    from app.imaging import encode_png

    image = Image.open(io.BytesIO(png))
    image.load()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        encode_png(image, "parameters")
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _server_model(server):  # noqa: ANN001, ANN202
    for worker in server.app.state.engine.workers:
        loaded = worker.models.get(MODEL_NAME)
        if loaded is not None:
            return loaded
    raise EngineCheckFailed("(c): the server is ready but holds no loaded model")


# ---- report ------------------------------------------------------------------------------


def print_report(report: Report, total: float) -> None:
    config = report.config
    print()
    print(f"craftserve benchmark, {config['date']}")
    print(f"  command: {config['command']}")
    print(f"  device:  {config['device_name']}  (torch {config['torch']}, CUDA "
          f"{config['cuda']}, diffusers {config['diffusers']})")
    print(f"  model:   {config['model']}")
    print(f"  run:     {config['width']}x{config['height']}, {config['steps']} steps, "
          f"cfg {config['cfg']}, sampler {config['sampler']}, compile {config['compile']}")
    print(f"  fast path (b): {', '.join(report.optimizations) or 'none (CPU path)'}"
          f"  (engine dtype {config.get('engine_dtype', '-')})")
    if report.server_optimizations is not None:
        print(f"  fast path (c): {', '.join(report.server_optimizations) or 'none'}")
    print()
    header = f"  {'case':<32} {'batch':>5} {'ms/image':>10} {'images/s':>9} {'peak GiB':>9} {'n':>3}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in report.results:
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        print(f"  {r.case:<32} {r.batch:>5} {r.ms_per_image:>10.1f} {r.images_per_s:>9.3f} "
              f"{peak:>9} {len(r.seconds):>3}" + (f"   {r.note}" if r.note else ""))
    print()
    for line in ratio_lines(report):
        print("  " + line)
    if report.sync is not None:
        print(f"  host-device syncs of one engine call: {report.sync['per_call']:g} per call, "
              f"{report.sync['per_step']:g} per step")
    for name, seconds in report.warmup_s.items():
        print(f"  {name}: {seconds} s")
    for text in report.notes:
        print(f"  note: {text}")
    within = "within" if total <= TARGET_TOTAL_S else "OVER"
    print(f"  total elapsed: {total:.0f} s ({within} the {TARGET_TOTAL_S / 60:.0f}-minute budget)")
    if config["device_type"] != "cuda" or config["tiny"]:
        print("  (CPU or tiny-model figures: they prove the run, not GPU speed)")


def ratio_lines(report: Report) -> list[str]:
    config = report.config
    applies = (config["device_type"] == "cuda" and not config["tiny"]
               and (config["width"], config["height"], config["steps"], config["cfg"])
               == (1024, 1024, 30, 7.0))

    def _met(ok: bool) -> str:
        if not applies:
            return "not applicable to this run"
        return "met" if ok else "NOT met"

    lines = []
    base, engine, http = report.find("(a) diffusers defaults, eager"), report.find(
        "(b) craftserve engine"), report.find("(c) HTTP POST /sd end to end")
    engine_results = [r for r in report.results if r.case.startswith("(b)")]
    if base and engine:
        speedup = base.ms_per_image / engine.ms_per_image
        report.config["speedup_a_over_b"] = speedup
        lines.append(f"(a)/(b) at batch 1: {speedup:.2f}x "
                     f"(target >= {TARGET_SPEEDUP}: {_met(speedup >= TARGET_SPEEDUP)})")
    if engine:
        s = engine.ms_per_image / 1000
        best = min(engine_results, key=lambda r: r.ms_per_image)
        lines.append(f"(b) at batch 1: {s:.3f} s/image "
                     f"(target <= {TARGET_SECONDS_PER_IMAGE}: "
                     f"{_met(s <= TARGET_SECONDS_PER_IMAGE)}); best: "
                     f"{best.ms_per_image / 1000:.3f} s/image at batch {best.batch}")
    if http and engine:
        ratio = http.ms_per_image / engine.ms_per_image
        report.config["http_over_b"] = ratio
        lines.append(f"HTTP/(b) at batch 1: {ratio:.3f} "
                     f"(target <= {1 + TARGET_HTTP_OVERHEAD:.2f}: "
                     f"{_met(ratio <= 1 + TARGET_HTTP_OVERHEAD)})")
    return lines


def describe(args: argparse.Namespace, device) -> dict:  # noqa: ANN001
    import diffusers
    import torch

    from app.engine.optimize import COMPILE_MODE

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device_type": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "model": ("tiny random SDXL (app.engine.tiny)" if args.tiny else
                  "SDXL 1.0 base architecture, random weights (app.engine.random_sdxl)"),
        "width": args.width, "height": args.height, "steps": args.steps, "cfg": args.cfg,
        "sampler": args.sampler, "batches": args.batch_sizes, "reps": args.reps,
        "compile": bool(args.compile),
        "compile_mode": COMPILE_MODE if args.compile else None,
        "compile_cache": str(args.compile_cache) if args.compile_cache else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    if args.device:
        device = torch.device(args.device)
    elif args.tiny or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", 0)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type != "cuda" and not args.tiny:
        log("warning: the full-size model on the CPU needs ~14 GB and hours; use --tiny")
    report = Report(config=describe(args, device), out=args.out)
    report.save("running")
    log(f"benchmark on {report.config['device_name']}: {args.width}x{args.height}, "
        f"{args.steps} steps, batches {args.batch_sizes}, compile {args.compile}")
    # `timeout` (the device script's) sends SIGTERM: end as an exception, so the JSON says so
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if not args.skip_baseline:
            bench_baseline(args, device, report)
            free_memory(device)  # the phase's pipeline is gone with its frame
        bench_engine(args, device, report)
        free_memory(device)
        if not args.skip_http:
            bench_http(args, device, report)
    except EngineCheckFailed as exc:
        report.note(f"FAILED: {exc}")
        report.save("failed")
        print(f"\nbench_gpu: FAILED, nothing is reported as the engine's speed.\n{exc}",
              file=sys.stderr, flush=True)
        return 2
    except BaseException as exc:
        report.note(f"stopped by {type(exc).__name__}: {exc}")
        report.save("stopped")
        raise
    total = elapsed()
    print_report(report, total)
    report.save("done")
    if args.out:
        log(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
