"""craftserve on Ray Serve (issue 13), on a real local Ray: `ray.init(num_cpus=2)`, the app
deployed by the same function `craftserve serve --ray` uses, two CPU replicas of the
generation deployment, every request through Serve's HTTP proxy.

Checked: the seed page's aiohttp client, the VisionCraft wrapper, a LoRA, the A1111 and
OpenAI dialects, the job API's event stream (progress comes from the replica), 16 concurrent
requests spread over both replicas, the ingress's routing (issue 22: 32 requests after a
warm-up split at most 60/40, a hot model loaded on a second replica, two busy models each
keeping its replica), model affinity (two models, at most one a replica),
the queue bound under a flood of many keys (503 + Retry-After in each dialect's shape,
nothing hangs), one key's share of the queue at the ingress (429 past it, others served),
a model that fails to load on its replica (/ready says which; the rest serve), a reload that
every replica follows, and a replica killed mid-load (its jobs 503, the rest 200, a
replacement comes up). The bad inputs of `craftserve serve --ray` run without a cluster.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app import cli
from tests.conftest import API_KEY, body, png, write_models_file
from tests.live import free_port
from tests.lora_files import write_peft_lora

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray", reason="Ray Serve is the `craftserve[ray]` extra")
pytest.importorskip("ray.serve")

MODELS = """
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
  tiny-sd15: {{source: "builtin:tiny-sd15"}}
  broken: {{source: "{broken}"}}
lora_dirs: [{loras}]
"""
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_QUEUE, MAX_BATCH, MAX_QUEUED = 8, 2, 16  # a replica takes 8 calls; 16 more wait at the ingress
# One key may have MAX_QUEUE // 4 = 2 jobs waiting in the whole cluster (the ingress counts
# them): the tests that load the cluster send each call with a key of its own.
KEYS = [f"ray-key-{i:02d}" for i in range(60)]
STAY_S = 4.0


class Cluster:
    def __init__(self, url: str, models: Path) -> None:
        self.url = url
        self.models = models

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def ready(self) -> dict:
        return httpx.get(self.url + "/ready", headers=AUTH, timeout=10).json()

    def wait(self, predicate, what: str, timeout: float = 90) -> dict:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while True:
            state = self.ready()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout:g} s: {state}")
            time.sleep(0.25)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from app.cluster.deploy import deploy, undeploy
    from app.config import Settings
    from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl

    folder = tmp_path_factory.mktemp("ray")
    loras = folder / "loras"
    loras.mkdir()
    write_peft_lora(build_tiny_sdxl(), loras / "style.safetensors", seed=5)
    broken = folder / "broken-sd15"
    build_tiny_sd15().save_pretrained(broken)
    for weights in broken.glob("unet/*.safetensors"):
        weights.write_bytes(b"\0" * 64)  # the folder is well formed; its UNet weights are not
    models = write_models_file(folder, MODELS.format(broken=broken, loras=loras))
    settings = Settings(
        models=models, api_keys=[f"{API_KEY}  admin", *KEYS], auth_failures_per_minute=0, host="127.0.0.1",
        port=free_port(), max_models_per_device=1, max_queue=MAX_QUEUE, max_batch=MAX_BATCH,
        load_retry_s=600, ray_min_replicas=2, ray_max_replicas=2, ray_gpus_per_replica=0,
        ray_cpus_per_replica=1, ray_max_queued=MAX_QUEUED,
        # a model whose backlog takes its replicas over 0.3 s is hot; a model idle for 4 s on a
        # replica may make way there for a hot one (defaults 2 s and 60 s: short tests)
        ray_replicate_after_s=0.3, ray_model_stay_s=STAY_S,
    )
    ray.init(num_cpus=2, include_dashboard=False, namespace="craftserve",
             object_store_memory=256 * 2**20, logging_level=logging.WARNING)
    try:
        found = Cluster(deploy(settings), models)
        found.wait(lambda s: s["ready"] and len(s["workers"]) == 2, "ready with two replicas")
        yield found
    finally:
        undeploy()
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def seed_page_client(api_url: str, data: dict) -> bytes:
    """The seed page's Python example, as published (aiohttp), apart from the URL."""
    import aiohttp

    async def generate_image(api_url, data) -> bytes:  # noqa: ANN001
        async with aiohttp.ClientSession() as session, \
                session.post(f"{api_url}/sd", json=data) as response:
            return await response.read()

    return asyncio.run(generate_image(api_url, data))


