"""LoRA files (header, format check), the registry's LoRA specs and the per-pipeline LoRA
manager, on the tiny CPU pipelines.

The central promise is bit-exactness: after a LoRA was used and reset (or given weight 0, or
is merely cached), the pipeline renders exactly (np.array_equal) the image of a pipeline that
never loaded a LoRA, for the same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.engine.loras import LoraManager
from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
from app.errors import CraftError, LoraError
from app.lora_files import check_lora_file, read_header
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
        # same seed again, PEFT with diffusers' adapter metadata (lora_alpha 2 of rank 4)
        files[family, "peft_alpha"] = write_peft_lora(
            pipe, root / f"{family}_peft_alpha.safetensors", alpha=2
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
    """Records every LoRA file the manager reads (it reads each file once per load)."""

    def __init__(self, pipe, monkeypatch):
        self.calls: list[str] = []
        original = pipe.lora_state_dict

        def spy(path, **kwargs):
            self.calls.append(str(path))
            return original(path, **kwargs)

        monkeypatch.setattr(pipe, "lora_state_dict", spy)


def _changed(image: np.ndarray, base: np.ndarray) -> bool:
    return float(np.abs(image - base).mean()) > 0.01


# --------------------------------------------------------------------------- LoRA files


@pytest.mark.parametrize("kind", ["peft", "peft_alpha", "kohya", "loha", "plain"])
def test_header_agrees_with_safetensors(loras, kind):
    """The torch-free header reader sees what safetensors itself sees."""
    path = loras["any" if kind == "plain" else "sdxl", kind]
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        assert list(header.keys) == keys
        assert {k: tuple(f.get_slice(k).get_shape()) for k in keys} == dict(header.shapes)
        assert {k: f.get_slice(k).get_dtype() for k in keys} == dict(header.dtypes)
        assert dict(f.metadata() or {}) == dict(header.metadata)


def _rewrite(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _broken_files(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    first = next(k for k in header if k != "__metadata__")

    def changed(name: str, **fields) -> Path:
        edited = dict(header)
        edited[first] = {**header[first], **fields}
        return _rewrite(folder / f"{name}.safetensors", edited, data)

    def written(name: str, content: bytes) -> Path:
        path = folder / f"{name}.safetensors"
        path.write_bytes(content)
        return path

    return {
        "empty": (written("empty", b""), "shorter than a safetensors header"),
        "truncated data": (written("cut", raw[: len(raw) - 10]), "truncated"),
        "truncated header": (written("cut-header", raw[: 8 + length // 2]), "truncated"),
        "huge header length": (written("huge", struct.pack("<Q", 2**40) + raw[8:]), "not plausible"),
        "not JSON": (written("text", struct.pack("<Q", 4) + b"\xff{x}" + data), "not JSON"),
        "JSON list": (_rewrite(folder / "list.safetensors", [1], data), "not a JSON object"),  # type: ignore[arg-type]
        "bad metadata": (
            _rewrite(folder / "meta.safetensors", {**header, "__metadata__": {"a": 1}}, data),
            "__metadata__",
        ),
        "offsets off": (changed("offsets", data_offsets=[0, 3]), "data_offsets"),
        "shape off": (changed("shape", shape=[-1]), "invalid shape"),
        "trailing bytes": (written("trailing", raw + b"\0" * 8), "after the tensor data"),
    }


def test_broken_files_are_named_not_readable(loras, tmp_path):
    """Each broken file is refused by safetensors itself (the independent truth) and, with a
    clear reason, by the header reader; the message never shows the server's path."""
    for case, (path, says) in _broken_files(loras["sdxl", "peft"], tmp_path).items():
        with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type varies
            load_file(str(path))
        with pytest.raises(LoraError) as err:
            read_header(path, name="bad")
        message = str(err.value)
        assert message.startswith("lora 'bad': the file is not a readable safetensors file ("), case
        assert says in message, (case, message)
        assert str(tmp_path) not in message
        with pytest.raises(LoraError, match="not a readable safetensors file"):
            check_lora_file(path)


