"""models.yaml: validation at start-up, local diffusers folders, SD 1.x, the shipped file."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from app.registry import RegistryError, load_registry
from tests.conftest import body, png, shipped_models_text

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: {}\n", "models: is empty"),
        ("models:\n  a: {source: builtin:tiny-sdxl, colour: red}\n", "models.a.colour: unknown key"),
        ("models:\n  a: {source: builtin:tiny-sdxl, family: sd3}\n", "models.a.family"),
        ("models:\n  a: {source: builtin:huge}\n", "unknown builtin"),
        ("models:\n  a: {source: ./missing-folder}\n", "is not a folder"),
        ("models:\n  a: {source: 'not a repo id!'}\n", "neither an existing folder"),
        ("models:\n  a: {source: builtin:tiny-sdxl}\nloras:\n  x: {path: none.safetensors}\n",
         "loras.x.path"),
        ("models:\n  a: {source: builtin:tiny-sdxl}\nlora_dirs: [nowhere]\n", "lora_dirs"),
        ("models:\n  a: {source: builtin:tiny-sdxl}\nembedding_dirs: [nowhere]\n", "embedding_dirs"),
        ("models: [1, 2\n", "not valid YAML"),
        ("models:\n  a: {source: builtin:tiny-sdxl, default_sampler: Eulr}\n",
         "models.a.default_sampler"),
    ],
)
def test_bad_models_file_fails_fast_naming_file_and_key(tmp_path: Path, text: str,
                                                        expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_models_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="CRAFTSERVE_MODELS"):
        load_registry(tmp_path / "nope.yaml")


def test_family_is_read_from_a_local_checkpoint(tmp_path: Path, tiny_sd15_folder: Path) -> None:
    registry = load_registry(write(tmp_path, f"models:\n  m: {{source: {tiny_sd15_folder}}}\n"))
    assert registry.models["m"].family == "sd15"
    assert registry.models["m"].kind == "local"
    declared_wrong = write(tmp_path, f"models:\n  m: {{source: {tiny_sd15_folder}, family: sdxl}}\n")
    with pytest.raises(RegistryError, match="declared sdxl but the checkpoint is sd15"):
        load_registry(declared_wrong)


def test_relative_sources_resolve_against_the_file(tmp_path: Path, tiny_sd15_folder: Path) -> None:
    link = tmp_path / "models-dir"
    link.symlink_to(tiny_sd15_folder, target_is_directory=True)
    registry = load_registry(write(tmp_path, "models:\n  m: {source: models-dir}\n"))
    assert registry.models["m"].source == str(tiny_sd15_folder.resolve())


def test_local_sd15_folder_serves_images(make_server, tiny_sd15_folder: Path) -> None:
    models = f"""
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl}}
  local-sd15:
    source: {tiny_sd15_folder}
    default_sampler: Euler a
    preload: true