def test_seed_page_client_gets_a_png_of_the_contract_defaults(cluster: Cluster) -> None:
    data = seed_page_client(cluster.url, {"model": "tiny-sdxl", "prompt": "Beautiful landscape",
                                          "token": API_KEY})
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (1024, 1024)
    assert "Steps: 30" in image.text["parameters"]


def test_visioncraft_wrapper_gets_its_urls(cluster: Cluster) -> None:
    from VisionCraftAPI.api import VisionCraftClient

    wrapper = VisionCraftClient(api_key=API_KEY)
    wrapper.API_HOST = cluster.url
    urls = asyncio.run(wrapper.generate_xl_image("a lighthouse", model="tiny-sdxl", sampler="euler",
                                                 image_count=2, width=64, height=64, steps=4,
                                                 cfg_scale=7))
    assert len(urls) == 2
    for url in urls:
        assert Image.open(io.BytesIO(httpx.get(url).content)).size == (64, 64)


def test_same_seed_same_bytes_on_either_replica_and_headers_name_it(cluster: Cluster) -> None:
    by_worker: dict[str, set[bytes]] = {}
    with cluster.client() as c:
        for _ in range(12):
            answer = c.post("/sd", json=body(seed=77))
            png(answer)
            assert answer.headers["x-seed"] == "77"
            by_worker.setdefault(answer.headers["x-worker"], set()).add(answer.content)
    assert all(name.startswith("Generator#") for name in by_worker)
    assert len({data for datas in by_worker.values() for data in datas}) == 1, by_worker.keys()


def test_lora_request_changes_the_image_and_is_reproducible(cluster: Cluster) -> None:
    with cluster.client() as c:
        plain = c.post("/sd", json=body(seed=5))
        styled = [c.post("/sd", json=body(seed=5, loras={"style": 1.0})) for _ in range(2)]
        misfit = c.post("/sd", json=body(model="tiny-sd15", loras={"style": 1.0}))
    png(plain)
    assert styled[0].content == styled[1].content != plain.content
    assert misfit.status_code == 422 and "does not fit model 'tiny-sd15'" in misfit.json()["error"]["message"]


def test_a1111_and_openai_clients_work_through_the_proxy(cluster: Cluster) -> None:
    import openai
    import webuiapi

    host, port = cluster.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    api.set_auth("whoever", API_KEY)
    result = api.txt2img(prompt="a red fox", seed=1234, width=64, height=72, steps=4, batch_size=2)
    assert [i.size for i in result.images] == [(64, 72), (64, 72)]
    assert result.info["all_seeds"] == [1234, 1235]

    sdk = openai.OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0)
    answer = sdk.images.generate(model="tiny-sdxl", prompt="a lighthouse", size="64x64",
                                 response_format="b64_json", extra_body={"steps": 4})
    assert len(answer.data) == 1 and answer.data[0].b64_json
    with pytest.raises(openai.NotFoundError) as err:  # OpenAI's answer for an unknown model
        sdk.images.generate(model="nope", prompt="x", size="64x64")
    assert "The model 'nope' does not exist" in str(err.value)


