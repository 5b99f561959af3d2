"""POST /sd through the real HTTP stack and the real (tiny) SDXL pipeline."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import API_KEY, body, png

# How the published VisionCraft wrapper (VisionCraftAPI 1.0.8) names the parameter of a 422.
WRAPPER_PARAM = re.compile(r"(?<=doesn't have\s)\w+")


def detail(answer: httpx.Response) -> str:
    data = answer.json()
    assert set(data) >= {"detail", "error"}
    assert data["error"] == {"message": data["detail"]}  # the wrapper reads error.message
    assert "Traceback" not in answer.text
    if answer.status_code == 422:
        assert WRAPPER_PARAM.findall(data["detail"]), data["detail"]  # else the wrapper crashes
    return data["detail"]


@pytest.mark.fullsize  # 1024², 30 steps
def test_seed_page_example_body_uses_the_contract_defaults(client: httpx.Client) -> None:
    # The API page's Python example sends only model, prompt and token.
    answer = client.post("/sd", json={"model": "tiny-sdxl", "prompt": "Beautiful landscape",
                                      "token": API_KEY})
    image = png(answer)
    assert image.size == (1024, 1024)
    text = image.text["parameters"]
    assert "Steps: 30" in text and "CFG scale: 7" in text and "Size: 1024x1024" in text
    assert "Sampler: DPM++ 2M" in text and "Schedule type: Karras" in text
    assert answer.headers["x-sampler"] == "DPM++ 2M Karras"
    assert answer.headers["x-model"] == "tiny-sdxl"


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 1), ("steps", 30), ("width", 64), ("height", 64), ("cfg_scale", 1),
     ("cfg_scale", 30), ("cfg_scale", 7.5), ("loras", {}), ("seed", 0), ("seed", 2**32 - 1)],
)
def test_range_edges_are_accepted(client: httpx.Client, field: str, value: object) -> None:
    image = png(client.post("/sd", json=body(**{field: value})))
    assert image.size == (64, 64)


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("steps", 0, "greater than or equal to 1"),
        ("steps", 31, "less than or equal to 30"),
        ("steps", 2.5, "integer"),
        ("steps", "many", "integer"),
        ("steps", True, "not a boolean"),
        ("width", 63, "greater than or equal to 64"),
        ("width", 1025, "less than or equal to 1024"),
        ("height", 63, "greater than or equal to 64"),
        ("height", 1025, "less than or equal to 1024"),
        ("cfg_scale", 0.99, "greater than or equal to 1"),
        ("cfg_scale", 31, "less than or equal to 30"),
        ("cfg_scale", None, "number"),
        ("seed", -2, "greater than or equal to -1"),
        ("seed", 2**32, "less than or equal to"),
        ("loras", [], "object"),
        ("loras", {"a": "strong"}, "must be a number"),
        ("prompt", 5, "string"),
        ("model", ..., "model is a required field"),
        ("prompt", ..., "prompt is a required field"),
    ],
)
def test_bad_fields_are_422_naming_field_value_and_rule(
    client: httpx.Client, field: str, value: object, rule: str
) -> None:
    answer = client.post("/sd", json=body(**{field: value}))
    assert answer.status_code == 422, answer.text
    message = detail(answer)
    assert f"doesn't have {field}" in message, message
    assert WRAPPER_PARAM.findall(message)[0] == field
    assert rule in message
    if value is not ...:
        assert repr(value)[:10] in message or str(value) in message


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422(client: httpx.Client, raw: str) -> None:
    for text in (
        json.dumps(body()).replace('"steps": 4', f'"cfg_scale": {raw}, "steps": 4'),
        json.dumps(body()).replace('"steps": 4', f'"loras": {{"x": {raw}}}, "steps": 4'),
    ):
        answer = client.post("/sd", content=text, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert "finite" in detail(answer)


def test_malformed_json_is_422(client: httpx.Client) -> None:
    answer = client.post("/sd", content=b'{"model": "tiny-sdxl", "prompt": ',
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert "malformed JSON" in detail(answer)


def test_over_long_prompt_is_422(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(prompt="x" * 2001))
    assert answer.status_code == 422
    assert "prompt" in detail(answer) and "2000" in detail(answer)
    answer = client.post("/sd", json=body(negative_prompt="y" * 5000))
    assert answer.status_code == 422 and "doesn't have negative_prompt" in detail(answer)


def test_too_many_loras_is_422(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(loras={f"l{i}": 1 for i in range(6)}))
    assert answer.status_code == 422
    assert "doesn't have loras" in detail(answer) and "at most 5" in detail(answer)


@pytest.mark.parametrize(
    ("fields", "name"),
    [({"model": "sdxl-turbo"}, "model"), ({"sampler": "Euler b"}, "sampler"),
     ({"loras": {"nope": 0.5}}, "lora")],
)
def test_unknown_names_say_doesnt_have(client: httpx.Client, fields: dict, name: str) -> None:
    answer = client.post("/sd", json=body(**fields))
    assert answer.status_code == 422
    message = detail(answer)
    assert f"doesn't have {name} '" in message
    assert "Available:" in message


def test_unknown_model_lists_the_served_ones(client: httpx.Client) -> None:
    message = detail(client.post("/sd", json=body(model="tiny-sdx")))
    assert "This server doesn't have model 'tiny-sdx'" in message
    assert "tiny-sdxl" in message


@pytest.mark.parametrize(("width", "height"), [(100, 70), (65, 64), (64, 127), (200, 136)])
def test_any_size_answers_exactly_that_size(client: httpx.Client, width: int, height: int) -> None:
    image = png(client.post("/sd", json=body(width=width, height=height)))
    assert image.size == (width, height)


def test_unknown_fields_of_other_api_versions_are_ignored(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(image_count=2, upscale=True, nsfw_filter=False,
                                          scheduler="karras", sampler="DPM++ 2M"))
    assert png(answer).size == (64, 64)


def test_same_seed_same_bytes_other_seed_other_bytes(client: httpx.Client) -> None:
    first = client.post("/sd", json=body(seed=42))
    again = client.post("/sd", json=body(seed=42))
    other = client.post("/sd", json=body(seed=43))
    assert png(first) and first.content == again.content
    assert png(other) and other.content != first.content
    assert first.headers["x-seed"] == "42"


def test_random_seed_is_reported_and_reproducible(client: httpx.Client) -> None:
    first = client.post("/sd", json=body(seed=-1))
    second = client.post("/sd", json=body(seed=...))
    seeds = {int(first.headers["x-seed"]), int(second.headers["x-seed"])}
    assert len(seeds) == 2  # two random draws (1 in 2**32 to collide)
    replay = client.post("/sd", json=body(seed=int(first.headers["x-seed"])))
    assert replay.content == first.content


def test_headers_and_png_parameters_describe_the_generation(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(prompt="red fox", negative_prompt="blurry",
                                          sampler="Euler a", cfg_scale=5.5, seed=7))
    image = png(answer)
    for header in ("x-seed", "x-model", "x-sampler", "x-queue-wait-ms", "x-generation-ms",
                   "x-job-id"):
        assert header in answer.headers
    assert float(answer.headers["x-generation-ms"]) > 0
    assert answer.headers["x-sampler"] == "Euler a"
    text = image.text["parameters"]
    assert text.splitlines()[0] == "red fox"
    assert "Negative prompt: blurry" in text
    assert "Steps: 4, Sampler: Euler a" in text
    assert "CFG scale: 5.5, Seed: 7, Size: 64x64, Model: tiny-sdxl" in text


def test_image_is_not_blank(client: httpx.Client) -> None:
    image = png(client.post("/sd", json=body()))
    extrema = image.convert("L").getextrema()
    assert extrema[0] != extrema[1]


def test_concurrent_requests_are_all_answered(client: httpx.Client) -> None:
    def one(seed: int) -> httpx.Response:
        return client.post("/sd", json=body(seed=seed))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(100, 112)))
    for seed, answer in zip(range(100, 112), answers, strict=True):
        assert png(answer).size == (64, 64)
        assert answer.headers["x-seed"] == str(seed)
    assert len({a.content for a in answers}) == 12


SAMPLERS = ["Euler", "Euler a", "DDIM", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ 2M SDE",
            "LMS Karras", "UniPC"]


def test_concurrent_jobs_do_not_disturb_each_other(make_server) -> None:
    # Eight samplers at once: every answer equals its job run alone (each job builds its own
    # scheduler; ancestral and SDE samplers are seeded per job).
    server = make_server()
    jobs = [body(seed=s, prompt=f"prompt {s}", sampler=n) for s, n in enumerate(SAMPLERS)]
    with server.client() as c, ThreadPoolExecutor(8) as pool:
        together = [a.content for a in pool.map(lambda b: c.post("/sd", json=b), jobs)]
        alone = [c.post("/sd", json=b).content for b in jobs]
    assert together == alone
    assert len(set(alone)) == len(SAMPLERS)


def test_sampler_named_both_ways_gives_the_same_image(client: httpx.Client) -> None:
    a1111 = client.post("/sd", json=body(sampler="DPM++ 2M Karras"))
    comfy = client.post("/sd", json=body(sampler="dpmpp_2m", scheduler="karras"))
    assert png(a1111) and pixels(a1111) == pixels(comfy)
    euler = client.post("/sd", json=body(sampler="Euler"))
    assert pixels(euler) == pixels(client.post("/sd", json=body(sampler="euler",
                                                                 scheduler="normal")))


def test_contradicting_suffix_and_scheduler_is_422(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(sampler="DPM++ 2M Karras", scheduler="exponential"))
    assert answer.status_code == 422
    message = detail(answer)
    assert "Karras" in message and "exponential" in message


def test_unknown_sampler_suggests_close_names(client: httpx.Client) -> None:
    message = detail(client.post("/sd", json=body(sampler="DPM++ 2M Karas")))
    assert "doesn't have sampler 'DPM++ 2M Karas'" in message
    assert "DPM++ 2M Karras" in message


def pixels(answer: httpx.Response) -> bytes:
    return Image.open(io.BytesIO(answer.content)).tobytes()


def test_september_route_allows_35_steps(client: httpx.Client) -> None:
    answer = client.post("/image/generate", json=body(steps=35))
    assert png(answer).size == (64, 64)
    assert "Steps: 35" in Image.open(io.BytesIO(answer.content)).text["parameters"]
    assert client.post("/image/generate", json=body(steps=36)).status_code == 422
    assert client.post("/sd", json=body(steps=35)).status_code == 422


def test_generate_xl_answers_urls_like_generate(client: httpx.Client) -> None:
    # The spring 2024 SDXL route: sampler + scheduler, image_count 1-5, {"images": [url, ...]}
    # (the service's last README and the published wrapper both read it so).
    answer = client.post("/generate-xl", json=body(sampler="dpmpp_2m", scheduler="karras",
                                                   image_count=2, seed=77))
    assert answer.status_code == 200, answer.text
    urls = answer.json()["images"]
    assert len(urls) == 2
    images = [png(httpx.get(url, timeout=30)) for url in urls]
    assert [i.size for i in images] == [(64, 64)] * 2
    assert "Seed: 77," in images[0].text["parameters"]
    assert "Seed: 78," in images[1].text["parameters"]
    assert "Sampler: DPM++ 2M" in images[0].text["parameters"]
    alone = client.post("/sd", json=body(sampler="DPM++ 2M Karras", seed=77))
    assert pixels(alone) == images[0].tobytes()
    assert client.post("/generate-xl", json=body(image_count=6)).status_code == 422
    assert client.post("/generate-xl", json=body(image_count=0)).status_code == 422


def test_openapi_documents_the_error_bodies(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    error_ref = "#/components/schemas/ErrorBody"
    for path in ("/sd", "/generate", "/generate-xl", "/image/generate"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("403", "422", "429", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": error_ref}, (path, status)
    assert spec["paths"]["/images/{key}.png"]["get"]["responses"]["404"]["content"][
        "application/json"]["schema"] == {"$ref": error_ref}
    body_schema = spec["components"]["schemas"]["ErrorBody"]
    assert set(body_schema["required"]) == {"detail", "error"}
    assert spec["paths"]["/generate-xl"]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"] == {"$ref": "#/components/schemas/ImageUrls"}


def test_spring_2024_generate_answers_image_urls(client: httpx.Client) -> None:
    answer = client.post("/generate", json=body(image_count=3, seed=500, upscale=False))
    assert answer.status_code == 200, answer.text
    urls = answer.json()["images"]
    assert len(urls) == 3 and len(set(urls)) == 3
    fetched = [httpx.get(url, timeout=30) for url in urls]
    seeds = [png(f).text["parameters"].split("Seed: ")[1].split(",")[0] for f in fetched]
    assert seeds == ["500", "501", "502"]
    alone = client.post("/sd", json=body(seed=501))
    assert pixels(alone) == Image.open(io.BytesIO(fetched[1].content)).tobytes()
    assert client.post("/generate", json=body(image_count=6)).status_code == 422
    assert client.get("/images/not-a-key.png").status_code == 404