def test_file_reading_is_torch_free(loras):
    """The registry reads LoRA files before any model is loaded: no torch, diffusers, peft."""
    code = (
        "import sys\n"
        "from app.lora_files import check_lora_file, read_header\n"
        f"assert check_lora_file({str(loras['sdxl', 'kohya'])!r}).keys\n"
        f"assert read_header({str(loras['sd15', 'peft'])!r}).keys\n"
        "heavy = ('torch', 'diffusers', 'peft', 'safetensors', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_lora_error_is_its_own_kind():
    error = LoraError("style", "not a LoRA")
    assert isinstance(error, CraftError)
    assert (error.status, error.kind) == (422, "invalid_lora")
    assert str(error) == error.message == "lora 'style': not a LoRA"
    assert (error.name, error.reason) == ("style", "not a LoRA")


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize(
    "kind", ["peft", "peft_alpha", "kohya", "kohya_other", "unet_only", "peft_unet_only", "b", "c"]
)
def test_plain_loras_pass_the_format_check(loras, family, kind):
    assert check_lora_file(loras[family, kind]).keys


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage", "not a readable safetensors file"),
        ("plain", "not a LoRA"),
    ],
)
def test_format_check_rejects_non_loras(loras, kind, reason):
    with pytest.raises(LoraError) as err:
        check_lora_file(loras["any", kind], name="bad")
    assert err.value.status == 422
    assert isinstance(err.value, CraftError)
    assert str(err.value).startswith("lora 'bad': ")
    assert reason in str(err.value)


def test_format_check_rejects_lycoris_and_missing(loras, tmp_path):
    with pytest.raises(LoraError, match="LyCORIS"):
        check_lora_file(loras["sdxl", "loha"])
    with pytest.raises(LoraError, match="missing") as err:
        check_lora_file(tmp_path / "nowhere.safetensors", name="gone")
    assert str(tmp_path) not in str(err.value)  # no server paths in client messages
    with pytest.raises(LoraError, match="directory"):
        check_lora_file(tmp_path)


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
    """Same weights written as PEFT (plain, or with adapter metadata and alpha), kohya (with
    either UNet naming and alpha) -> the same image: the file is read once and its alphas and
    metadata reach PEFT."""
    pipe, base = pipes[family]
    manager = managers(pipe, family)
    images = {}
    for kind in ("peft", "peft_alpha", "kohya", "kohya_other"):
        manager.apply([(kind, loras[family, kind], 0.7)])
        images[kind] = render(pipe)
    manager.reset()
    assert _changed(images["peft"], base)
    for kind in ("peft_alpha", "kohya", "kohya_other"):
        assert np.array_equal(images["peft"], images[kind]), kind


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
    ("model_family", "lora_family", "label"),
    [("sdxl", "sd15", "SDXL"), ("sd15", "sdxl", "SD 1.x")],
)
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_lora_for_another_family_fails_at_load(
    pipes, loras, managers, model_family, lora_family, label, kind
):
    """The family check itself is the registry's and the request's (test_loras_http); a file
    that reaches the manager anyway fails to fit, with a reason, and leaves nothing behind."""
    pipe, base = pipes[model_family]
    manager = managers(pipe, model_family, model_name="tiny")
    with pytest.raises(LoraError) as err:
        manager.apply([("other", loras[lora_family, kind], 1.0)])
    message = str(err.value)
    assert message.startswith("lora 'other': its layer")
    assert f"model 'tiny' ({label}) (is it for another base model?)" in message
    assert err.value.status == 422
    assert manager.cached == []
    assert not _adapters_in_pipe(pipe)
    assert np.array_equal(render(pipe), base)


def test_failures_leave_no_adapter_and_others_still_work(sdxl, loras, managers, tmp_path):
    pipe, base = sdxl
    manager = managers(pipe, "sdxl")
    good = loras["sdxl", "peft"]
    manager.apply([("good", good, 1.0)])
    expected = render(pipe)
    manager.reset()

    bad_requests = {
        "garbage": (loras["any", "garbage"], "not a readable safetensors file"),
        "plain": (loras["any", "plain"], "not a LoRA: the file holds no LoRA weights"),
        "loha": (loras["sdxl", "loha"], "unsupported format"),
        "forced": (loras["sd15", "peft"], "another base model"),
        "gone": (tmp_path / "gone.safetensors", "missing on the server"),
        "folder": (tmp_path, "not a file"),
    }
    for name, (path, reason) in bad_requests.items():
        with pytest.raises(LoraError, match=reason) as err:
            manager.apply([("good", good, 1.0), (name, path, 1.0)])  # good first, then bad
        assert err.value.name == name
        assert str(tmp_path) not in str(err.value)
        assert np.array_equal(render(pipe), base)
    assert manager.cached == ["good"]
    assert _adapters_in_pipe(pipe) == {manager.adapter_name("good")}

    manager.apply([("good", good, 1.0)])
    assert np.array_equal(render(pipe), expected)