def test_pictures_in_through_the_proxy(cluster: Cluster) -> None:
    """img2img with a mask, the hires fix and an upscaling job (no model: it takes no place in a
    replica's model LRU) run on the replicas and give what one box gives."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))

    def b64(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    with cluster.client(headers=AUTH) as c:
        inpaint = c.post("/sdapi/v1/img2img", json={
            "prompt": "a door", "steps": 6, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.8,
            "init_images": [b64(picture)], "mask": b64(mask), "inpaint_full_res": False})
        assert inpaint.status_code == 200, inpaint.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(inpaint.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(got[:10], np.asarray(picture)[:10])  # far from the mask: the original
        hires = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4, "width": 64, "height": 64,
                                                  "enable_hr": True, "hr_scale": 1.5})
        assert hires.status_code == 200, hires.text
        extras = c.post("/sdapi/v1/extra-single-image", json={"image": b64(picture), "upscaler_1": "Lanczos"})
        assert extras.status_code == 200, extras.text
        upscaled = Image.open(io.BytesIO(base64.b64decode(extras.json()["image"])))
        assert np.array_equal(np.asarray(upscaled), np.asarray(picture.resize((128, 128), Image.LANCZOS)))


def test_job_api_streams_progress_from_the_replica(cluster: Cluster) -> None:
    with cluster.client(headers=AUTH) as c:
        created = c.post("/jobs", json={**body(steps=30, width=128, height=128), "previews": True})
        assert created.status_code == 202, created.text
        events = []
        with c.stream("GET", created.json()["events_url"]) as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                    if events[-1] in ("done", "failed", "cancelled"):
                        break
        assert events[0] == "queued" and "started" in events and events[-1] == "done", events
        assert "progress" in events
        png(c.get(created.json()["image_url"]))


def test_sixteen_concurrent_requests_use_both_replicas(cluster: Cluster) -> None:
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/sd", json=body(seed=i, steps=8, token=KEYS[i]))
                                          for i in range(16)))

    answers = asyncio.run(flood())
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    workers = Counter(a.headers["x-worker"] for a in answers)
    assert len(workers) == 2, workers
    metrics = httpx.get(cluster.url + "/metrics").text  # the ingress counts what it answered
    count = sum(float(line.split()[-1]) for line in metrics.splitlines()  # every sampler's line
                if line.startswith('craftserve_images_total{model="tiny-sdxl"'))
    assert count >= 16


def burst(cluster: Cluster, count: int, **fields) -> list[httpx.Response]:
    """`count` concurrent /sd requests, each with a key of its own."""
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/sd", json=body(seed=i, token=KEYS[i], **fields))
                                          for i in range(count)))

    answers = asyncio.run(flood())
    assert [a.status_code for a in answers] == [200] * count, [a.text for a in answers
                                                               if a.status_code != 200]
    return answers


def test_preloaded_model_on_both_and_thirty_two_requests_split_at_most_60_40(cluster: Cluster) -> None:
    """Issue 22's check: after a warm-up request, 32 concurrent requests for one model run
    on both replicas, the busier taking at most 60 %. A replica holds 2 x MAX_BATCH = 4 calls;
    the rest wait at the ingress and go to whichever replica frees a place first."""
    state = cluster.wait(lambda s: all(w["models"] == ["tiny-sdxl"] for w in s["workers"]),
                         "the preload model on every replica")
    assert len(state["workers"]) == 2
    with cluster.client() as c:
        png(c.post("/sd", json=body(steps=8)))  # warm-up
    answers = burst(cluster, 32, steps=8)
    workers = Counter(a.headers["x-worker"] for a in answers)
    assert len(workers) == 2 and max(workers.values()) <= 0.6 * 32, workers


def test_a_hot_model_is_loaded_on_a_second_replica(cluster: Cluster) -> None:
    """tiny-sd15 takes one replica (tiny-sdxl is held by the other too, so it makes way);
    once it has been idle there for RAY_MODEL_STAY_S, a burst of tiny-sdxl, the only model
    on one replica, is hot (its backlog would take that replica longer than 0.3 s) and is
    loaded on the second replica as well: both serve it."""
    with cluster.client() as c:
        png(c.post("/sd", json=body(model="tiny-sd15", steps=4)))
    state = cluster.wait(lambda s: sorted(m for w in s["workers"] for m in w["models"])
                         == ["tiny-sd15", "tiny-sdxl"], "one model a replica")
    sd15_holder = next(w["name"] for w in state["workers"] if w["models"] == ["tiny-sd15"])
    time.sleep(STAY_S + 1)
    answers = burst(cluster, 32, steps=16)
    workers = Counter(a.headers["x-worker"] for a in answers)
    assert len(workers) == 2 and workers[sd15_holder] >= 1, workers
    cluster.wait(lambda s: all(w["models"] == ["tiny-sdxl"] for w in s["workers"]),
                 "tiny-sdxl on both replicas", timeout=10)


def test_two_busy_models_on_two_replicas_each_keep_their_own(cluster: Cluster) -> None:
    """MAX_MODELS_PER_DEVICE=1, both models under load from their own clients at once: each
    replica keeps its model for the whole run (no model loaded twice on a replica) and every
    answer for a model comes from the replica that holds it."""
    with cluster.client() as c:
        png(c.post("/sd", json=body(model="tiny-sd15", steps=4)))  # one replica makes way
    before = cluster.wait(lambda s: sorted(m for w in s["workers"] for m in w["models"])
                          == ["tiny-sd15", "tiny-sdxl"], "one model a replica")
    holder = {w["models"][0]: w["name"] for w in before["workers"]}
    seen: dict[str, Counter] = {"tiny-sdxl": Counter(), "tiny-sd15": Counter()}
    changes: list[dict] = []
    stop = asyncio.Event()

    async def client(index: int, model: str) -> None:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            for seed in range(6):
                answer = await c.post("/sd", json=body(model=model, seed=seed, steps=12,
                                                       token=KEYS[index]))
                assert answer.status_code == 200, answer.text
                seen[model][answer.headers["x-worker"]] += 1

    async def watch() -> None:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=10, headers=AUTH) as c:
            while not stop.is_set():
                state = (await c.get("/ready")).json()
                models = {w["name"]: w["models"] for w in state["workers"]}
                if models != {name: [m] for m, name in holder.items()}:
                    changes.append(models)
                await asyncio.sleep(0.1)

    async def run() -> None:
        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*(client(i, "tiny-sdxl" if i % 2 else "tiny-sd15") for i in range(12)))
        stop.set()
        await watcher

    asyncio.run(run())
    assert changes == []
    assert {m: set(c) for m, c in seen.items()} == {m: {holder[m]} for m in seen}, seen


def test_each_model_goes_to_the_replica_holding_it(cluster: Cluster) -> None:
    """MAX_MODELS_PER_DEVICE=1: once each model is loaded on one replica, requests for it
    land there (Serve's model multiplexing), and /ready shows one model a replica."""
    with cluster.client() as c:
        c.post("/sd", json=body(model="tiny-sd15", seed=1))  # one replica swaps to tiny-sd15
        cluster.wait(lambda s: sorted(m for w in s["workers"] for m in w["models"])
                     == ["tiny-sd15", "tiny-sdxl"], "one model a replica")
        seen: dict[str, set[str]] = {"tiny-sdxl": set(), "tiny-sd15": set()}
        for i in range(10):
            for model in seen:
                answer = c.post("/sd", json=body(model=model, seed=i))
                png(answer)
                seen[model].add(answer.headers["x-worker"])
    assert all(len(workers) == 1 for workers in seen.values()), seen
    assert seen["tiny-sdxl"] != seen["tiny-sd15"]
    holders = {w["name"]: w["models"] for w in cluster.ready()["workers"]}
    assert holders == {next(iter(seen[m])): [m] for m in seen}


def test_flood_past_the_queue_bound_is_answered_503_in_each_dialect(cluster: Cluster) -> None:
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60, headers=AUTH) as c:
            # slow jobs (30-40 steps), so few finish while the 60 calls arrive
            calls = [c.post("/sd", json=body(seed=i, steps=30, token=KEYS[i])) for i in range(40)]
            calls += [c.post("/sdapi/v1/txt2img", headers={"Authorization": f"Bearer {KEYS[40 + i]}"},
                             json={"prompt": "x", "width": 64, "height": 64, "steps": 40, "seed": i})
                      for i in range(20)]
            return await asyncio.gather(*calls)

    started = time.monotonic()
    answers = asyncio.run(flood())
    assert time.monotonic() - started < 60  # nothing waits without bound
    codes = Counter(a.status_code for a in answers)
    assert set(codes) == {200, 503}, codes
    # 60 calls against room for 2 * MAX_QUEUE + MAX_QUEUED = 32 (some finish while the rest
    # arrive, so the exact count varies)
    assert codes[503] >= 10, codes
    for answer in answers:
        if answer.status_code != 503:
            continue
        assert int(answer.headers["retry-after"]) >= 1
        data = answer.json()
        if answer.request.url.path == "/sd":
            assert "retry" in data["error"]["message"]
        else:
            assert set(data) == {"error", "detail", "body", "errors"} and "retry" in data["detail"]
    with cluster.client() as c:
        png(c.post("/sd", json=body()))  # and it serves on


