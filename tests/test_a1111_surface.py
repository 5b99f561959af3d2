"""The rest of A1111's surface (issue 23): hashes that are never null and are cached across
restarts, prompt styles applied as A1111 applies them, and every route A1111 clients call while
connecting (png-info, memory, cmd-flags, unload/reload-checkpoint, the empty lists, gradio's
ping / queue / login checks). Expected values are computed here, independently: hashlib and
sha256sum over the files, texts worked out by hand from the styles.csv below, PIL for PNG
chunks, psutil and /proc for memory."""

from __future__ import annotations

import base64
import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from app.engine.tiny import build_tiny_sdxl
from app.errors import NotServed
from app.file_hashes import HashCache, builtin_sha256, weights_file
from app.registry import RegistryError, load_registry
from app.styles import apply_styles, extract_styles, read_styles
from tests.conftest import API_KEY, write_models_file
from tests.live import LiveServer
from tests.lora_files import write_peft_lora

PLAIN_KEY = "plain-key-456"  # a key without the admin role
SMALL = {"width": 64, "height": 64, "steps": 4}
STYLES_CSV = (
    "\ufeffname,prompt,negative_prompt\n"
    '"cinematic","cinematic still of {prompt}, film grain","cartoon, {prompt}"\n'
    "sharp,  sharp focus  ,blurry\n"
    "# a comment row,not a style,\n"
    'painted,"{prompt}, oil painting <lora:style-peft:0.5>",\n'
)
MODELS = """
models:
  tiny-sdxl: {{source: builtin:tiny-sdxl, preload: true}}
  folder-sd15: {{source: {folder}}}
lora_dirs: [{loras}]
styles_file: {styles}
"""


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"user:{key}".encode()).decode()}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256sum(path: Path) -> str:
    if shutil.which("sha256sum") is None:
        return file_sha256(path)
    return subprocess.run(["sha256sum", str(path)], check=True, capture_output=True,
                          text=True).stdout.split()[0]


def a1111_error(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status, answer.text
    data = answer.json()
    assert set(data) == {"error", "detail", "body", "errors"}, data
    return data


# ---- styles, without a server ----------------------------------------------------------------
@pytest.fixture()
def styles_table(tmp_path: Path) -> dict:
    path = tmp_path / "styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8")
    return read_styles(path)


def test_styles_csv_is_read_as_a1111_reads_it(styles_table: dict) -> None:
    assert list(styles_table) == ["cinematic", "sharp", "painted"]  # the comment row is skipped
    assert styles_table["cinematic"].negative_prompt == "cartoon, {prompt}"
    assert styles_table["sharp"].prompt == "sharp focus  "  # skipinitialspace, as A1111
    assert styles_table["painted"].negative_prompt == ""


def test_styles_apply_in_order_as_a1111(styles_table: dict) -> None:
    # worked out by hand from A1111's rule: {prompt} is replaced, else ", " + the style
    assert apply_styles("a fox", "ugly", ["cinematic", "sharp"], styles_table) == (
        "cinematic still of a fox, film grain, sharp focus", "cartoon, ugly, blurry")
    assert apply_styles("a fox", "ugly", ["sharp", "cinematic"], styles_table) == (
        "cinematic still of a fox, sharp focus, film grain", "cartoon, ugly, blurry")
    assert apply_styles("", "", ["sharp"], styles_table) == ("sharp focus", "blurry")
    assert apply_styles("  a fox ", "", ["painted"], styles_table) == (
        "  a fox , oil painting <lora:style-peft:0.5>", "")
    assert apply_styles("a fox", "ugly", [], styles_table) == ("a fox", "ugly")
    with pytest.raises(NotServed) as caught:
        apply_styles("a fox", "", ["sharp", "noir"], styles_table)
    assert caught.value.status == 422 and "styles 'noir'" in caught.value.message
    assert "cinematic" in caught.value.message  # the served ones are listed


def test_styles_are_read_back_from_a_styled_prompt(styles_table: dict) -> None:
    assert extract_styles("cinematic still of a fox, film grain, sharp focus", "cartoon, ugly, blurry",
                          styles_table) == (["cinematic", "sharp"], "a fox", "ugly")
    assert extract_styles("a fox", "ugly", styles_table) == ([], "a fox", "ugly")


