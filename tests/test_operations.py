"""Discovery routes, /health, /ready, /docs, /metrics, and the 503/500 answers."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import API_KEY, TINY_MODELS, body, png


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/sd/models-sdxl", ["tiny-sdxl"]), ("/sd/models-sd", []), ("/sd/models-sd3", []),
     ("/sd/loras-sdxl", []), ("/sd/loras-sd", []), ("/models-xl", ["tiny-sdxl"]),
     ("/image/models/SDXL-1.0", ["tiny-sdxl"]), ("/image/models/FLUX.1", [])],
)
def test_discovery_lists_names_without_a_token(client: httpx.Client, path: str,
                                               expected: list) -> None:
    answer = client.get(path)
    assert answer.status_code == 200
    assert answer.json() == expected


def test_sampler_listings(client: httpx.Client) -> None:
    names = client.get("/sd/samplers").json()
    for name in ("Euler", "Euler a", "DPM++ 2M", "DDIM"):
        assert name in names
    assert "euler_ancestral" in client.get("/samplers-xl").json()
    assert "karras" in client.get("/schedulers-xl").json()


def test_unknown_category_is_doesnt_have(client: httpx.Client) -> None:
    answer = client.get("/image/models/SD-9")
    assert answer.status_code == 422
    assert "doesn't have category 'SD-9'" in answer.json()["detail"]


def test_health_ready_docs_metrics(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"]["tiny-sdxl"] == "loaded"
    assert client.get("/docs").status_code == 200
    assert "/sd" in client.get("/openapi.json").json()["paths"]
    png(client.post("/sd", json=body()))
    text = client.get("/metrics").text
    assert 'craftserve_images_total{model="tiny-sdxl"' in text
    assert "craftserve_queue_depth" in text


def test_unknown_route_is_404(client: httpx.Client) -> None:
    assert client.post("/nope", json={}).status_code == 404


def test_unavailable_model_is_503_and_ready_says_why(make_server) -> None:
    models = TINY_MODELS + """
  gone-xl:
    source: craftserve-tests/model-that-does-not-exist
    family: sdxl
    preload: true
"""
    server = make_server(models, wait_ready=False, allow_downloads=False)
    deadline = time.monotonic() + 60
    with server.client() as c:
        while True:
            state = server.ready()
            if all(w["preloaded"] for w in state.json()["workers"]) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # the server serves (tiny-sdxl) and says which model waits for its weights, and why
        assert state.status_code == 200
        assert state.json()["status"] == "serving, some models wait for weights"
        assert state.json()["waiting_for_weights"] == ["gone-xl"]
        assert "downloads are switched off" in state.json()["models"]["gone-xl"]
        answer = c.post("/sd", json=body(model="gone-xl"))
        assert answer.status_code == 503
        assert "model 'gone-xl' cannot be served now" in answer.json()["detail"]
        assert "hf download" in answer.json()["detail"]
        assert int(answer.headers["retry-after"]) >= 1
        png(c.post("/sd", json=body()))  # the other model keeps serving
        assert "gone-xl" in c.get("/sd/models-sdxl").json()


def test_full_queue_is_503_with_retry_after(make_server) -> None:
    """The queue every key shares is full: another key than the one waiting is answered 503
    (the waiting key itself is past its own share first: 429, tests/test_quota.py)."""
    server = make_server(TINY_MODELS, max_queue=1, max_batch=1, api_keys=[API_KEY, "second-key"])
    engine = server.app.state.engine
    gate = threading.Event()
    worker = engine.workers[0]
    real = worker.generate

    def held(model, jobs):  # a fake slow pipeline call: holds the worker until released
        gate.wait(30)
        return real(model, jobs)

    worker.generate = held
    results: dict[str, httpx.Response] = {}
    try:
        with server.client() as c:
            def send(name: str, seed: int) -> None:
                results[name] = c.post("/sd", json=body(seed=seed))

            first = threading.Thread(target=send, args=("running", 1))
            first.start()
            _wait(lambda: worker.running)
            second = threading.Thread(target=send, args=("queued", 2))
            second.start()
            _wait(lambda: len(engine.queue) == 1)
            refused = c.post("/sd", json=body(seed=3, token="second-key"))
            assert refused.status_code == 503
            assert "queue is full" in refused.json()["detail"]
            assert int(refused.headers["retry-after"]) >= 1
            gate.set()
            first.join(30)
            second.join(30)
    finally:
        gate.set()
        worker.generate = real
    assert results["running"].status_code == 200
    assert results["queued"].status_code == 200


def test_a_bug_is_a_plain_500_and_the_server_goes_on(server, client: httpx.Client,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    worker = server.app.state.engine.workers[0]
    model = worker.models["tiny-sdxl"]
    real_call = type(model.pipe).__call__

    def broken(self, *args, **kwargs):
        raise RuntimeError("secret internal detail")

    type(model.pipe).__call__ = broken
    try:
        answer = client.post("/sd", json=body())
    finally:
        type(model.pipe).__call__ = real_call
    assert answer.status_code == 500
    assert "secret internal detail" not in answer.text
    assert "Traceback" not in answer.text
    assert "internal error" in answer.json()["detail"]
    assert "secret internal detail" in caplog.text  # logged, with the traceback
    png(client.post("/sd", json=body()))


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