def test_one_key_past_its_share_gets_429_at_the_ingress_and_others_are_served(cluster: Cluster) -> None:
    """The ingress counts a key's jobs no replica has started (EngineAPI.waiting): one key's
    flood is refused 429 past its share of 2, while another key still gets its image."""
    async def flood() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            mine = [c.post("/sd", json=body(seed=i, steps=30, token=KEYS[0])) for i in range(12)]
            answers = await asyncio.gather(*mine)
            other = await c.post("/sd", json=body(seed=99, token=KEYS[1]))
            return answers, other

    answers, other = asyncio.run(flood())
    codes = Counter(a.status_code for a in answers)
    assert set(codes) == {200, 429} and codes[429] >= 6, codes
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert "CRAFTSERVE_MAX_QUEUE_PER_KEY" in answer.json()["error"]["message"]
    png(other)


def test_a_model_that_fails_to_load_is_named_and_the_rest_serve(cluster: Cluster) -> None:
    with cluster.client() as c:
        failed = c.post("/sd", json=body(model="broken"))
        assert failed.status_code == 503, failed.text
        assert "model 'broken' cannot be served now" in failed.json()["error"]["message"]
        state = cluster.wait(lambda s: s["models"]["broken"].startswith("Generator#"),
                             "naming the replica that failed", timeout=10)
        assert "unavailable" in state["models"]["broken"]
        assert any(w["model_states"]["broken"].startswith("unavailable") for w in state["workers"])
        png(c.post("/sd", json=body()))


