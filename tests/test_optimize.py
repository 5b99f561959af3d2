"""The GPU fast path (app.engine.optimize) and the random full-size SDXL (app.engine.random_sdxl).

No GPU here: the CPU path must stay exactly as it was (optimize_pipeline and warm_up do
nothing), and the GPU path's steps that the CPU can run (SDPA check, fused QKV with LoRAs,
channels-last, the VAE fp16 check, the timestep cast in front of the compiled UNet, eager
LoRA batches on a compiled pipeline) are forced onto the tiny pipeline and compared with the
unoptimised one. The full-size SDXL is built on the meta device only: its parameter counts
are checked against the published figures, written here as literals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine import optimize
from app.engine.loras import LoraManager
from app.engine.random_sdxl import (
    EXPECTED_PARAMETERS,
    build_random_sdxl,
    build_text_encoder,
    count_parameters,
    materialize,
)
from app.engine.tiny import build_tiny_sdxl
from tests.lora_files import write_peft_lora

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SIZE = 64
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are all overhead; several threads only spin-wait on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def render(pipe) -> np.ndarray:
    """One 64x64 image the way the engine calls the pipeline, as uint8 values (int16)."""
    out = pipe(
        prompt=["a lighthouse at dusk"],
        negative_prompt=["fog"],
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        width=SIZE,
        height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(7)],
        output_type="np",
    )
    return (out.images[0] * 255).round().astype(np.int16)


def tiny():
    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base() -> tuple:
    """(an unoptimised tiny SDXL pipeline, its image)."""
    pipe = tiny()
    return pipe, render(pipe)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, base) -> Path:
    return write_peft_lora(base[0], tmp_path_factory.mktemp("lora") / "style.safetensors")


def with_lora(pipe, path: Path) -> np.ndarray:
    """The image with the LoRA at weight 1 (loaded once per pipeline), then the LoRA reset."""
    manager = getattr(pipe, "_test_loras", None)
    if manager is None:
        manager = pipe._test_loras = LoraManager(pipe, "sdxl", capacity=2)
    manager.apply([("style", path, 1.0)])
    try:
        return render(pipe)
    finally:
        manager.reset()


def storage_bytes(model: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters()}
    return sum(storages.values())


# ---- the full-size architecture ------------------------------------------------------

# SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0) as published: parameters per
# component. Written here, not taken from the module under test.
PUBLISHED_PARAMETERS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,  # CLIP ViT-L/14 text encoder
    "text_encoder_2": 694_659_840,  # OpenCLIP ViT-bigG/14 text encoder with projection
    "vae": 83_653_863,
}


def fused_qkv_extra_parameters(model: torch.nn.Module) -> int:
    """Parameters that fusing QKV adds to `model` (the fused copies), without fusing it."""
    from diffusers.models.attention_processor import Attention

    extra = 0
    for module in model.modules():
        if isinstance(module, Attention):
            layers = [module.to_k, module.to_v]
            if not module.is_cross_attention:
                layers.append(module.to_q)
            extra += sum(p.numel() for layer in layers for p in layer.parameters())
    return extra


def sdxl_fused_qkv_extra() -> int:
    """The fused copies of SDXL's UNet, from its architecture: transformer blocks of width
    640 (down 2 x 2, up 3 x 2) and 1280 (down 2 x 10, mid 10, up 3 x 10), each with a self-
    attention (q, k, v: 3 d x d) and a cross-attention on the 2048-wide text (k, v: 2 x 2048
    x d), no biases."""
    blocks = {640: 2 * 2 + 3 * 2, 1280: 2 * 10 + 10 + 3 * 10}
    return sum(n * (3 * d * d + 2 * 2048 * d) for d, n in blocks.items())


def test_full_size_parameter_counts_on_meta():
    pipe = build_random_sdxl(device="meta")
    counts = {name: count_parameters(getattr(pipe, name)) for name in PUBLISHED_PARAMETERS}
    assert counts == PUBLISHED_PARAMETERS
    assert EXPECTED_PARAMETERS == PUBLISHED_PARAMETERS  # what the benchmark relies on
    assert pipe.unet.device.type == "meta"
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) < 49_408
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    # SDPA is diffusers' default for SDXL's attention: nothing to switch on.
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
    # fp16-fix VAE config by default; the base model's own config on request
    assert pipe.vae.config.force_upcast is False
    assert build_random_sdxl(device="meta", fp16_fix_vae=False).vae.config.force_upcast is True
    # diffusers' fusion alone would keep 648 M parameters twice (1.3 GB in fp16): why
    # optimize.share_fused_weights exists (docs/gpu-path.md)
    assert sdxl_fused_qkv_extra() == 647_987_200
    assert fused_qkv_extra_parameters(pipe.unet) == 647_987_200


def test_materialize_gives_finite_reproducible_weights():
    def build():
        return materialize(build_text_encoder("text_encoder"), CPU, torch.float32, seed=3)

    model = build()
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert torch.equal(model.embeddings.position_ids, torch.arange(77).expand((1, -1)))
    ids = torch.randint(0, 500, (2, 77))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert torch.isfinite(out.last_hidden_state).all()
    assert out.last_hidden_state.abs().max() < 1e3  # far inside fp16's range
    again = build()
    assert all(torch.equal(a, b) for a, b in zip(params, again.parameters(), strict=True))


def test_materialize_keeps_shared_parameters_shared():
    with torch.device("meta"):
        first = torch.nn.Linear(4, 4)
        model = torch.nn.Sequential(first, torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 4))
        model[2].weight = first.weight
    materialize(model, CPU, torch.float16, seed=0)
    assert model[0].weight is model[2].weight and model[0].weight.dtype == torch.float16
    assert torch.equal(model[1].weight, torch.ones(4, dtype=torch.float16))
    assert torch.equal(model[0].bias, torch.zeros(4, dtype=torch.float16))


# ---- the CPU path is untouched -------------------------------------------------------


def test_optimize_and_warm_up_do_nothing_on_the_cpu(base):
    pipe = tiny()
    processors = dict(pipe.unet.attn_processors)
    optimize.optimize_pipeline(pipe, CPU, compile=True)
    assert optimize.warm_up(pipe, CPU, sizes=[(SIZE, SIZE)]) == 0.0
    assert optimize.applied_optimizations(pipe) == ()
    assert optimize.compiled_modules(pipe) == []
    assert pipe.unet.attn_processors == processors
    assert pipe.unet.conv_in.weight.is_contiguous()
    assert np.array_equal(render(pipe), base[1])


# ---- the GPU path, forced onto the CPU -----------------------------------------------


def test_forced_fast_path_keeps_images(base, lora_file):
    pipe = tiny()
    optimize.optimize_pipeline(pipe, CPU, compile=False, force=True)
    # diffusers' processors are already SDPA ones: "sdpa" is not reported as applied
    assert optimize.applied_optimizations(pipe) == ("fused-qkv", "channels-last")
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {
        "LoraAwareFusedAttnProcessor"
    }
    assert {type(p).__name__ for p in pipe.vae.attn_processors.values()} == {
        "FusedAttnProcessor2_0"
    }
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # to_q/to_k/to_v are views into the fused weights: fusing costs no memory
    assert storage_bytes(pipe.unet) == storage_bytes(base[0].unet)
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
    image = render(pipe)
    diff = np.abs(image - base[1])
    assert diff.mean() < 1.0 and diff.max() <= 2, (diff.mean(), diff.max())
    assert optimize.warm_up(pipe, CPU, sizes=[(SIZE, SIZE)], steps=1, force=True) > 0
    assert np.array_equal(render(pipe), image)  # warm-up left the scheduler as it was

    # A LoRA still loads and applies in full after fusing and channels-last. (This random
    # LoRA makes the tiny model so sensitive that channels-last rounding alone shows, so the
    # check is relative to the LoRA's own effect; fused QKV alone is exact, see below.)
    reference = with_lora(tiny(), lora_file)
    effect = np.abs(reference - base[1]).mean()
    assert effect > 10
    assert np.abs(with_lora(pipe, lora_file) - reference).mean() < 0.1 * effect
    assert np.array_equal(render(pipe), image)  # reset: back to the base model


def test_fused_qkv_is_exact_with_and_without_loras(base, lora_file):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    reference = with_lora(tiny(), lora_file)
    pipe = tiny()
    optimize.optimize_pipeline(pipe, CPU, compile=False, force=True, channels_last=False)
    assert "fused-qkv" in optimize.applied_optimizations(pipe)
    assert np.abs(render(pipe) - base[1]).max() <= 1
    assert np.abs(with_lora(pipe, lora_file) - reference).max() <= 1
    assert np.abs(render(pipe) - base[1]).max() <= 1  # LoRA reset: fused again

    # Why the LoRA-aware processor: diffusers' own fused processor never calls the
    # PEFT-wrapped to_q/to_k/to_v, so a LoRA would silently lose most of its effect.
    aware = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(FusedAttnProcessor2_0())
    try:
        assert np.abs(with_lora(pipe, lora_file) - reference).mean() > 5
    finally:
        pipe.unet.set_attn_processor(aware)


def test_sdpa_is_reported_only_where_processors_were_replaced():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = tiny()
    pipe.vae.set_attn_processor(AttnProcessor())
    optimize.optimize_pipeline(pipe, CPU, compile=False, force=True, fuse_qkv=False,
                               channels_last=False)
    assert optimize.applied_optimizations(pipe) == ("sdpa",)
    assert {type(p) for p in pipe.vae.attn_processors.values()} == {AttnProcessor2_0}
    optimize.optimize_pipeline(pipe, CPU, compile=False, force=True)  # once per pipeline
    assert optimize.applied_optimizations(pipe) == ("sdpa",)

    untouched = tiny()
    optimize.optimize_pipeline(untouched, CPU, compile=False, force=True, fuse_qkv=False,
                               channels_last=False)
    assert optimize.applied_optimizations(untouched) == ()


@pytest.fixture()
def small_vae_check(monkeypatch):
    """An 8x8 latent for the VAE check: fp16 convolutions are slow on the CPU."""
    monkeypatch.setattr(optimize, "VAE_CHECK_LATENT_SIZE", 8)


def fp16_vae_pipe(*, force_upcast: bool, weight_scale: float = 1.0):
    pipe = tiny()
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    if weight_scale != 1.0:
        with torch.no_grad():
            pipe.vae.decoder.conv_in.weight.mul_(weight_scale)
    return pipe


def optimize_vae_only(pipe, **kwargs) -> tuple[str, ...]:
    optimize.optimize_pipeline(pipe, CPU, compile=False, force=True, fuse_qkv=False,
                               channels_last=False, **kwargs)
    return optimize.applied_optimizations(pipe)


def test_vae_declared_fp16_safe_by_its_config_is_left_alone(monkeypatch):
    def no_check(vae):
        raise AssertionError("a VAE declared fp16-safe is not test-decoded")

    monkeypatch.setattr(optimize, "vae_fp16_peak", no_check)
    pipe = fp16_vae_pipe(force_upcast=False)
    assert optimize_vae_only(pipe) == ()
    assert pipe.vae.config.force_upcast is False


def test_vae_that_decodes_fine_in_fp16_stops_upcasting(small_vae_check):
    pipe = fp16_vae_pipe(force_upcast=True)  # e.g. an fp16-fix copy with an old config
    assert 0 < optimize.vae_fp16_peak(pipe.vae) < 100
    assert optimize_vae_only(pipe) == ("vae-no-upcast",)
    assert pipe.vae.config.force_upcast is False


@pytest.mark.parametrize("scale", [5e4, 1e4], ids=["overflows", "within-headroom"])
def test_vae_that_overflows_in_fp16_keeps_upcasting(small_vae_check, scale):
    # conv_in's weights scaled up (still finite in fp16): the decoder's activations pass
    # fp16's 65,504 (inf, then NaN), or come within a factor 2 of it; either way the
    # pipeline must keep decoding in fp32
    pipe = fp16_vae_pipe(force_upcast=True, weight_scale=scale)
    assert torch.isfinite(pipe.vae.decoder.conv_in.weight).all()
    peak = optimize.vae_fp16_peak(pipe.vae)
    assert peak == float("inf") if scale == 5e4 else 65_504 / 2 < peak < 65_504
    assert optimize.vae_fp16_overflows(pipe.vae)
    assert optimize_vae_only(pipe) == ()
    assert pipe.vae.config.force_upcast is True
    # the pipeline decodes in fp32, where the same VAE gives a finite image
    out = pipe(prompt=["a"], num_inference_steps=1, width=SIZE, height=SIZE, output_type="np",
               generator=[torch.Generator("cpu").manual_seed(7)])
    assert np.isfinite(out.images).all()


def test_vae_check_can_be_overridden(small_vae_check):
    pipe = fp16_vae_pipe(force_upcast=True, weight_scale=5e4)
    assert optimize_vae_only(pipe, vae_fp16_safe=True) == ("vae-no-upcast",)
    pipe = fp16_vae_pipe(force_upcast=True)
    assert optimize_vae_only(pipe, vae_fp16_safe=False) == ()
    assert pipe.vae.config.force_upcast is True


def test_int_timesteps_become_float_before_the_compiled_unet(base):
    hook = optimize._float_timestep
    sample, t = torch.zeros(1), torch.tensor(999)
    args, kwargs = hook(None, (sample, t), {"encoder_hidden_states": None})
    assert args[1].dtype == torch.float32 and args[1].item() == 999.0
    args, kwargs = hook(None, (sample,), {"timestep": t})
    assert kwargs["timestep"].dtype == torch.float32
    assert hook(None, (sample, torch.tensor(999.0)), {}) is None
    # the UNet embeds timesteps as float anyway: int and float give the same output
    unet = base[0].unet
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": torch.randn(2, 77, 64),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.ones(2, 6)},
    }
    with torch.no_grad():
        as_int = unet(timestep=torch.tensor(999), **inputs).sample
        as_float = unet(timestep=torch.tensor(999.0), **inputs).sample
    assert torch.equal(as_int, as_float)


class RecordingCompile:
    """Stands in for torch.compile: the "compiled" function counts its calls, then runs the
    original. Shows which forward ran without invoking dynamo or inductor."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.options: list[dict] = []

    def __call__(self, fn, **options):
        self.options.append(options)
        name = type(fn.__self__).__name__

        def compiled(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return compiled


def test_eager_runs_the_original_forward_of_a_compiled_pipeline(base, monkeypatch):
    recorder = RecordingCompile()
    monkeypatch.setattr(torch, "compile", recorder)
    pipe = tiny()
    with torch._dynamo.config.patch(recompile_limit=8):
        optimize.optimize_pipeline(pipe, CPU, compile=True, force=True, fuse_qkv=False,
                                   channels_last=False)
        assert torch._dynamo.config.recompile_limit == optimize.RECOMPILE_LIMIT
    assert optimize.applied_optimizations(pipe) == ("compile:default",)
    assert optimize.compiled_modules(pipe) == ["unet", "vae.decoder"]
    assert [o["dynamic"] for o in recorder.options] == [False, False]  # static shapes
    compiled_forward = pipe.unet.forward

    assert np.array_equal(render(pipe), base[1])
    assert recorder.calls == {"UNet2DConditionModel": STEPS, "Decoder": 1}  # CFG: one call a step
    recorder.calls.clear()
    with optimize.eager(pipe):
        assert pipe.unet.forward == type(pipe.unet).forward.__get__(pipe.unet)
        assert np.array_equal(render(pipe), base[1])
        with optimize.eager(pipe):  # nests
            pass
        assert recorder.calls == {}
    assert pipe.unet.forward is compiled_forward
    with pytest.raises(RuntimeError), optimize.eager(pipe):
        raise RuntimeError("a failed batch")
    assert pipe.unet.forward is compiled_forward  # restored after a failure too
    render(pipe)
    assert recorder.calls == {"UNet2DConditionModel": STEPS, "Decoder": 1}
    # compiling again leaves compiled parts alone
    assert optimize.compile_pipeline(pipe) is False and pipe.unet.forward is compiled_forward


def test_eager_is_a_no_op_for_an_uncompiled_pipeline(base):
    pipe = tiny()
    with optimize.eager(pipe):
        assert "forward" not in vars(pipe.unet) and "forward" not in vars(pipe.vae.decoder)
        assert np.array_equal(render(pipe), base[1])
    assert "forward" not in vars(pipe.unet)


@pytest.mark.compile
def test_lora_batches_under_eager_never_compile(base, lora_file):
    """With dynamo itself (backend "eager": tracing without inductor, seconds on the CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    reference = with_lora(tiny(), lora_file)
    pipe = tiny()
    optimize.optimize_pipeline(pipe, CPU, compile=True, force=True, fuse_qkv=False,
                               channels_last=False, compile_backend="eager")
    before = graphs()
    assert np.abs(render(pipe) - base[1]).max() <= 1
    warmed = graphs()
    assert warmed == before + 2  # the UNet and the VAE decoder, at this shape
    with optimize.eager(pipe):
        assert np.array_equal(with_lora(pipe, lora_file), reference)
    assert graphs() == warmed  # the LoRA batch compiled nothing
    # The LoRA's PEFT layers stay in pipe.unet (inactive), but the compiled forward is the
    # twin's, which PEFT never wrapped: the next batch without LoRAs compiles nothing either.
    assert np.abs(render(pipe) - base[1]).max() <= 1
    rewarmed = graphs()
    assert rewarmed == warmed
    manager = pipe._test_loras
    manager.apply([("style", lora_file, 0.5)])  # another LoRA state
    try:
        with optimize.eager(pipe):
            render(pipe)
    finally:
        manager.reset()
    assert np.abs(render(pipe) - base[1]).max() <= 1
    assert graphs() == rewarmed


@pytest.mark.compile
@pytest.mark.skipif(
    not os.environ.get("CRAFTSERVE_COMPILE_TESTS"),
    reason="inductor compiles for minutes on a small CPU; set CRAFTSERVE_COMPILE_TESTS=1",
)
def test_compiled_path_on_the_cpu(base):
    from diffusers import DPMSolverMultistepScheduler
    from torch._dynamo.utils import counters

    pipe = tiny()
    optimize.optimize_pipeline(pipe, CPU, compile=True, force=True)
    assert optimize.compiled_modules(pipe) == ["unet", "vae.decoder"]
    optimize.warm_up(pipe, CPU, sizes=[(SIZE, SIZE)], steps=1, force=True)
    graphs = counters["stats"]["unique_graphs"]
    assert np.abs(render(pipe) - base[1]).max() <= 2  # Euler: float timesteps
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    render(pipe)  # int timesteps: cast before the compiled UNet, so no new graph
    assert counters["stats"]["unique_graphs"] == graphs


# ---- the benchmark script ------------------------------------------------------------


@pytest.mark.subprocess
def test_bench_gpu_tiny_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--tiny", "--skip-http",
        "--size", "64", "--steps", "2", "--batches", "1,2", "--reps", "1", "--out", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(a)/(b) at batch 1" in done.stdout
    data = json.loads(out.read_text())
    cases = {(r["case"][:3], r["batch"]) for r in data["results"]}
    assert cases == {("(a)", 1), ("(b)", 1), ("(b)", 2)}
    assert all(r["ms_per_image"] > 0 for r in data["results"])


def load_bench_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_refuses_an_engine_that_did_not_apply_its_fast_path(monkeypatch):
    bench = load_bench_gpu()
    args = bench.parse_args(["--tiny", "--compile"])
    cuda = torch.device("cuda", 0)  # only its type is read: no GPU needed
    plain = tiny()
    missing = bench.engine_shortfalls(args, cuda, plain)
    assert any("fused-qkv" in m for m in missing) and any("channels-last" in m for m in missing)
    assert any("unet is not compiled" in m for m in missing)
    assert any("float32" in m for m in missing)
    assert bench.engine_shortfalls(args, CPU, plain) == []  # the CPU path applies nothing

    monkeypatch.setattr(torch, "compile", RecordingCompile())
    done = tiny()
    optimize.optimize_pipeline(done, CPU, compile=True, force=True)
    missing = bench.engine_shortfalls(args, cuda, done)
    assert [m for m in missing if "float32" not in m] == [
        "cudnn-benchmark was not applied (applied: ['channels-last', 'compile:default', "
        "'fused-qkv'])"
    ]

    def broken_engine(args, device, report):
        bench.require_engine_did_its_job(args, cuda, plain, "(b)")

    monkeypatch.setattr(bench, "bench_engine", broken_engine)
    assert bench.main(["--tiny", "--skip-baseline", "--skip-http"]) == 2

