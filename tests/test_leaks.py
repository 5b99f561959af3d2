"""What the server tells whom ("many keys, one box"): each test replays a leak over HTTP against
a live server and shows it is closed.

- /ready without a key: ready or not, state words, fixed reasons; no paths, no YAML, no
  exception text (a valid key still gets the details);
- URLs in answers from CRAFTSERVE_PUBLIC_URL, not from the request's Host;
- security headers on every answer, the page and /docs under a Content-Security-Policy;
- HEAD on every GET route;
- /docs without a CDN.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, TINY_MODELS, body, png

OTHER_KEY = "other-key-456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


@pytest.fixture(scope="module")
def two_keys(make_server):
    """tiny-sdxl, two keys; a preload model that cannot load (not on disk, no downloads)."""
    models = TINY_MODELS + """
  gone-xl:
    source: craftserve-tests/model-that-does-not-exist
    family: sdxl
    preload: true
"""
    server = make_server(models, wait_ready=False, allow_downloads=False,
                         api_keys=[f"{API_KEY}  admin", OTHER_KEY])  # the first reloads
    deadline = time.monotonic() + 60
    while not all(w["preloaded"] for w in server.ready().json()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return server


# ---- 1. /ready --------------------------------------------------------------------------
def _break_models_file(server) -> tuple[Path, str]:
    """Rewrite the models file with an entry whose source is a path that does not exist, and
    ask for a reload (refused: nothing changes, /ready's last_reload has the error)."""
    models_file = Path(server.app.state.settings.models)
    secret = "/srv/private-weights/customer-acme/model-v7"
    models_file.write_text(models_file.read_text() + f"  broken:\n    source: {secret}\n")
    with server.client() as c:
        refused = c.post("/admin/reload", headers=AUTH)
    assert refused.status_code == 500 and secret in refused.text
    return models_file, secret


def test_ready_without_a_key_has_no_paths_yaml_or_exception_text(two_keys) -> None:
    models_file, secret = _break_models_file(two_keys)
    with two_keys.client() as c:
        public = c.get("/ready")
        detailed = c.get("/ready", headers=OTHER)  # either key: the details
    # load balancers: the same answer either way (a model waiting for weights does not stop
    # the others serving: 200, and the status says so)
    assert public.status_code == detailed.status_code == 200
    state = public.json()
    assert set(state) == {"ready", "status", "reasons", "models", "waiting_for_weights"}
    assert state["ready"] is True and state["status"] == "serving, some models wait for weights"
    assert state["models"] == {"tiny-sdxl": "loaded", "gone-xl": "waiting for weights"}
    assert state["waiting_for_weights"] == ["gone-xl"] and state["reasons"] == []
    for leak in (secret, str(models_file), str(models_file.parent), "source", "huggingface",
                 "craftserve-tests/", "does not exist", "last_reload", "cpu"):
        assert leak not in public.text, leak
    # a valid key sees what an operator needs: the failure's text and the reload's error
    details = detailed.json()
    assert "hugging face" in details["models"]["gone-xl"].lower()
    assert secret in details["last_reload"]["error"]
    assert details["workers"] and "queue_depth" in details


def test_ready_with_a_wrong_key_is_refused_and_counted(two_keys) -> None:
    with two_keys.client() as c:
        wrong = c.get("/ready", headers={"Authorization": "Bearer not-a-key"})
        assert wrong.status_code == 403  # /ready is a VisionCraft-shaped route
        assert "workers" not in wrong.text and "gone-xl" not in wrong.text
        assert c.get("/ready", auth=("anyone", OTHER_KEY)).json()["workers"]  # Basic works too


def test_ready_without_a_key_is_200_when_ready(client: httpx.Client) -> None:
    answer = client.get("/ready")
    assert answer.status_code == 200
    assert answer.json() == {"ready": True, "status": "serving", "reasons": [],
                             "models": {"tiny-sdxl": "loaded"}, "waiting_for_weights": []}


# ---- 2. URLs in answers -------------------------------------------------------------------
PUBLIC = "https://images.example.com/base"
EVIL = {"Host": "attacker.example", "X-Forwarded-Host": "attacker.example",
        "X-Forwarded-Proto": "http"}


def _read_events(client, job_id: str, headers: dict) -> list[tuple[str, dict]]:
    events, current = [], {}
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith(("event:", "data:")):
                name, _, value = line.partition(":")
                current[name] = value.strip()
            elif not line and "event" in current:
                events.append((current["event"], json.loads(current["data"])))
                current = {}
    return events


def _local(url: str) -> str:
    """The path of a public URL on this test server (the proxy in front would strip /base)."""
    assert url.startswith(PUBLIC + "/"), url
    return url.removeprefix(PUBLIC)


@pytest.fixture(scope="module")
def public_server(make_server):
    return make_server(api_keys=[API_KEY, OTHER_KEY], public_url=PUBLIC + "/", max_batch=1,
                       allowed_hosts="*")  # any Host: the links must not follow it


def test_without_a_public_url_links_follow_the_host_header(make_server) -> None:
    """Today's behaviour, kept when CRAFTSERVE_PUBLIC_URL is unset (and documented as the risk):
    a client chooses the host of the links it is handed, among the names ALLOWED_HOSTS lets in
    (by default, on loopback, loopback names only: then attacker.example is refused)."""
    evil = {"Host": "attacker.example"}
    with make_server(allowed_hosts="*").client() as c:
        answer = c.post("/generate", json=body(image_count=1), headers=evil)
        assert answer.json()["images"][0].startswith("http://attacker.example/images/")
    with make_server().client() as c:
        assert c.post("/generate", json=body(image_count=1), headers=evil).status_code == 400


def test_every_url_in_an_answer_starts_with_the_public_url(public_server) -> None:
    with public_server.client() as c:
        # VisionCraft /generate, with another key
        urls = c.post("/generate", json=body(image_count=2, token=OTHER_KEY), headers=EVIL).json()
        assert len(urls["images"]) == 2
        for url in urls["images"]:
            png(c.get(_local(url)))
        # OpenAI url answers
        made = c.post("/v1/images/generations", headers={**AUTH, **EVIL},
                      json={"model": "tiny-sdxl", "prompt": "a lighthouse", "size": "64x64",
                            "response_format": "url", "n": 1})
        assert made.status_code == 200, made.text
        png(c.get(_local(made.json()["data"][0]["url"])))
        # the job API: status, events and image URLs, in every answer that carries them
        job = c.post("/jobs", json=body(steps=2), headers={**AUTH, **EVIL}).json()
        for name in ("status_url", "events_url", "image_url"):
            assert job[name] == f"{PUBLIC}/jobs/{job['id']}" + {"status_url": "", "events_url": "/events",
                                                                 "image_url": "/image"}[name]
        events = _read_events(c, job["id"], {**AUTH, **EVIL})
        assert events[-1][0] == "done" and events[-1][1]["image_url"] == job["image_url"]
        state = c.get(_local(job["status_url"]), headers={**AUTH, **EVIL}).json()
        assert state["image_url"] == job["image_url"]
        png(c.get(_local(job["image_url"]), headers=AUTH))
        # nothing in any of these answers names the host the client sent
        assert "attacker" not in json.dumps([urls, made.json(), job, events, state])


@pytest.mark.parametrize("value", ["ftp://images.example.com", "https://images.example.com/?a=1",
                                   "images.example.com", "https:///base", "https://x.example/#top"])
def test_a_public_url_that_is_not_one_is_refused_at_start(value: str) -> None:
    from pydantic import ValidationError

    from app.config import Settings

    with pytest.raises(ValidationError, match="CRAFTSERVE_PUBLIC_URL"):
        Settings(public_url=value)


# ---- 3. security headers ------------------------------------------------------------------
def _images_and_job_answers(c: httpx.Client) -> dict[str, httpx.Response]:
    """One answer of each kind that carries an image or a job's state, in every dialect."""
    answers = {"sd": c.post("/sd", json=body())}
    urls = c.post("/generate", json=body(image_count=1))
    answers["generate"] = urls
    answers["stored image"] = c.get(urls.json()["images"][0])
    answers["openai"] = c.post("/v1/images/generations", headers=AUTH,
                               json={"model": "tiny-sdxl", "prompt": "x", "size": "64x64",
                                     "response_format": "url"})
    answers["openai image"] = c.get(answers["openai"].json()["data"][0]["url"])
    answers["a1111"] = c.post("/sdapi/v1/txt2img", auth=("u", API_KEY),
                              json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
    answers["a1111 progress"] = c.get("/sdapi/v1/progress", auth=("u", API_KEY))
    job = c.post("/jobs", json=body(steps=2), headers=AUTH)
    answers["job"] = job
    with c.stream("GET", f"/jobs/{job.json()['id']}/events", headers=AUTH) as events:
        events.read()
        answers["job events"] = events
    answers["job state"] = c.get(f"/jobs/{job.json()['id']}", headers=AUTH)
    answers["job image"] = c.get(f"/jobs/{job.json()['id']}/image", headers=AUTH)
    return answers


def test_images_and_answers_with_images_or_job_state_are_private_no_store(client) -> None:
    for name, answer in _images_and_job_answers(client).items():
        assert answer.status_code in (200, 202), (name, answer.text)
        assert answer.headers["cache-control"] == "private, no-store", name
        assert answer.headers["x-content-type-options"] == "nosniff", name


def test_every_answer_says_nosniff_errors_included(server, client) -> None:
    answers = {
        "health": client.get("/health"),
        "ready": client.get("/ready"),
        "metrics": client.get("/metrics"),
        "listing": client.get("/sd/models-sdxl"),
        "not found": client.get("/no-such-route"),
        "no key": client.post("/sd", json=body(token=...)),
        "invalid": client.post("/sd", json=body(steps=999)),
        "URL too long (edge)": client.get("/health?" + "x" * 9000),
        "openai no key": client.get("/v1/models"),
        "a1111 no key": client.get("/sdapi/v1/sd-models"),
        "wrong method": client.get("/sd"),
    }
    engine = server.app.state.engine
    real = engine.readiness
    engine.readiness = lambda: 1 / 0  # a bug: FastAPI's ServerErrorMiddleware answers 500
    try:
        answers["500"] = client.get("/ready")
    finally:
        engine.readiness = real
    assert answers["500"].status_code == 500
    for name, answer in answers.items():
        assert answer.headers.get("x-content-type-options") == "nosniff", name
        assert "content-security-policy" not in answer.headers, name  # HTML only


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_the_page_and_docs_run_under_a_self_only_policy(client, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in answer.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["x-content-type-options"] == "nosniff"
    # nothing inline the policy would block: scripts and styles are files of this server
    html = answer.text
    assert "<style" not in html and " style=" not in html
    assert re.findall(r"<[^>]*\son[a-z]+\s*=", html) == []  # no inline event handler attribute
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        if ref.startswith(("#", "/docs")):
            continue
        asset = client.get(ref if ref.startswith("/") else "/" + ref)
        assert asset.status_code == 200, ref
        assert asset.headers["x-content-type-options"] == "nosniff"


def test_a_public_url_on_another_origin_may_be_connected_to(public_server) -> None:
    with public_server.client() as c:
        policy = c.get("/").headers["content-security-policy"]
    assert "connect-src 'self' https://images.example.com;" in policy


# ---- 4. HEAD ------------------------------------------------------------------------------
def _same_but_body(get: httpx.Response, head: httpx.Response) -> None:
    assert head.status_code == get.status_code, (get.request.url, head.text)
    assert head.content == b""
    drop = {"date"}
    assert {k: v for k, v in head.headers.items() if k not in drop} == \
        {k: v for k, v in get.headers.items() if k not in drop}, get.request.url


def test_head_answers_every_get_route_with_the_same_headers(two_keys) -> None:
    with two_keys.client() as c:
        urls = c.post("/generate", json=body(image_count=1, token=OTHER_KEY)).json()["images"]
        made = c.post("/v1/images/generations", headers=OTHER,
                      json={"model": "tiny-sdxl", "prompt": "x", "size": "64x64",
                            "response_format": "url"}).json()
        job = c.post("/jobs", json=body(steps=2), headers=AUTH).json()
        _read_events(c, job["id"], AUTH)  # until done
        routes = [
            ("/", {}), ("/docs", {}), ("/static/app.js", {}), ("/openapi.json", {}),
            ("/health", {}), ("/ready", {}), ("/ready", OTHER), ("/metrics", {}),
            # VisionCraft
            ("/sd/models-sdxl", {}), ("/sd/samplers", {}), ("/image/models/SDXL-1.0", {}),
            (urls[0], {}), ("/images/no-such-key.png", {}),
            # A1111
            ("/sdapi/v1/sd-models", {"Authorization": "Basic dTpvdGhlci1rZXktNDU2"}),
            ("/sdapi/v1/options", {}),  # no key: its 401
            # OpenAI
            ("/v1/models", OTHER), ("/v1/models/tiny-sdxl", OTHER), (made["data"][0]["url"], {}),
            ("/v1/models", {"Authorization": "Bearer wrong"}),
            # jobs: its key sees it, the other key gets the same 404 as for no job
            (f"/jobs/{job['id']}", AUTH), (f"/jobs/{job['id']}/image", AUTH),
            (f"/jobs/{job['id']}", OTHER),
        ]
        for url, headers in routes:
            _same_but_body(c.get(url, headers=headers), c.head(url, headers=headers))
        # a route without GET: HEAD is refused as GET is
        assert c.head("/sd").status_code == c.get("/sd").status_code == 405


def test_head_on_a_live_event_stream_answers_at_once_and_lets_go(two_keys) -> None:
    tracker = two_keys.app.state.jobs
    with two_keys.client(timeout=20) as c:
        made = c.post("/jobs", json=body(steps=30, width=512, height=512), headers=AUTH)
        assert made.status_code == 202, made.text
        job = made.json()
        try:
            head = c.head(f"/jobs/{job['id']}/events", headers=AUTH)
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-type"].startswith("text/event-stream")
            assert tracker.jobs[job["id"]].status in ("queued", "running")  # the stream is live
            deadline = time.monotonic() + 10
            while tracker.jobs[job["id"]].subscribers:  # the stream stopped: no subscriber left
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            c.delete(f"/jobs/{job['id']}", headers=AUTH)


# ---- 6. /docs without a CDN ---------------------------------------------------------------
def test_docs_load_nothing_from_another_host(client) -> None:
    html = client.get("/docs").text
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", html)
    assert "cdn" not in html.lower() and "http" not in html
    assets = dict.fromkeys(re.findall(r'(?:src|href)="([^"]+)"', html))
    assert len(assets) == 4  # favicon, Swagger UI's CSS and JS, the page's own init script
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for ref in assets:
        answer = client.get("/" + ref)  # relative to /docs
        assert answer.status_code == 200, ref
        assert answer.headers["content-type"].split(";")[0] == types[Path(ref).suffix], ref
        assert "http://" not in answer.text[:0]
    bundle = client.get("/static/swagger/swagger-ui-bundle.js")
    assert len(bundle.content) > 500_000 and b"SwaggerUIBundle" in bundle.content
    assert client.get("/static/swagger/swagger-ui.css").text.startswith(".swagger-ui")
    assert client.get("/static/docs.js").text.count('url: "openapi.json"') == 1
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc loaded from a CDN too: not served
    assert client.get("/docs/oauth2-redirect").status_code == 404
    assert client.get("/static/../app/main.py").status_code == 404
    assert client.get("/static/swagger/LICENSE").status_code == 404  # only what /docs loads


def test_the_short_ready_body_keeps_only_fixed_words() -> None:
    """Both engines' bodies (this machine's workers; Ray replicas, whose failures name the
    replica): every state that is not a known word is "unavailable", every reason fixed."""
    from app.engine.readiness import NO_REPLICA, public_readiness, readiness_body

    models = {"a": "loaded", "b": "unavailable: loading it failed (OSError) /srv/weights/b",
              "c": "replica-1: unavailable: /models/c.safetensors is truncated",
              "d": "loading", "e": "loads on first request"}
    _, body = readiness_body(models=models, preload=["a", "b", "c", "d"], accepting=False,
                             workers=[{"name": "w0", "device": "cuda:0"}], queue_depth=3,
                             last_reload=None, first=[NO_REPLICA],
                             last=["worker-0-cuda:0: not ready", "/etc/secret: something new"])
    assert public_readiness(body) == {
        "ready": False, "status": "cannot serve", "waiting_for_weights": [],
        "models": {"a": "loaded", "b": "unavailable", "c": "unavailable", "d": "loading",
                   "e": "loads on first request"},
        "reasons": [NO_REPLICA, "b: unavailable", "c: unavailable", "d: loading",
                    "the server is shutting down", "a worker is not ready", "not ready"],
    }
