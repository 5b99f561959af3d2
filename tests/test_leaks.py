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
                         api_keys=[API_KEY, OTHER_KEY])
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
    # load balancers: 503 either way (a preload model is unavailable)
    assert public.status_code == detailed.status_code == 503
    state = public.json()
    assert set(state) == {"ready", "reasons", "models"}
    assert state["ready"] is False
    assert state["models"] == {"tiny-sdxl": "loaded", "gone-xl": "unavailable"}
    assert state["reasons"] == ["gone-xl: unavailable"]
    for leak in (secret, str(models_file), str(models_file.parent), "source", "huggingface",
                 "craftserve-tests/", "does not exist", "last_reload", "cpu"):
        assert leak not in public.text, leak
    # a valid key sees what an operator needs: the failure's text and the reload's error
    details = detailed.json()
    assert "huggingface" in details["models"]["gone-xl"]
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
    assert answer.json() == {"ready": True, "reasons": [], "models": {"tiny-sdxl": "loaded"}}


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
    return make_server(api_keys=[API_KEY, OTHER_KEY], public_url=PUBLIC + "/", max_batch=1)


def test_without_a_public_url_links_follow_the_host_header(client: httpx.Client) -> None:
    """Today's behaviour, kept when CRAFTSERVE_PUBLIC_URL is unset (and documented as the risk):
    a client chooses the host of the links it is handed."""
    answer = client.post("/generate", json=body(image_count=1), headers={"Host": "attacker.example"})
    assert answer.json()["images"][0].startswith("http://attacker.example/images/")


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