def test_a_bad_styles_file_stops_the_start_naming_it(tmp_path: Path) -> None:
    base = "models:\n  tiny: {source: builtin:tiny-sdxl}\n"
    missing = write_models_file(tmp_path, base + "styles_file: nowhere.csv\n")
    with pytest.raises(RegistryError, match=r"styles_file: .*nowhere\.csv is not a file"):
        load_registry(missing)
    (tmp_path / "wrong.csv").write_text("title,text\nx,y\n", encoding="utf-8")
    wrong = write_models_file(tmp_path, base + "styles_file: wrong.csv\n")
    with pytest.raises(RegistryError, match=r"wrong\.csv: the first row must name the columns"):
        load_registry(wrong)


# ---- hashes, without a server ----------------------------------------------------------------
def test_hash_cache_equals_sha256sum_and_a_second_start_does_not_read_the_file(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(3 * (1 << 20) + 123))
    first = HashCache(tmp_path / "cache")
    digest = first.sha256(weights)
    assert digest == sha256sum(weights) == file_sha256(weights)
    assert first.reads == 1 and first.sha256(weights) == digest and first.reads == 1
    # Same size, same time, other bytes: a cache that reads the file would see the change.
    stat = weights.stat()
    weights.write_bytes(os.urandom(stat.st_size))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = HashCache(tmp_path / "cache")  # a new process: only the cache file is shared
    assert second.sha256(weights) == digest and second.reads == 0
    # A new time: read again.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert second.sha256(weights) == file_sha256(weights) != digest and second.reads == 1


def test_hash_cache_that_cannot_be_written_still_hashes(tmp_path: Path, caplog) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    cache = HashCache(tmp_path / "blocked")
    assert cache.sha256(weights) == file_sha256(weights)
    assert "cannot be written" in caplog.text


def test_the_file_that_stands_for_a_diffusers_folder(tiny_sd15_folder: Path) -> None:
    assert weights_file(str(tiny_sd15_folder), "local") == \
        tiny_sd15_folder / "unet" / "diffusion_pytorch_model.safetensors"
    source = Path(__file__).resolve().parent.parent / "app" / "engine" / "tiny.py"
    assert builtin_sha256("builtin:tiny-sdxl") == hashlib.sha256(
        b"craftserve builtin:tiny-sdxl\n" + source.read_bytes()).hexdigest()
    assert builtin_sha256("builtin:tiny-sd15") != builtin_sha256("builtin:tiny-sdxl")


# ---- a live server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_sd15_folder: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("a1111-surface")
    folder = root / "folder-sd15"
    shutil.copytree(tiny_sd15_folder, folder)
    loras = root / "loras"
    loras.mkdir()
    write_peft_lora(build_tiny_sdxl(), loras / "style-peft.safetensors", seed=1)
    styles = root / "styles.csv"
    styles.write_text(STYLES_CSV, encoding="utf-8")
    return {"folder": folder, "loras": loras, "styles": styles, "cache": root / "cache"}


def models_text(files: dict[str, Path]) -> str:
    return MODELS.format(folder=files["folder"], loras=files["loras"], styles=files["styles"])


@pytest.fixture(scope="module")
def server(make_server, files: dict[str, Path]) -> LiveServer:
    return make_server(models_text(files), api_keys=[f"{API_KEY}  admin", PLAIN_KEY],
                       cache_dir=files["cache"])


@pytest.fixture()
def c(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers=basic(API_KEY)) as client:
        yield client


@pytest.fixture()
def api(server: LiveServer) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port))
    client.set_auth("whoever", API_KEY)
    return client


def txt2img(c: httpx.Client, **fields: Any) -> dict:
    answer = c.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def unet_file(files: dict[str, Path]) -> Path:
    return files["folder"] / "unet" / "diffusion_pytorch_model.safetensors"