def test_reload_reaches_every_replica(cluster: Cluster) -> None:
    text = cluster.models.read_text()
    cluster.models.write_text(
        text.replace("models:\n", 'models:\n  tiny-extra: {source: "builtin:tiny-sdxl"}\n', 1))
    try:
        with cluster.client(headers=AUTH) as c:
            report = c.post("/admin/reload")
            assert report.status_code == 200, report.text
            assert report.json()["added"] == ["tiny-extra"]
            cluster.wait(lambda s: all("tiny-extra" in w["model_states"] for w in s["workers"]),
                         "every replica serving tiny-extra", timeout=20)
            png(c.post("/sd", json=body(model="tiny-extra")))
        # SIGHUP to `craftserve serve --ray` asks the board; the ingress follows it too
        from app.cluster.board import get_board

        cluster.models.write_text(text)
        ray.get(get_board("craftserve").request_reload.remote())
        state = cluster.wait(lambda s: "tiny-extra" not in s["models"]
                             and all("tiny-extra" not in w["model_states"] for w in s["workers"]),
                             "tiny-extra gone everywhere", timeout=20)
        assert state["last_reload"]["removed"] == ["tiny-extra"]
    finally:
        cluster.models.write_text(text)


def test_killed_replica_fails_only_its_jobs_and_is_replaced(cluster: Cluster) -> None:
    before = cluster.wait(lambda s: s["ready"] and len(s["workers"]) == 2, "two replicas")
    victim = before["workers"][0]

    async def load_then_kill() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            calls = [asyncio.ensure_future(c.post("/sd", json=body(seed=i, steps=30, width=128,
                                                                   height=128, token=KEYS[i])))
                     for i in range(16)]
            while True:  # kill it while it has jobs: the ingress's count is current, the
                state = (await c.get("/ready", headers=AUTH)).json()  # board's up to 1 s old
                if any(w["name"] == victim["name"] and w["in_flight"] >= 2 and w["running"]
                       for w in state["workers"]):
                    break
                await asyncio.sleep(0.05)
            os.kill(victim["pid"], signal.SIGKILL)
            return await asyncio.gather(*calls)

    answers = asyncio.run(load_then_kill())
    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {200, 503} and codes[503] >= 1 and codes[200] >= 1, codes
    for answer in answers:
        if answer.status_code == 503:
            assert "replica running this job stopped" in answer.json()["error"]["message"]
    survivors = {a.headers["x-worker"] for a in answers if a.status_code == 200}
    assert any(name != victim["name"] for name in survivors)
    after = cluster.wait(lambda s: s["ready"] and len(s["workers"]) == 2
                         and victim["name"] not in {w["name"] for w in s["workers"]},
                         "a replacement replica up", timeout=120)
    assert len({w["pid"] for w in after["workers"]}) == 2
    with cluster.client() as c:
        png(c.post("/sd", json=body()))


