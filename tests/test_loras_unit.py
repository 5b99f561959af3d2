"""LoRA family detection and the per-pipeline LoRA manager, on the tiny CPU pipelines.

The central promise is bit-exactness: after a LoRA was used and reset (or given weight 0, or
is merely cached), the pipeline renders exactly (np.array_equal) the image of a pipeline that
never loaded a LoRA, for the same seed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine.loras import LoraError, LoraManager, detect_lora_family
from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
from app.errors import CraftError
from tests.lora_files import (
    write_garbage_lora,
    write_kohya_lora,
    write_loha_lora,
    write_non_lora_safetensors,
    write_peft_lora,
)

STEPS = 4
SIZE = 64


def render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(1234)
    out = pipe(
        "a red fox in the snow",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        generator=generator,
        output_type="np",
    )
    return out.images[0]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models are all overhead: one thread is as fast, and on a busy machine
    several threads spin-wait on each other (a 64x64 render went from 0.2 s to 20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prepare(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl():
    """(pipe, base image rendered before any LoRA ever touched the pipe)."""
    pipe = _prepare(build_tiny_sdxl())
    return pipe, render(pipe)


@pytest.fixture(scope="module")
def sd15():
    pipe = _prepare(build_tiny_sd15())
    return pipe, render(pipe)


@pytest.fixture(scope="module")
def pipes(sdxl, sd15):
    return {"sdxl": sdxl, "sd15": sd15}


@pytest.fixture(scope="module")
def loras(tmp_path_factory, sdxl, sd15) -> dict[tuple[str, str], Path]:
    """LoRA files per (family, kind)."""
    root = tmp_path_factory.mktemp("loras")
    files: dict[tuple[str, str], Path] = {}
    for family, (pipe, _) in (("sdxl", sdxl), ("sd15", sd15)):
        files[family, "peft"] = write_peft_lora(pipe, root / f"{family}_peft.safetensors")
        files[family, "kohya"] = write_kohya_lora(pipe, root / f"{family}_kohya.safetensors")
        # same seed as "peft"/"kohya", the other UNet naming (diffusers for SDXL, SGM for SD 1.x)
        other = "diffusers" if family == "sdxl" else "sgm"
        files[family, "kohya_other"] = write_kohya_lora(
            pipe, root / f"{family}_kohya_other.safetensors", unet_naming=other, alpha=2
        )
        files[family, "b"] = write_peft_lora(pipe, root / f"{family}_b.safetensors", seed=1)
        files[family, "c"] = write_kohya_lora(pipe, root / f"{family}_c.safetensors", seed=2)
        files[family, "unet_only"] = write_kohya_lora(
            pipe, root / f"{family}_unet_only.safetensors", seed=3, text_encoder=False
        )
        files[family, "peft_unet_only"] = write_peft_lora(
            pipe, root / f"{family}_peft_unet_only.safetensors", seed=4, text_encoder=False
        )
        files[family, "loha"] = write_loha_lora(pipe, root / f"{family}_loha.safetensors")
    files["any", "garbage"] = write_garbage_lora(root / "garbage.safetensors")
    files["any", "plain"] = write_non_lora_safetensors(root / "plain.safetensors")
    return files


def _adapters_in_pipe(pipe) -> set[str]:
    found: set[str] = set()
    for names in pipe.get_list_adapters().values():
        found.update(names)
    return found


@pytest.fixture
def managers():
    """Makes managers and, after the test, removes every adapter they loaded."""
    made: list[LoraManager] = []

    def make(pipe, family, capacity=8, **kwargs) -> LoraManager:
        manager = LoraManager(pipe, family, capacity, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.reset()
        manager.clear()
        assert not _adapters_in_pipe(manager.pipe)


class LoadSpy:
    def __init__(self, pipe, monkeypatch):
        self.calls: list[str] = []
        original = pipe.load_lora_weights

        def spy(path, **kwargs):
            self.calls.append(str(path))
            return original(path, **kwargs)

        monkeypatch.setattr(pipe, "load_lora_weights", spy)


def _changed(image: np.ndarray, base: np.ndarray) -> bool:
    return float(np.abs(image - base).mean()) > 0.01


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("kind", ["peft", "kohya", "kohya_other", "unet_only", "peft_unet_only", "b", "c"])
def test_detect_family_of_tiny_loras(loras, family, kind):
    assert detect_lora_family(loras[family, kind]) == family


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage", "not a readable safetensors file"),
        ("plain", "not a LoRA"),
    ],
)
def test_detect_rejects_non_loras(loras, kind, reason):
    with pytest.raises(LoraError) as err:
        detect_lora_family(loras["any", kind], name="bad")
    assert err.value.status == 422
    assert isinstance(err.value, CraftError)
    assert str(err.value).startswith("lora 'bad': ")
    assert reason in str(err.value)


def test_detect_rejects_lycoris_and_missing(loras, tmp_path):
    with pytest.raises(LoraError, match="LyCORIS"):
        detect_lora_family(loras["sdxl", "loha"])
    with pytest.raises(LoraError, match="missing") as err:
        detect_lora_family(tmp_path / "nowhere.safetensors", name="gone")
    assert str(tmp_path) not in str(err.value)  # no server paths in client messages


def _header_file(path: Path, layers: dict[str, tuple[int, int]], metadata=None) -> Path:
    """A LoRA file of zero tensors with real shapes: {kohya or PEFT layer name: (in, out)}."""
    rank = 4
    state = {}
    for layer, (fan_in, fan_out) in layers.items():
        if layer.startswith("lora_"):
            state[f"{layer}.lora_down.weight"] = torch.zeros(rank, fan_in)
            state[f"{layer}.lora_up.weight"] = torch.zeros(fan_out, rank)
            state[f"{layer}.alpha"] = torch.tensor(float(rank))
        else:
            state[f"{layer}.lora_A.weight"] = torch.zeros(rank, fan_in)
            state[f"{layer}.lora_B.weight"] = torch.zeros(fan_out, rank)
    save_file(state, str(path), metadata=metadata)
    return path


_XL_KOHYA = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"  # SGM names, depth > 1
_XL_TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
_XL_PEFT = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
_SD1_BLOCK0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
_SD1_UP1 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
_TE1 = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize(
    ("layers", "metadata", "family"),
    [
        ({_XL_KOHYA: (2048, 640)}, None, "sdxl"),
        ({_XL_TE2: (1280, 1280)}, None, "sdxl"),
        ({_XL_PEFT: (2048, 640)}, None, "sdxl"),
        ({_SD1_BLOCK0: (768, 320)}, None, "sd15"),
        ({_SD1_UP1: (768, 1280)}, None, "sd15"),  # no structural cue: the 768 width tells
        ({_TE1: (768, 768)}, {"ss_base_model_version": "sd_v1"}, "sd15"),
        ({_TE1: (768, 768)}, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ],
)
def test_detect_real_world_layouts(tmp_path, layers, metadata, family):
    """Real SDXL / SD 1.x key names and widths (zero tensors, real shapes)."""
    path = _header_file(tmp_path / "lora.safetensors", layers, metadata)
    assert detect_lora_family(path) == family


def test_detect_refuses_sd2_and_undecidable(tmp_path):
    sd2 = _header_file(tmp_path / "sd2.safetensors", {_SD1_BLOCK0: (1024, 320)})
    with pytest.raises(LoraError, match="SD 2.x"):
        detect_lora_family(sd2)
    te_only = _header_file(tmp_path / "te.safetensors", {_TE1: (768, 768)})
    with pytest.raises(LoraError, match="cannot tell"):
        detect_lora_family(te_only)


# --------------------------------------------------------------------------- manager


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_apply_weight_zero_reset_and_cache(pipes, loras, managers, monkeypatch, family, kind):
    pipe, base = pipes[family]
    spy = LoadSpy(pipe, monkeypatch)
    manager = managers(pipe, family)
    path = loras[family, kind]

    manager.apply([("style", path, 0.0)])  # first load at weight 0: must change nothing
    assert np.array_equal(render(pipe), base)
    manager.apply([("style", path, 1.0)])
    with_lora = render(pipe)
    assert _changed(with_lora, base)
    manager.reset()
    assert np.array_equal(render(pipe), base)

    manager.apply([("style", path, 1.0)])  # cached: same adapter, file not read again
    assert np.array_equal(render(pipe), with_lora)
    manager.apply([])
    assert np.array_equal(render(pipe), base)
    assert spy.calls == [str(path)]
    assert manager.cached == ["style"]


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_kohya_conversion_matches_peft(pipes, loras, managers, family):
    """Same weights written as PEFT, kohya (with either UNet naming and alpha) -> same image."""
    pipe, base = pipes[family]
    manager = managers(pipe, family)
    images = {}
    for kind in ("peft", "kohya", "kohya_other"):
        manager.apply([(kind, loras[family, kind], 0.7)])
        images[kind] = render(pipe)
    manager.reset()
    assert _changed(images["peft"], base)
    assert np.array_equal(images["peft"], images["kohya"])
    assert np.array_equal(images["peft"], images["kohya_other"])


def test_cached_lora_survives_deleted_file(sdxl, loras, managers, tmp_path):
    pipe, base = sdxl
    copy = Path(shutil.copy(loras["sdxl", "peft"], tmp_path / "copy.safetensors"))
    manager = managers(pipe, "sdxl")
    manager.apply([("copy", copy, 1.0)])
    first = render(pipe)
    copy.unlink()
    manager.reset()
    manager.apply([("copy", copy, 1.0)])
    assert np.array_equal(render(pipe), first)
    manager.reset()
    assert np.array_equal(render(pipe), base)


def test_replaced_file_is_reloaded(sd15, loras, managers, monkeypatch, tmp_path):
    pipe, _ = sd15
    path = Path(shutil.copy(loras["sd15", "peft"], tmp_path / "style.safetensors"))
    spy = LoadSpy(pipe, monkeypatch)
    manager = managers(pipe, "sd15")
    manager.apply([("style", path, 1.0)])
    first = render(pipe)
    shutil.copy(loras["sd15", "b"], path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse filesystems
    manager.apply([("style", path, 1.0)])
    assert len(spy.calls) == 2
    assert not np.array_equal(render(pipe), first)
    assert len(_adapters_in_pipe(pipe)) == 1  # the old adapter is gone


def test_two_loras_combine_and_idle_cached_ones_do_nothing(sdxl, loras, managers):
    pipe, base = sdxl
    manager = managers(pipe, "sdxl")
    a, b, c = loras["sdxl", "peft"], loras["sdxl", "b"], loras["sdxl", "c"]

    manager.apply([("a", a, 0.8)])
    only_a = render(pipe)
    manager.apply([("b", b, 0.6)])
    only_b = render(pipe)
    manager.apply([("a", a, 0.8), ("b", b, 0.6)])
    both = render(pipe)
    manager.apply([("a", a, 0.8), ("b", b, -0.6)])
    both_negative_b = render(pipe)
    manager.apply([("c", c, 1.0)])  # a third cached adapter

    for image in (only_a, only_b, both, both_negative_b):
        assert _changed(image, base)
    assert not np.array_equal(both, only_a)
    assert not np.array_equal(both, only_b)
    assert not np.array_equal(both, both_negative_b)

    # a, b and c cached; only the requested ones contribute, with their own weights
    manager.apply([("a", a, 0.8)])
    assert np.array_equal(render(pipe), only_a)
    manager.apply([("b", b, 0.6), ("a", a, 0.8)])
    assert np.array_equal(render(pipe), both)
    manager.apply([("a", a, 0.8), ("b", b, 0.0)])
    assert np.array_equal(render(pipe), only_a)
    manager.reset()
    assert np.array_equal(render(pipe), base)
    assert sorted(manager.cached) == ["a", "b", "c"]


def test_lru_eviction(sd15, loras, managers, monkeypatch):
    pipe, base = sd15
    spy = LoadSpy(pipe, monkeypatch)
    manager = managers(pipe, "sd15", capacity=2)
    a, b, c = loras["sd15", "peft"], loras["sd15", "b"], loras["sd15", "c"]

    manager.apply([("a", a, 1.0)])
    manager.apply([("b", b, 1.0)])
    manager.apply([("a", a, 1.0)])  # a is now the most recently used
    adapter_b = manager.adapter_name("b")
    manager.apply([("c", c, 1.0)])  # evicts b, the least recently used
    assert manager.cached == ["a", "c"]
    assert adapter_b not in pipe.unet.peft_config
    assert adapter_b not in getattr(pipe.text_encoder, "peft_config", {})
    assert _adapters_in_pipe(pipe) == {manager.adapter_name("a"), manager.adapter_name("c")}
    assert len(spy.calls) == 3

    manager.apply([("b", b, 1.0)])  # reloaded, evicting a
    assert manager.cached == ["c", "b"]
    assert len(spy.calls) == 4
    manager.reset()
    assert np.array_equal(render(pipe), base)


def test_one_request_may_exceed_capacity(sd15, loras, managers):
    pipe, base = sd15
    manager = managers(pipe, "sd15", capacity=1)
    a, b = loras["sd15", "peft"], loras["sd15", "b"]
    manager.apply([("a", a, 1.0), ("b", b, 1.0)])
    assert sorted(manager.cached) == ["a", "b"]
    assert _changed(render(pipe), base)
    manager.apply([("b", b, 1.0)])
    assert manager.cached == ["b"]
    manager.reset()


@pytest.mark.parametrize(
    ("model_family", "lora_family", "says"),
    [
        ("sdxl", "sd15", "it is an SD 1.x LoRA; model 'tiny' is SDXL"),
        ("sd15", "sdxl", "it is an SDXL LoRA; model 'tiny' is SD 1.x"),
    ],
)
def test_wrong_family_is_refused_before_loading(
    pipes, loras, managers, monkeypatch, model_family, lora_family, says
):
    pipe, base = pipes[model_family]
    spy = LoadSpy(pipe, monkeypatch)
    manager = managers(pipe, model_family, model_name="tiny")
    with pytest.raises(LoraError) as err:
        manager.apply([("other", loras[lora_family, "kohya"], 1.0)])
    assert str(err.value) == f"lora 'other': {says}"
    assert err.value.status == 422
    assert spy.calls == []
    assert manager.cached == []


def test_failures_leave_no_adapter_and_others_still_work(sdxl, loras, managers):
    pipe, base = sdxl
    manager = managers(pipe, "sdxl")
    good = loras["sdxl", "peft"]
    manager.apply([("good", good, 1.0)])
    expected = render(pipe)
    manager.reset()

    bad_requests = {
        "garbage": (loras["any", "garbage"], "not a readable safetensors file"),
        "plain": (loras["any", "plain"], "not a LoRA"),
        "loha": (loras["sdxl", "loha"], "LyCORIS"),
    }
    for name, (path, reason) in bad_requests.items():
        with pytest.raises(LoraError, match=reason) as err:
            manager.apply([("good", good, 1.0), (name, path, 1.0)])  # good first, then bad
        assert err.value.name == name
        assert np.array_equal(render(pipe), base)
    # a declared family skips detection; diffusers then fails on the shapes
    with pytest.raises(LoraError, match="shapes do not match"):
        manager.apply([("forced", loras["sd15", "peft"], 1.0, "sdxl")])
    assert np.array_equal(render(pipe), base)
    assert manager.cached == ["good"]
    assert _adapters_in_pipe(pipe) == {manager.adapter_name("good")}

    manager.apply([("good", good, 1.0)])
    assert np.array_equal(render(pipe), expected)


def test_partially_matching_lora_is_refused(sdxl, loras, managers, tmp_path):
    pipe, base = sdxl
    state = load_file(str(loras["sdxl", "peft_unet_only"]))
    ghost = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state[f"{ghost}.lora_A.weight"] = torch.ones(4, 32)
    state[f"{ghost}.lora_B.weight"] = torch.ones(32, 4)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    manager = managers(pipe, "sdxl")
    with pytest.raises(LoraError, match=r"1 of its \d+ layers have no matching module"):
        manager.apply([("partial", path, 1.0, "sdxl")])
    assert manager.cached == []
    assert not _adapters_in_pipe(pipe)
    assert np.array_equal(render(pipe), base)


def test_loras_whose_weights_do_not_load_are_refused(sdxl, loras, managers, tmp_path):
    """diffusers only logs keys it could not load; the manager turns that into an error."""
    pipe, base = sdxl
    manager = managers(pipe, "sdxl")
    state = load_file(str(loras["sdxl", "peft"]))

    manager.apply([("other", loras["sdxl", "b"], 1.0)])  # another adapter already present
    for prefix, part in (("unet.", "lora_B"), ("text_encoder_2.", "lora_A")):
        broken = dict(state)
        del broken[next(k for k in state if k.startswith(prefix) and part in k)]
        save_file(broken, str(tmp_path / "missing.safetensors"))
        with pytest.raises(LoraError, match="do not fit"):
            manager.apply([(f"missing-{prefix}{part}", tmp_path / "missing.safetensors", 1.0)])
    manager.evict("other")

    all_zero = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}
    save_file(all_zero, str(tmp_path / "zero.safetensors"))
    with pytest.raises(LoraError, match="every LoRA up-weight is zero"):
        manager.apply([("zero", tmp_path / "zero.safetensors", 1.0)])

    named = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    save_file(named, str(tmp_path / "named.safetensors"))
    with pytest.raises(LoraError, match="PEFT adapter name"):
        manager.apply([("named", tmp_path / "named.safetensors", 1.0)])

    assert manager.cached == []
    assert not _adapters_in_pipe(pipe)
    assert np.array_equal(render(pipe), base)


def test_awkward_names_and_bad_requests(sd15, loras, managers):
    pipe, base = sd15
    manager = managers(pipe, "sd15")
    names = ["my.style-v2", "to", "cuda", "a b/c", "ünïcode"]
    manager.apply([(n, loras["sd15", "unet_only"], 0.2) for n in names])
    assert manager.cached == names
    for name in names:
        adapter = manager.adapter_name(name)
        assert adapter and "." not in adapter and adapter.isidentifier()
    assert _changed(render(pipe), base)
    with pytest.raises(LoraError, match="more than once"):
        manager.apply([("x", loras["sd15", "b"], 1.0), ("x", loras["sd15", "b"], 0.5)])
    with pytest.raises(LoraError, match="not a finite number"):
        manager.apply([("y", loras["sd15", "b"], float("nan"))])
    assert np.array_equal(render(pipe), base)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_bounded_under_churn(sd15, loras, managers, tmp_path):
    pipe, base = sd15
    files = [
        loras["sd15", "unet_only"],
        loras["sd15", "peft_unet_only"],
        write_kohya_lora(pipe, tmp_path / "m2.safetensors", seed=7, rank=2, text_encoder=False),
        write_peft_lora(pipe, tmp_path / "m3.safetensors", seed=8, rank=2, text_encoder=False),
    ]
    manager = managers(pipe, "sd15", capacity=2)
    # every 12 cycles: 4 loads and 4 evictions, the rest cache hits
    plans = [[0], [0, 1], [1], [0], [1], [1, 0], [2], [2, 3], [3], [2], [3], [3, 2]]

    def cycle(i: int) -> None:
        manager.apply([(f"m{k}", files[k], 0.5 + 0.1 * k) for k in plans[i % len(plans)]])
        manager.reset()

    for i in range(40):  # warm-up: allocator pools, lazily created PEFT wrappers
        cycle(i)
    before = _rss_mb()
    for i in range(200):
        cycle(i)
        assert len(manager.cached) <= 2
    growth = _rss_mb() - before
    assert growth < 60, f"RSS grew {growth:.1f} MB over 200 LoRA cycles"
    assert set(pipe.unet.peft_config) == {manager.adapter_name(n) for n in manager.cached}
    assert np.array_equal(render(pipe), base)


@pytest.mark.parametrize(("family", "build"), [("sdxl", build_tiny_sdxl), ("sd15", build_tiny_sd15)])
def test_used_pipe_equals_a_never_touched_one(pipes, family, build):
    """Runs last: after every test above loaded, switched and evicted LoRAs on the shared
    pipe, it renders exactly what a freshly built pipe that never saw a LoRA renders."""
    pipe, _ = pipes[family]
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())  # wrappers stay
    assert not _adapters_in_pipe(pipe)  # but no adapter is left
    assert np.array_equal(render(pipe), render(_prepare(build())))