"""
    server = make_server(models)
    with server.client() as c:
        assert c.get("/sd/models-sd").json() == ["local-sd15"]
        assert c.get("/sd/models-sdxl").json() == ["tiny-sdxl"]
        answer = c.post("/sd", json=body(model="local-sd15", width=72, height=64))
        assert png(answer).size == (72, 64)
        assert answer.headers["x-sampler"] == "Euler a"
        again = c.post("/sd", json=body(model="local-sd15", width=72, height=64))
        assert again.content == answer.content
        # a model that is not preloaded loads on its first request
        png(c.post("/sd", json=body(model="tiny-sdxl")))


def test_shipped_models_file_offline(make_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without network or weights: tiny-sdxl serves, and /ready says why sdxl-base can't."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = load_registry(ROOT / "models.yaml")
    assert {"sdxl-base", "tiny-sdxl"} <= set(registry.models)
    assert registry.models["sdxl-base"].default_sampler == "DPM++ 2M Karras"
    server = make_server(shipped_models_text(), wait_ready=False, allow_downloads=False)
    with server.client() as c:
        deadline = time.monotonic() + 60
        while not all(w["preloaded"] for w in server.ready().json()["workers"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = c.get("/ready")  # without a key: the state words
        assert ready.status_code == 200, ready.json()
        assert ready.json()["status"] == "serving, some models wait for weights"
        assert ready.json()["models"] == {"sdxl-base": "waiting for weights", "tiny-sdxl": "loaded"}
        assert ready.json()["waiting_for_weights"] == ["sdxl-base"]
        png(c.post("/sd", json=body()))
        refused = c.post("/sd", json=body(model="sdxl-base"))
        assert refused.status_code == 503
        assert "hf download" in refused.json()["detail"]


def test_models_listed_by_family(client: httpx.Client) -> None:
    assert client.get("/sd/models-sdxl").json() == ["tiny-sdxl"]


# ---- dtype and files chosen for a device (no GPU here: the device's answers are faked) ----
def _spec(dtype: str = "auto"):
    from app.registry import ModelSpec

    return ModelSpec(name="m", source="owner/repo", kind="hub", family="sdxl", family_known=True,
                     default_sampler=None, dtype=dtype, vae=None, preload=False)


@pytest.mark.parametrize(("capability", "expected"), [
    ((9, 0), "bfloat16"),  # H100 / H200
    ((10, 0), "bfloat16"),  # Blackwell
    ((8, 9), "float16"),  # Ada (L4, RTX 4090)
    ((8, 0), "float16"),  # A100
    ((7, 5), "float16"),  # T4
])
def test_auto_dtype_is_bf16_on_hopper_and_newer_fp16_before(monkeypatch, capability, expected):
    import torch

    from app.engine.pipelines import choose_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_dtype(_spec(), torch.device("cuda", 0)) == getattr(torch, expected)
    assert choose_dtype(_spec("float32"), torch.device("cuda", 0)) == torch.float32
    assert choose_dtype(_spec(), torch.device("cpu")) == torch.float32


class _FakeRepo:
    """Records from_pretrained calls. `has` holds (cached, variant): (True, v) files are in
    the cache (found with or without local_files_only), (False, v) only on the Hub."""

    def __init__(self, has: set[tuple[bool, str | None]]) -> None:
        self.has = has
        self.calls: list[tuple[bool, str | None]] = []

    def from_pretrained(self, source, *, local_files_only, variant=None, **kwargs):
        self.calls.append((local_files_only, variant))
        if (True, variant) in self.has or ((False, variant) in self.has and not local_files_only):
            return f"{source}:{variant}"
        raise OSError("not there")


@pytest.mark.parametrize(("dtype", "allow", "has", "calls", "result"), [
    # half precision: the fp16 variant first, in the cache, then from the Hub
    ("float16", True, {(False, "fp16")}, [(True, "fp16"), (True, None), (False, "fp16")], "fp16"),
    ("bfloat16", True, {(True, "fp16")}, [(True, "fp16")], "fp16"),
    # a repo without fp16 files: the plain ones
    ("float16", True, {(False, None)},
     [(True, "fp16"), (True, None), (False, "fp16"), (False, None)], "None"),
    ("float16", False, {(True, None)}, [(True, "fp16"), (True, None)], "None"),
    # fp32 (the CPU) never asks for the half-precision files
    ("float32", True, {(True, None)}, [(True, None)], "None"),
])
def test_hub_loads_ask_for_the_fp16_variant_first_in_half_precision(dtype, allow, has, calls, result):
    import torch

    from app.engine.pipelines import _from_pretrained

    repo = _FakeRepo(has)
    loaded = _from_pretrained(repo, "owner/repo", allow, torch_dtype=getattr(torch, dtype))
    assert repo.calls == calls
    assert loaded == f"owner/repo:{result}"


def test_hub_load_failure_raises_the_last_error() -> None:
    import torch

    from app.engine.pipelines import _from_pretrained

    repo = _FakeRepo(set())
    with pytest.raises(OSError, match="not there"):
        _from_pretrained(repo, "owner/repo", False, torch_dtype=torch.float16)
    assert repo.calls == [(True, "fp16"), (True, None)]


def test_embedding_files_register_by_stem_and_family(tmp_path: Path, caplog) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.zeros(4, 768)}, folder / "EasyNegative.safetensors")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, folder / "negXL.safetensors")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, folder / "odd.safetensors")
    (folder / "old.pt").write_bytes(b"\x80\x02}q\x00.")
    path = write(tmp_path, "models:\n  a: {source: builtin:tiny-sdxl}\nembedding_dirs: [embeddings]\n")
    with caplog.at_level("WARNING", logger="app.registry"):
        registry = load_registry(path)
    found = {(e.name, e.family, e.vectors, e.width) for e in registry.embeddings}
    assert found == {("EasyNegative", "sd15", 4, 768), ("negXL", "sdxl", 2, 2048)}
    assert set(registry.embeddings_for("sdxl")) == {"negXL"}
    assert set(registry.embeddings_for("sd15")) == {"EasyNegative"}
    text = caplog.text
    assert "'old'" in text and ".safetensors" in text  # a pickle is not read, and says so
    assert "'odd'" in text
    assert "'EasyNegative' is made for SD 1.x and no SD 1.x model is served" in text