def test_sd_models_and_options_carry_real_hashes(c: httpx.Client, api: webuiapi.WebUIApi,
                                                 files: dict[str, Path]) -> None:
    expected = {"tiny-sdxl": builtin_sha256("builtin:tiny-sdxl"),
                "folder-sd15": sha256sum(unet_file(files))}
    models = api.get_sd_models()
    assert {m["model_name"]: m["sha256"] for m in models} == expected
    assert all(m["hash"] == m["sha256"][:10] for m in models)
    assert [m["title"] for m in models] == ["tiny-sdxl", "folder-sd15"]
    assert api.get_options()["sd_checkpoint_hash"] == expected["tiny-sdxl"]
    try:
        api.util_set_model("folder-sd15")
        assert api.get_options()["sd_checkpoint_hash"] == expected["folder-sd15"]
    finally:
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"})


class A1111Info(BaseModel):
    """The `info` of A1111 v1.10's txt2img answer (modules/processing.py, Processed.js()), each
    field typed as A1111 fills it for a txt2img without hires fix or face restoration. Every
    field is required; extra keys are allowed (extensions add some)."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: StrictStr
    all_prompts: list[StrictStr]
    negative_prompt: StrictStr
    all_negative_prompts: list[StrictStr]
    seed: StrictInt
    all_seeds: list[StrictInt]
    subseed: StrictInt
    all_subseeds: list[StrictInt]
    subseed_strength: StrictInt | StrictFloat
    width: StrictInt
    height: StrictInt
    sampler_name: StrictStr
    cfg_scale: StrictInt | StrictFloat
    steps: StrictInt
    batch_size: StrictInt
    restore_faces: StrictBool
    face_restoration_model: StrictStr | None  # None unless restore_faces
    sd_model_name: StrictStr
    sd_model_hash: StrictStr  # the checkpoint's short hash, always a string
    sd_vae_name: StrictStr | None  # None when the checkpoint's own VAE runs
    sd_vae_hash: StrictStr | None
    seed_resize_from_w: StrictInt
    seed_resize_from_h: StrictInt
    denoising_strength: StrictInt | StrictFloat | None  # None without hires fix
    extra_generation_params: dict[StrictStr, Any]
    index_of_first_image: StrictInt
    infotexts: list[StrictStr]
    styles: list[StrictStr]
    job_timestamp: StrictStr
    clip_skip: StrictInt
    is_using_inpainting_conditioning: StrictBool
    version: StrictStr


def test_a_strict_client_validates_info_and_styles_apply_as_a1111(c: httpx.Client, files) -> None:
    data = txt2img(c, prompt="a fox", negative_prompt="ugly", styles=["cinematic", "sharp"], seed=7,
                   batch_size=2)
    raw = json.loads(data["info"])
    info = A1111Info.model_validate(raw)
    with pytest.raises(ValidationError):  # the check this test makes: a null hash fails it
        A1111Info.model_validate({**raw, "sd_model_hash": None})
    styled, negative = "cinematic still of a fox, film grain, sharp focus", "cartoon, ugly, blurry"
    assert (info.prompt, info.negative_prompt) == (styled, negative)
    assert info.all_prompts == [styled] * 2 and info.all_negative_prompts == [negative] * 2
    assert info.styles == ["cinematic", "sharp"]
    assert info.sd_model_hash == builtin_sha256("builtin:tiny-sdxl")[:10]
    assert info.sd_vae_name is None and info.sd_vae_hash is None
    assert info.infotexts[1].startswith(f"{styled}\nNegative prompt: {negative}\nSteps: 4,")
    png = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert png.info["parameters"].startswith(f"{styled}\nNegative prompt: {negative}\n")
    # `parameters` echoes the request as sent; the image is the styled prompt's
    assert (data["parameters"]["prompt"], data["parameters"]["negative_prompt"]) == ("a fox", "ugly")
    assert data["parameters"]["styles"] == ["cinematic", "sharp"]
    plain = txt2img(c, prompt=styled, negative_prompt=negative, seed=7)
    assert Image.open(io.BytesIO(base64.b64decode(plain["images"][0]))).tobytes() == png.tobytes()
    assert json.loads(plain["info"])["styles"] == []


def test_a_style_can_carry_a_lora_and_info_names_its_hash(c: httpx.Client, files) -> None:
    data = txt2img(c, prompt="a fox", negative_prompt="ugly", styles=["painted"], seed=3)
    info = A1111Info.model_validate(json.loads(data["info"]))
    assert info.prompt == "a fox, oil painting <lora:style-peft:0.5>" and info.negative_prompt == "ugly"
    lora_hash = file_sha256(files["loras"] / "style-peft.safetensors")[:12]
    assert info.extra_generation_params["Lora hashes"] == f"style-peft: {lora_hash}"
    assert info.infotexts[0].startswith("a fox, oil painting <lora:style-peft:0.5>\nNegative prompt: ugly\n")
    unstyled = txt2img(c, prompt="a fox", negative_prompt="ugly", seed=3)
    assert unstyled["images"][0] != data["images"][0]  # the style's LoRA changed the image


def test_styles_apply_to_the_hires_prompts_given(c: httpx.Client) -> None:
    data = txt2img(c, prompt="a fox", styles=["sharp"], seed=5, enable_hr=True, hr_scale=1.5,
                   hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5,
                   hr_prompt="a cat", hr_negative_prompt="dull")
    infotext = json.loads(data["info"])["infotexts"][0]
    assert infotext.startswith("a fox, sharp focus\nNegative prompt: blurry\n")
    assert 'Hires prompt: "a cat, sharp focus"' in infotext  # styled, as A1111 styles it
    assert 'Hires negative prompt: "dull, blurry"' in infotext


def test_an_unknown_style_is_a_422_naming_it(c: httpx.Client) -> None:
    error = a1111_error(c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "x",
                                                           "styles": ["sharp", "film-noir"]}), 422)
    assert "styles 'film-noir'" in error["detail"] and "cinematic" in error["detail"]


def test_prompt_styles_lists_the_file_and_a_reload_reads_it_again(c: httpx.Client, api, files) -> None:
    assert api.get_prompt_styles() == [
        {"name": "cinematic", "prompt": "cinematic still of {prompt}, film grain",
         "negative_prompt": "cartoon, {prompt}"},
        {"name": "sharp", "prompt": "sharp focus  ", "negative_prompt": "blurry"},
        {"name": "painted", "prompt": "{prompt}, oil painting <lora:style-peft:0.5>",
         "negative_prompt": ""},
    ]
    try:
        files["styles"].write_text("name,prompt\nnoir,\"{prompt}, black and white\"\n", encoding="utf-8")
        for route in ("refresh-checkpoints", "refresh-vae", "refresh-embeddings"):
            answer = c.post(f"/sdapi/v1/{route}")
            assert answer.status_code == 200 and answer.json() is None, (route, answer.text)
        assert api.get_prompt_styles() == [
            {"name": "noir", "prompt": "{prompt}, black and white", "negative_prompt": ""}]
        info = json.loads(txt2img(c, prompt="a cat", styles=["noir"], seed=1)["info"])
        assert info["prompt"] == "a cat, black and white"
    finally:
        files["styles"].write_text(STYLES_CSV, encoding="utf-8")
        assert c.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    with httpx.Client(base_url=c.base_url, headers=basic(PLAIN_KEY)) as plain:
        for route in ("refresh-vae", "refresh-embeddings", "unload-checkpoint", "reload-checkpoint"):
            assert a1111_error(plain.post(f"/sdapi/v1/{route}"), 403)["error"] == "NotAdmin"


# ---- the routes clients call while connecting ---------------------------------------------------
def test_the_lists_craftserve_has_none_of_are_empty(c: httpx.Client, api: webuiapi.WebUIApi) -> None:
    assert api.get_hypernetworks() == [] and api.get_face_restorers() == []
    assert api.get_realesrgan_models() == []
    for route in ("sd-modules", "extensions", "script-info"):
        answer = c.get(f"/sdapi/v1/{route}")
        assert answer.status_code == 200 and answer.json() == [], route
    with httpx.Client(base_url=c.base_url) as anonymous:
        a1111_error(anonymous.get("/sdapi/v1/hypernetworks"), 401)


def test_realesrgan_models_are_the_upscalers_named_so() -> None:
    from app.api.a1111.extra_routes import realesrgan_models
    from app.upscaler_files import UpscalerSpec

    upscalers = {name: UpscalerSpec(name, Path(f"/u/{name}.pth"), scale) for name, scale in (
        ("RealESRGAN_x4plus", 4), ("realesr-general-x4v3", 4), ("4x-UltraSharp", 4),
        ("RealESRGAN_x2plus", 2), ("real_esrnet_odd", None))}
    assert [m.model_dump() for m in realesrgan_models(upscalers)] == [
        {"name": "RealESRGAN_x2plus", "path": "/u/RealESRGAN_x2plus.pth", "scale": 2},
        {"name": "RealESRGAN_x4plus", "path": "/u/RealESRGAN_x4plus.pth", "scale": 4},
        {"name": "real_esrnet_odd", "path": "/u/real_esrnet_odd.pth", "scale": 4},
        {"name": "realesr-general-x4v3", "path": "/u/realesr-general-x4v3.pth", "scale": 4},
    ]


def test_memory_is_this_process_and_machine(api: webuiapi.WebUIApi) -> None:
    import psutil

    before = psutil.Process().memory_info().rss  # the live server runs in this process
    numbers = api.get_memory()
    after = psutil.Process().memory_info().rss
    ram = numbers["ram"]
    assert ram["total"] == psutil.virtual_memory().total
    assert min(before, after) * 0.8 <= ram["used"] <= max(before, after) * 1.2
    assert ram["free"] == ram["total"] - ram["used"]
    import torch

    if not torch.cuda.is_available():
        assert numbers["cuda"] == {"error": "unavailable"}  # A1111's answer without CUDA
    else:
        cuda = numbers["cuda"]
        free, total = torch.cuda.mem_get_info(0)
        assert cuda["system"]["total"] == total and set(cuda["devices"]) == {
            f"cuda:{i}" for i in range(torch.cuda.device_count())}
        assert {"active", "allocated", "reserved", "inactive", "events"} <= set(cuda)


def test_memory_without_psutil_reads_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api.a1111.memory import ram

    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails
    meminfo = Path("/proc/meminfo").read_text()
    total = next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:"))
    numbers = ram()
    assert numbers["total"] == total * 1024
    assert 0 < numbers["used"] < numbers["total"] and numbers["free"] == numbers["total"] - numbers["used"]


def test_cmd_flags_say_what_applies_and_no_key(server: LiveServer, api: webuiapi.WebUIApi, files) -> None:
    flags = api.get_cmd_flags()
    port = int(server.url.rsplit(":", 1)[1])
    assert flags["api"] is True and flags["nowebui"] is True and flags["listen"] is False
    assert flags["server_name"] == "127.0.0.1"
    assert flags["api_auth"] is None and flags["gradio_auth"] is None
    assert flags["port"] == server.app.state.settings.port and port > 0
    assert flags["styles_file"] == [str(files["styles"].resolve())]
    assert flags["lora_dir"] == str(files["loras"].resolve())
    assert API_KEY not in json.dumps(flags) and PLAIN_KEY not in json.dumps(flags)


def a1111_png(text: str, **extra: str) -> str:
    """A PNG as A1111 saves one: the infotext in a `parameters` tEXt chunk (before the pixels)."""
    meta = PngInfo()
    meta.add_text("parameters", text)
    for key, value in extra.items():
        meta.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode()


A1111_TEXT = ("masterpiece, (a red fox:1.2), sharp focus\n"
              "Negative prompt: lowres,\ncropped, blurry\n"
              'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, '
              'Size: 512x768, Model hash: 45dee52b12, Model: sd_xl_base_1.0, '
              'Lora hashes: "style: 0123456789ab, other: ba9876543210", Version: v1.10.1')


def test_png_info_reads_an_a1111_png(c: httpx.Client) -> None:
    answer = c.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64,"
                                                + a1111_png(A1111_TEXT, Software="A1111 test")})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["info"] == A1111_TEXT and data["items"] == {"Software": "A1111 test"}
    # by hand, following A1111's parse: the last line's pairs as strings, the size split, the
    # quoted value unquoted, the prompts split at "Negative prompt:"; the style "sharp" of
    # styles.csv ends both prompts, so it is taken off them and named
    expected = {
        "Prompt": "masterpiece, (a red fox:1.2)", "Negative prompt": "lowres,\ncropped",
        "Styles array": ["sharp"],
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
        "Seed": "965400086", "Size-1": "512", "Size-2": "768", "Model hash": "45dee52b12",
        "Model": "sd_xl_base_1.0", "Lora hashes": "style: 0123456789ab, other: ba9876543210",
        "Version": "v1.10.1",
        # A1111's defaults for what the text does not say (its values and types)
        "Clip skip": "1", "RNG": "GPU", "Hires resize-1": 0, "Hires resize-2": 0,
        "Hires sampler": "Use same sampler", "Hires schedule type": "Use same scheduler",
        "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
        "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
        "Masked area padding": 32, "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0,
        "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
        "Emphasis": "Original",  # (a red fox:1.2) is weighted
        "Refiner switch by sampling steps": False,
    }
    assert data["parameters"] == expected


def test_png_info_reads_our_png_and_what_webuiapi_sends(c: httpx.Client, api: webuiapi.WebUIApi) -> None:
    data = txt2img(c, prompt="a fox", negative_prompt="ugly", styles=["cinematic"], seed=11,
                   override_settings={"CLIP_stop_at_last_layers": 2})
    ours = data["images"][0]
    chunk = Image.open(io.BytesIO(base64.b64decode(ours))).info["parameters"]
    answer = c.post("/sdapi/v1/png-info", json={"image": ours})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["info"] == chunk and result["items"] == {}
    parameters = result["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"]) == ("a fox", "ugly")
    assert parameters["Styles array"] == ["cinematic"]
    assert (parameters["Steps"], parameters["Seed"], parameters["Size-1"], parameters["Size-2"]) == (
        "4", "11", "64", "64")
    assert parameters["Sampler"] == "Euler" and parameters["Model"] == "tiny-sdxl"
    assert parameters["Clip skip"] == "2" and "Emphasis" not in parameters
    # webuiapi sends a PIL image re-encoded with its text chunk; it reads `info` and `parameters`
    through = api.png_info(Image.open(io.BytesIO(base64.b64decode(ours))))
    assert through.info == chunk and through.parameters == parameters
    # an image without the text: info is "", the prompts are empty, A1111's defaults remain
    empty = c.post("/sdapi/v1/png-info", json={"image": a1111_png("")}).json()
    assert empty["info"] == "" and empty["parameters"]["Prompt"] == ""
    assert empty["parameters"]["Clip skip"] == "1" and "Steps" not in empty["parameters"]


def test_png_info_reads_a_jpeg_user_comment(c: httpx.Client) -> None:
    text = "a fox\nSteps: 5, Sampler: Euler a, CFG scale: 6.5, Seed: 1, Size: 64x64"
    exif = Image.Exif()
    # as piexif writes it for A1111: the UNICODE prefix, then UTF-16 big-endian
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", exif=exif.tobytes())
    answer = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["info"] == text and data["parameters"]["CFG scale"] == "6.5"
    assert data["parameters"]["Sampler"] == "Euler a" and data["parameters"]["Prompt"] == "a fox"


@pytest.mark.parametrize("image", ["", "not base64 !!", base64.b64encode(b"plain text").decode(),
                                   "https://example.com/a.png"])
def test_png_info_refuses_what_is_not_an_image(c: httpx.Client, image: str) -> None:
    error = a1111_error(c.post("/sdapi/v1/png-info", json={"image": image}), 422)
    assert "image" in error["detail"]


def test_interrogate_says_no_captioning_model_is_served(c: httpx.Client, api) -> None:
    error = a1111_error(c.post("/sdapi/v1/interrogate", json={"image": a1111_png("x"), "model": "clip"}),
                        422)
    assert "model 'clip'" in error["detail"] and "no captioning model" in error["detail"]
    with pytest.raises(RuntimeError) as caught:  # webuiapi raises on any status but 200
        api.interrogate(Image.new("RGB", (8, 8)), model="deepdanbooru")
    assert caught.value.args[0] == 422 and "deepdanbooru" in caught.value.args[1]


def test_unload_and_reload_checkpoint_release_and_load_device_memory(server: LiveServer,
                                                                     c: httpx.Client) -> None:
    engine = server.app.state.engine
    worker = engine.workers[0]
    txt2img(c, prompt="warm", seed=1)  # tiny-sdxl (the caller's checkpoint) is loaded
    assert "tiny-sdxl" in worker.models
    pipeline = weakref.ref(worker.models["tiny-sdxl"].pipe)
    answer = c.post("/sdapi/v1/unload-checkpoint")
    assert answer.status_code == 200 and answer.json() == {}
    assert "tiny-sdxl" not in worker.models  # unloaded when the call returns
    gc.collect()
    assert pipeline() is None  # nothing holds its weights any more
    ready = c.get("/ready", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ready.status_code == 200, ready.text  # a model unloaded on request is not waited for
    assert ready.json()["models"]["tiny-sdxl"] == "loads on first request"
    answer = c.post("/sdapi/v1/reload-checkpoint")
    assert answer.status_code == 200 and answer.json() == {}
    assert "tiny-sdxl" in worker.models and worker.models["tiny-sdxl"].pipe is not None
    assert c.get("/ready").json()["models"]["tiny-sdxl"] == "loaded"
    assert txt2img(c, prompt="after", seed=2)["images"]


def test_unload_under_ray_is_a_clear_501(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray Serve is the `craftserve[ray]` extra")
    import asyncio

    from app.cluster.remote import RemoteEngine
    from app.config import Settings
    from app.main import create_app

    settings = Settings(models=write_models_file(tmp_path, "models:\n  tiny: {source: builtin:tiny-sdxl}\n"),
                        api_keys=[f"{API_KEY}  admin"], cache_dir=tmp_path / "cache")
    app = create_app(settings, engine_factory=lambda s, r, m: RemoteEngine(s, r, m, generator=None,
                                                                           board=None))

    async def ask(route: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(f"/sdapi/v1/{route}", headers=basic(API_KEY))

    for route in ("unload-checkpoint", "reload-checkpoint"):
        error = a1111_error(asyncio.run(ask(route)), 501)
        assert error["error"] == "NotSupported" and "Ray Serve" in error["detail"]


def test_gradio_checks_a_client_makes(server: LiveServer, c: httpx.Client) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        ping = anonymous.get("/internal/ping")
        assert ping.status_code == 200 and ping.json() == {}
        for route in ("/queue/status", "/login_check"):
            refused = anonymous.get(route)
            assert refused.status_code == 401, (route, refused.text)
            assert refused.headers["www-authenticate"] == "Basic"
    status = c.get("/queue/status")
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["msg"] == "estimation" and body["queue_size"] == 0 and isinstance(body["queue_eta"], float)
    assert set(body) == {"msg", "rank", "queue_size", "avg_event_process_time",
                         "avg_event_concurrent_process_time", "rank_eta", "queue_eta"}
    login = c.get("/login_check")
    assert login.status_code == 200 and login.json() is None


def test_a_second_start_does_not_read_the_weights_again(make_server, files, tmp_path: Path) -> None:
    folder = tmp_path / "folder-sd15"
    shutil.copytree(files["folder"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    text = f"models:\n  tiny-sdxl: {{source: builtin:tiny-sdxl}}\n  folder: {{source: {folder}}}\n"
    cache = tmp_path / "cache"
    first = make_server(text, cache_dir=cache, wait_ready=False)
    with first.client(headers=basic(API_KEY)) as client:
        listed = {m["model_name"]: m["sha256"] for m in client.get("/sdapi/v1/sd-models").json()}
    original = sha256sum(weights)
    assert listed["folder"] == original
    kept = json.loads((cache / "hashes.json").read_text())["files"]
    assert kept[str(weights.resolve())]["sha256"] == original
    # Other bytes, same size and time: a server that read the file again would see them.
    stat = weights.stat()
    weights.write_bytes(os.urandom(stat.st_size))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = make_server(text, cache_dir=cache, wait_ready=False)
    with second.client(headers=basic(API_KEY)) as client:
        listed = {m["model_name"]: m["sha256"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert listed["folder"] == original != sha256sum(weights)
    assert second.app.state.a1111.hashes.cache.reads == 0


def test_two_processes_sharing_the_cache_keep_each_others_hashes(tmp_path: Path) -> None:
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    one.write_bytes(b"first weights")
    two.write_bytes(b"second weights")
    first, second = HashCache(tmp_path / "cache"), HashCache(tmp_path / "cache")  # both started
    first.sha256(one)
    second.sha256(two)  # written after `first`, without its entry in memory
    third = HashCache(tmp_path / "cache")
    assert (third.sha256(one), third.sha256(two)) == (file_sha256(one), file_sha256(two))
    assert third.reads == 0
