"""The Hugging Face Hub out of reach: asked once (no retries), said once in the log, cached
weights still load, missing ones reported by /ready.

No test here leaves the machine: the Hub's endpoint (huggingface_hub.constants.ENDPOINT, what
HF_ENDPOINT sets) points at a closed or stub port on 127.0.0.1, and every other connection is
refused by the test and recorded.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.engine.hub import HubAccess, WeightsMissing
from tests.conftest import body, png, shipped_models_text

ROOT = Path(__file__).resolve().parent.parent
CACHED_REPO = "craftserve-tests/cached-sd15"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def hub_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """A newcomer's machine without network: HF_HUB_OFFLINE unset (CI sets it; huggingface_hub
    reads it once, at import), the Hub's endpoint a closed loopback port, an empty Hugging
    Face cache of the test's own. Records every connection to the endpoint; refuses (and
    records) any that is not loopback."""
    from huggingface_hub import constants

    port = _closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    try:  # huggingface_hub 1.x asks the Hub once a process (one request, 3 s, no retries) for
        # its list of AI agents to name in its user-agent, even for a cache lookup: kept out
        # of the count, which is about craftserve's requests
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        _detect_agent = None
    if hasattr(_detect_agent, "_registry"):
        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    state: dict = {"endpoint": endpoint, "port": port, "cache": cache, "hub": [], "outside": []}
    real_connect = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple):
            host, to = address[0], address[1]
            if host not in ("127.0.0.1", "::1", "localhost"):
                state["outside"].append(address)
                raise OSError(f"network blocked by the test: {address}")
            if to == port:
                state["hub"].append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return state


def _access(recheck_s: float = 60.0, allow_downloads: bool = True, models: dict | None = None) -> HubAccess:
    return HubAccess(allow_downloads=allow_downloads, recheck_s=recheck_s,
                     models=lambda: models or {})


def _notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "app.engine.hub" and r.levelno >= logging.WARNING]


# ---- HubAccess on its own ------------------------------------------------------------------
def test_an_unreachable_hub_is_asked_once_and_said_once(hub_off: dict, caplog) -> None:
    hub = _access()
    with caplog.at_level(logging.INFO):
        reasons = [hub.why_not() for _ in range(5)]
    assert reasons[0] is not None and "cannot be reached" in reasons[0]
    assert hub_off["endpoint"] in reasons[0]
    assert len(set(reasons)) == 1
    assert hub.probes == 1 and len(hub_off["hub"]) == 1  # one request, no retries
    assert len(_notices(caplog)) == 1
    # a reload forgets the answer: asked again, and said again (once)
    hub.forget()
    with caplog.at_level(logging.INFO):
        assert hub.why_not() == reasons[0]
        hub.why_not()
    assert hub.probes == 2 and len(hub_off["hub"]) == 2
    assert len(_notices(caplog)) == 2
    assert hub_off["outside"] == []


def test_the_answer_is_kept_for_recheck_s_only(hub_off: dict, caplog) -> None:
    hub = _access(recheck_s=0)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert hub.why_not() is not None
    assert hub.probes == 3  # asked each time it is needed...
    assert len(_notices(caplog)) == 1  # ...but said once while it stays out of reach


def test_a_hub_that_never_answers_costs_one_timeout(hub_off: dict, monkeypatch, caplog) -> None:
    """A firewall that accepts connections and drops the rest: before, diffusers' first request
    (it has no timeout) held the worker for as long as the connection stayed open."""
    from huggingface_hub import constants

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing is ever read or answered
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    hub = HubAccess(allow_downloads=True, recheck_s=60, models=dict, timeout_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        reason = hub.why_not()
        assert hub.why_not() == reason
    silent.close()
    assert reason is not None and "cannot be reached" in reason
    assert hub.probes == 1
    assert time.monotonic() - started < 10  # the probe's timeout, not a retry schedule
    assert len(_notices(caplog)) == 1


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def stub_hub(hub_off: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Stub]]:
    """An HTTP server on loopback standing in for the Hub; set `.status` to what it answers."""
    from huggingface_hub import constants

    handler = type("Handler", (_Stub,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield handler
    server.shutdown()
    server.server_close()


def test_a_hub_that_answers_allows_downloads_and_a_5xx_does_not(stub_hub, caplog) -> None:
    hub = _access(recheck_s=0)
    with caplog.at_level(logging.INFO):
        assert hub.why_not() is None
        stub_hub.status = 502  # a proxy that cannot reach the Hub either
        assert "answered HTTP 502" in (hub.why_not() or "")
        stub_hub.status = 200
        assert hub.why_not() is None
    assert len(_notices(caplog)) == 1
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == "app.engine.hub")


def test_switched_off_hub_or_downloads_send_no_request(hub_off: dict, monkeypatch, caplog) -> None:
    from huggingface_hub import constants

    with caplog.at_level(logging.INFO):
        assert "CRAFTSERVE_ALLOW_DOWNLOADS=false" in (_access(allow_downloads=False).why_not() or "")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        hub = _access()
        assert "HF_HUB_OFFLINE=1" in (hub.why_not() or "")
        assert hub.probes == 0
    assert hub_off["hub"] == []
    assert len(_notices(caplog)) == 2


class _FakeRepo:
    def __init__(self, cached: bool) -> None:
        self.cached = cached
        self.calls: list[tuple[bool, str | None]] = []

    def from_pretrained(self, source, *, local_files_only, variant=None, **kwargs):
        self.calls.append((local_files_only, variant))
        if self.cached:
            return source
        raise OSError("not in the cache")


def test_a_cache_miss_asks_the_hub_access_before_any_download(hub_off: dict, tmp_path: Path) -> None:
    import torch

    from app.engine.pipelines import _from_pretrained

    hub = _access()
    repo = _FakeRepo(cached=False)
    with pytest.raises(WeightsMissing, match="cannot be reached"):
        _from_pretrained(repo, "owner/repo", True, hub=hub, torch_dtype=torch.float16)
    assert repo.calls == [(True, "fp16"), (True, None)]  # the cache only
    assert hub.probes == 1
    cached = _FakeRepo(cached=True)
    other = _access()
    assert _from_pretrained(cached, "owner/repo", True, hub=other, torch_dtype=torch.float32)
    # a local folder that does not load is no matter for the Hub: its own error, no request
    with pytest.raises(OSError, match="not in the cache"):
        _from_pretrained(_FakeRepo(cached=False), str(tmp_path), True, hub=other,
                         torch_dtype=torch.float32)
    assert other.probes == 0
    assert len(hub_off["hub"]) == 1  # weights in the cache: the Hub is not asked at all


def test_a_hub_that_answers_is_downloaded_from(stub_hub) -> None:
    import torch

    from app.engine.pipelines import _from_pretrained

    class OnTheHub(_FakeRepo):
        def from_pretrained(self, source, *, local_files_only, variant=None, **kwargs):
            self.calls.append((local_files_only, variant))
            if local_files_only:
                raise OSError("not in the cache")
            return source

    repo = OnTheHub(cached=False)
    hub = _access()
    assert _from_pretrained(repo, "owner/repo", True, hub=hub, torch_dtype=torch.float32) == "owner/repo"
    assert repo.calls == [(True, None), (False, None)]
    assert hub.probes == 1


# ---- the shipped models file on a machine without network ----------------------------------
def _cache_repo(cache: Path, repo: str, folder: Path) -> None:
    """`folder` (a diffusers folder) as the Hugging Face cache holds a download of `repo`."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_shipped_models_without_network_say_so_once_and_serve_the_rest(
        hub_off: dict, make_server, tiny_sd15_folder: Path, caplog) -> None:
    """The newcomer's first start: no HF_HUB_OFFLINE, no network. The Hub is asked once (not
    five retries a file), one warning lists the models waiting for weights, a Hub model whose
    weights are in the cache loads, /ready says why sdxl-base cannot be served."""
    _cache_repo(hub_off["cache"], CACHED_REPO, tiny_sd15_folder)
    text = shipped_models_text()
    text = text.replace("models:\n", f"models:\n  cached-sd15:\n    source: {CACHED_REPO}\n"
                                     "    preload: true\n", 1)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        server = make_server(text, wait_ready=False, max_batch=1, max_models_per_device=3)
        with server.client() as c:
            while not all(w["preloaded"] for w in server.ready().json()["workers"]):
                assert time.monotonic() - started < 120
                time.sleep(0.05)
            ready = server.ready()  # with a key: /ready's details
            # serving, and saying which model waits for its weights and why
            assert ready.status_code == 200
            state = ready.json()
            assert state["status"] == "serving, some models wait for weights"
            assert state["waiting_for_weights"] == ["sdxl-base"]
            assert state["models"]["tiny-sdxl"] == "loaded"
            assert state["models"]["cached-sd15"] == "loaded"  # from the cache, offline
            assert state["reasons"] == []
            assert state["models"]["sdxl-base"].startswith("waiting for weights: ")
            assert "cannot be reached" in state["models"]["sdxl-base"]
            png(c.post("/sd", json=body()))
            png(c.post("/sd", json=body(model="cached-sd15")))
            refused = c.post("/sd", json=body(model="sdxl-base"))
            assert refused.status_code == 503
            assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in refused.json()["detail"]
    assert len(hub_off["hub"]) == 1  # one request to the Hub in all: no retries
    assert hub_off["outside"] == []
    notices = _notices(caplog)
    assert len(notices) == 1
    assert "sdxl-base (stabilityai/stable-diffusion-xl-base-1.0, madebyollin/sdxl-vae-fp16-fix)" \
        in notices[0]
    assert "cached-sd15" not in notices[0] and "tiny-sdxl" not in notices[0]
    assert "hf download madebyollin/sdxl-vae-fp16-fix" in notices[0]
    hub_noise = [r.getMessage() for r in caplog.records
                 if r.name.startswith("huggingface_hub") and r.levelno >= logging.WARNING]
    assert hub_noise == []
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "sdxl-base" in r.getMessage()]
    assert warnings == notices  # the worker does not repeat it

    # a reload asks the Hub again (weights may have been copied in) and says it once more
    with caplog.at_level(logging.INFO):
        server.app.state.engine.reload()
        deadline = time.monotonic() + 60
        while len(_notices(caplog)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert len(hub_off["hub"]) == 2
    server.stop()