def test_partially_matching_lora_is_refused(sdxl, loras, managers, tmp_path):
    pipe, base = sdxl
    state = load_file(str(loras["sdxl", "peft_unet_only"]))
    layers = len([k for k in state if k.endswith("lora_A.weight")])
    ghost = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # no such module
    state[f"{ghost}.lora_A.weight"] = torch.ones(4, 32)
    state[f"{ghost}.lora_B.weight"] = torch.ones(32, 4)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    stray = tmp_path / "stray.safetensors"  # a layer of no pipeline part: diffusers skips it
    vae_layer = "vae.decoder.conv_in"
    extra = {f"{vae_layer}.lora_A.weight": torch.ones(4, 4), f"{vae_layer}.lora_B.weight": torch.ones(4, 4)}
    save_file({**load_file(str(loras["sdxl", "peft"])), **extra}, str(stray))
    manager = managers(pipe, "sdxl")
    with pytest.raises(LoraError, match=rf"1 of its {layers + 1} layers match no module of this SDXL model"):
        manager.apply([("partial", path, 1.0)])
    with pytest.raises(LoraError, match=r"1 of its \d+ layers match no module"):
        manager.apply([("stray", stray, 1.0)])
    assert manager.cached == []
    assert not _adapters_in_pipe(pipe)
    assert np.array_equal(render(pipe), base)


def test_incomplete_layers_are_refused(sdxl, loras, managers, tmp_path):
    """A layer with only one of its two matrices in the file: diffusers loads it with a
    PEFT-initialised other half and only logs it."""
    pipe, base = sdxl
    manager = managers(pipe, "sdxl")
    state = load_file(str(loras["sdxl", "peft"]))
    manager.apply([("other", loras["sdxl", "b"], 1.0)])  # another adapter already present
    for prefix, part in (("unet.", "lora_B"), ("unet.", "lora_A"), ("text_encoder_2.", "lora_A"),
                         ("text_encoder.", "lora_B")):
        broken = dict(state)
        del broken[next(k for k in state if k.startswith(prefix) and part in k)]
        save_file(broken, str(tmp_path / "missing.safetensors"))
        with pytest.raises(LoraError, match=r"1 of its \d+ layers are incomplete"):
            manager.apply([(f"missing-{prefix}{part}", tmp_path / "missing.safetensors", 1.0)])
    manager.evict("other")
    assert manager.cached == []
    assert not _adapters_in_pipe(pipe)
    assert np.array_equal(render(pipe), base)


def test_weights_that_silently_do_not_load_are_refused(sdxl, loras, managers, monkeypatch):
    """If diffusers or transformers skip a weight without an error, the adapter holds a
    PEFT-initialised matrix instead of the file's: simulated here in the UNet (a lora_B left
    at its zero init) and in the second text encoder (a key dropped before loading)."""
    pipe, base = sdxl
    manager = managers(pipe, "sdxl")
    path = loras["sdxl", "peft"]
    load_into_unet = pipe.unet.load_lora_adapter

    def unet_drops_one(*args, **kwargs):
        load_into_unet(*args, **kwargs)
        adapter = kwargs["adapter_name"]
        layer = next(m for m in pipe.unet.modules() if adapter in getattr(m, "lora_B", {}))
        fresh = torch.zeros_like(layer.lora_B[adapter].weight)
        layer.lora_B[adapter].weight = torch.nn.Parameter(fresh, requires_grad=False)

    monkeypatch.setattr(pipe.unet, "load_lora_adapter", unet_drops_one)
    with pytest.raises(LoraError, match=r"1 of its \d+ weights did not load into the model's layers"):
        manager.apply([("unet-drop", path, 1.0)])
    monkeypatch.undo()

    load_into_te2 = pipe.text_encoder_2.load_adapter

    def te2_drops_one(*args, **kwargs):
        state = dict(kwargs["adapter_state_dict"])
        del state[sorted(state)[0]]
        return load_into_te2(*args, **{**kwargs, "adapter_state_dict": state})

    monkeypatch.setattr(pipe.text_encoder_2, "load_adapter", te2_drops_one)
    with pytest.raises(LoraError, match=r"1 of its \d+ weights did not load"):
        manager.apply([("te2-drop", path, 1.0)])
    monkeypatch.undo()

    assert manager.cached == []
    assert not _adapters_in_pipe(pipe)
    assert np.array_equal(render(pipe), base)
    manager.apply([("fine", path, 1.0)])  # the same file, loaded normally, fits
    assert manager.cached == ["fine"]


