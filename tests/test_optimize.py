"""The GPU fast path (app.engine.optimize) and the random full-size SDXL (app.engine.random_sdxl).

No GPU here: the CPU path must stay exactly as it was (optimize_pipeline and warm_up do
nothing), and the GPU path's steps that the CPU can run (SDPA check, fused QKV with LoRAs,
channels-last, the VAE upcast switch, the timestep cast in front of the compiled UNet) are
forced onto the tiny pipeline and compared with the unoptimised one. The full-size SDXL is
built on the meta device only: its parameter counts are checked against the published ones.
"""

from __future__ import annotations

import json
import os
import re
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


def _readme_counts() -> dict[str, int] | None:
    """The figures of shared/sdxl-configs/README.md, where that folder is beside the repo."""
    readme = ROOT.parent / "shared" / "sdxl-configs" / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    found = {}
    for name, pattern in (
        ("unet", r"UNet ([\d,]+)"),
        ("vae", r"VAE ([\d,]+)"),
        ("text_encoder", r"text_encoder \(CLIP[^)]*\) ([\d,]+)"),
        ("text_encoder_2", r"text_encoder_2 \(OpenCLIP[^)]*\) ([\d,]+)"),
    ):
        match = re.search(pattern, text)
        if match:
            found[name] = int(match[1].replace(",", ""))
    return found


def test_full_size_parameter_counts_on_meta():
    pipe = build_random_sdxl(device="meta")
    counts = {name: count_parameters(getattr(pipe, name)) for name in EXPECTED_PARAMETERS}
    assert counts == EXPECTED_PARAMETERS
    readme = _readme_counts()
    if readme is not None:
        assert readme == EXPECTED_PARAMETERS
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
    # diffusers alone would keep 648 M parameters twice (1.3 GB in fp16): see optimize.py
    extra = optimize.fused_qkv_extra_parameters(pipe.unet)
    assert extra == 647_987_200


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
    assert optimize.applied_optimizations(pipe) == ("sdpa", "fused-qkv", "channels-last")
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


def test_fp16_fix_vae_stops_upcasting_and_others_keep_it():
    def pipe_with_vae(name: str):
        pipe = tiny()
        pipe.vae.to(torch.float16)
        pipe.vae.register_to_config(force_upcast=True, _name_or_path=name)
        optimize.optimize_pipeline(
            pipe, CPU, compile=False, force=True, fuse_qkv=False, channels_last=False
        )
        return pipe

    fixed = pipe_with_vae("madebyollin/sdxl-vae-fp16-fix")
    assert fixed.vae.config.force_upcast is False
    assert "vae-no-upcast" in optimize.applied_optimizations(fixed)
    original = pipe_with_vae("stabilityai/stable-diffusion-xl-base-1.0")
    assert original.vae.config.force_upcast is True


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


@pytest.mark.slow
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


@pytest.mark.slow
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