# ---- `craftserve serve --ray`: bad input, no cluster needed ----------------------------------
def test_ray_flag_without_the_extra_says_how_to_install(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray.serve", None)
    models = write_models_file(tmp_path, "models:\n  m: {source: 'builtin:tiny-sdxl'}\n")
    assert cli.main(["serve", "--ray", "--models", str(models)]) == 2
    err = capsys.readouterr().err  # Ray may forward other tests' replica logs here meanwhile
    own = [line for line in err.splitlines() if line.startswith(("craftserve:", "Traceback"))]
    assert own == [
        'craftserve: --ray needs Ray Serve, which is not installed: from the clone, '
        'pip install -e ".[ray]" (docs/scale-out.md)'], err


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_unreachable_address_is_one_clear_line(address: str, capsys, tmp_path) -> None:
    models = write_models_file(tmp_path, "models:\n  m: {source: 'builtin:tiny-sdxl'}\n")
    address = address.format(port=free_port())
    started = time.monotonic()
    assert cli.main(["serve", "--ray", "--address", address, "--models", str(models)]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    # Ray forwards its replicas' log lines (of this file's cluster) to stderr whenever they come:
    # of what the command itself writes there is one line, and no traceback.
    own = [line for line in err.splitlines() if line.startswith(("craftserve:", "Traceback"))]
    assert len(own) == 1, err
    assert own[0].startswith(f"craftserve: cannot reach the Ray cluster at '{address}': nothing answers")


def test_max_replicas_below_min_is_refused(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setenv("CRAFTSERVE_RAY_MIN_REPLICAS", "3")
    monkeypatch.setenv("CRAFTSERVE_RAY_MAX_REPLICAS", "2")
    assert cli.main(["serve", "--ray", "--models", str(tmp_path / "models.yaml")]) == 2
    err = capsys.readouterr().err
    assert "CRAFTSERVE_RAY_MAX_REPLICAS (2) is below CRAFTSERVE_RAY_MIN_REPLICAS (3)" in err


def test_address_without_ray_flag_is_refused(capsys, tmp_path) -> None:
    assert cli.main(["serve", "--address", "auto", "--models", str(tmp_path / "m.yaml")]) == 2
    assert "--address joins a Ray cluster; it needs --ray" in capsys.readouterr().err



def test_generator_options_follow_the_settings() -> None:
    from app.cluster.deploy import generator_options
    from app.config import Settings

    fixed = generator_options(Settings(ray_min_replicas=3, ray_max_replicas=3, max_queue=10,
                                       max_batch=4, ray_max_queued=7, ray_cpus_per_replica=2), 1.0)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1.0}
    assert fixed["max_ongoing_requests"] == 10 and fixed["max_queued_requests"] == 7
    scaled = generator_options(Settings(ray_min_replicas=1, ray_max_replicas=4, ray_target_ongoing=3,
                                        ray_upscale_delay_s=5, ray_downscale_delay_s=60,
                                        queue_deadline_s=100, shutdown_grace_s=20), 0.0)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 3,
        "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
    assert scaled["graceful_shutdown_timeout_s"] == 120  # a queued job's deadline, then the grace


# ---- the job id on both sides of the wire, no cluster needed ---------------------------------
def test_a_replica_failure_names_the_id_the_client_was_given(monkeypatch, caplog, tmp_path) -> None:
    """The ingress's JobCall carries the job's id; the replica's engine job keeps it, so a bug
    on the replica is answered (and logged there) under the id the client has. The replica's
    side of the call runs on a real Engine with a fault injected, without a cluster."""
    from app.cluster.replica import job_events
    from app.cluster.wire import ERROR, JobCall, error_from_wire
    from app.config import Settings
    from app.engine import worker
    from app.engine.engine import Engine
    from app.engine.jobs import GenParams, Job
    from app.metrics import Metrics
    from app.registry import load_registry
    from app.samplers import resolve_sampler

    def broken(self, name: str):  # noqa: ANN001, ANN202
        raise RuntimeError("injected fault")  # a bug in the worker, before any model is built

    monkeypatch.setattr(worker.Worker, "model", broken)
    models = write_models_file(tmp_path, "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl}\n")
    settings = Settings(models=models, devices="cpu")
    params = GenParams(model="tiny-sdxl", prompt="p", negative_prompt="",
                       sampler=resolve_sampler("Euler"), steps=2, width=64, height=64,
                       cfg_scale=7.0, loras=(), seed=1)

    async def on_both_sides() -> tuple[str, JobCall, list]:
        ingress_job = Job(params=params, client="c", loop=asyncio.get_running_loop(), deadline_s=60)
        call = JobCall.of(ingress_job)  # what the ingress sends
        engine = Engine(settings, load_registry(settings.models), Metrics())
        engine.start()
        try:
            events = [event async for event in job_events(engine, call, "replica-x")]
        finally:
            await asyncio.to_thread(engine.stop, 0)
        return ingress_job.id, call, events

    with caplog.at_level(logging.ERROR, logger="app.engine.worker"):
        job_id, call, events = asyncio.run(on_both_sides())
    assert call.job_id == job_id and call.client == "c" and 0 < call.deadline_s <= 60
    kind, payload = events[-1]
    assert kind == ERROR and payload["status"] == 500
    assert f"internal error while generating (job {job_id})" in error_from_wire(payload).message
    assert job_id in caplog.text  # the replica's log line names it too