def test_zero_lora_loads_and_changes_nothing(sdxl, loras, managers, tmp_path):
    """A LoRA whose up weights are all zero fits (its values are what the model holds) and
    adds exactly nothing."""
    pipe, base = sdxl
    state = load_file(str(loras["sdxl", "peft"]))
    zero = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}
    save_file(zero, str(tmp_path / "zero.safetensors"))
    manager = managers(pipe, "sdxl")
    manager.apply([("zero", tmp_path / "zero.safetensors", 1.0)])
    assert np.array_equal(render(pipe), base)


def test_adapter_named_keys_are_refused(sdxl, loras, managers, tmp_path):
    pipe, base = sdxl
    state = load_file(str(loras["sdxl", "peft"]))
    named = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    path = tmp_path / "named.safetensors"
    save_file(named, str(path))
    with pytest.raises(LoraError, match="PEFT adapter name"):
        check_lora_file(path)  # what the registry says
    manager = managers(pipe, "sdxl")
    with pytest.raises(LoraError, match="not a LoRA"):
        manager.apply([("named", path, 1.0)])
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
    with pytest.raises(TypeError, match=r"\(name, path, weight\)"):
        manager.apply([("z", loras["sd15", "b"], 1.0, "sd15")])  # the old declared-family form
    assert np.array_equal(render(pipe), base)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.soak
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
def test_used_pipe_equals_a_never_touched_one(loras, managers, tmp_path, family, build):
    """A pipe of its own goes through loads (both formats), switches, combinations, weight 0,
    LRU evictions, a refused load, a reload after the file changed, evict() and clear(); then
    it renders exactly what a freshly built pipe that never saw a LoRA renders."""
    pipe = _prepare(build())
    manager = managers(pipe, family, capacity=2)
    peft, kohya, b, c = (loras[family, kind] for kind in ("peft", "kohya", "b", "c"))
    other_family = loras["sd15" if family == "sdxl" else "sdxl", "peft"]
    changing = Path(shutil.copy(loras[family, "unet_only"], tmp_path / "changing.safetensors"))

    plans = [
        [("peft", peft, 1.0)],
        [("kohya", kohya, 0.5), ("peft", peft, -0.7)],
        [("b", b, 1.0)],  # evicts kohya
        [("b", b, 0.0), ("c", c, 0.8)],  # evicts peft
        [("changing", changing, 1.0)],
    ]
    base = render(pipe)
    for plan in plans:
        manager.apply(plan)
        assert _changed(render(pipe), base), plan
        manager.reset()
    with pytest.raises(LoraError):
        manager.apply([("c", c, 1.0), ("other", other_family, 1.0)])
    shutil.copy(loras[family, "peft_unet_only"], changing)
    os.utime(changing, ns=(2, 2))
    manager.apply([("changing", changing, 0.6), ("c", c, 0.3)])
    render(pipe)
    manager.evict("c")
    manager.apply([("peft", peft, 1.0)])
    render(pipe)
    manager.reset()
    manager.clear()

    from peft.tuners.tuners_utils import BaseTunerLayer

    assert any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())  # wrappers stay
    assert not _adapters_in_pipe(pipe)  # but no adapter is left
    assert np.array_equal(render(pipe), render(_prepare(build())))
