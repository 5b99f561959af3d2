"""Many keys, one box: what one key holder must not do to the others, each attack replayed over
HTTP against a live server with several keys.

- Reloading the models file (POST /admin/reload, A1111's refresh routes) takes a key with the
  `admin` role; anonymous callers never have it; a flood of reloads is coalesced.
- A web page cannot make a browser change the server's state: form content types, bodies not
  sent as JSON and cross-site requests are refused before any route runs.
- A Host outside the allowed names is refused (DNS rebinding).
- The client address is the connection's peer unless the peer is a trusted proxy, so the
  failed-key throttle cannot be escaped with X-Forwarded-For, and a valid key used from an
  address keeps working while an attacker at the same address is throttled.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.api.guards import LOOPBACK_NAMES, allowed_hosts, host_name
from app.auth import Authenticator, AuthFailures, hashed_entry, key_label
from app.cli import proxy_options
from app.config import Settings
from app.errors import RateLimited
from tests.conftest import TINY_MODELS, body, png, write_models_file
from tests.live import LiveServer, serve_process

ADMIN_KEY = "admin-key-5d0f2c7e1b9a4433"
USER_KEY = "user-key-8e41a6c2d7f03b95"
OTHER_KEY = "other-key-2b7c9e1f04a8d653"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"webui:{key}".encode()).decode()}


RELOAD_ROUTES = ("/admin/reload", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras")


@pytest.fixture(scope="module")
def box(make_server) -> LiveServer:
    """Three keys: an admin key written hashed in the keys file, two plain user keys."""
    return make_server(TINY_MODELS, api_keys=[f"{hashed_entry(ADMIN_KEY)}  admin", USER_KEY, OTHER_KEY],
                       reload_interval_s=1.0, allowed_hosts="127.0.0.1,localhost")


@pytest.fixture()
def c(box: LiveServer) -> Iterator[httpx.Client]:
    with box.client() as client:
        yield client


def _runs(server: LiveServer) -> int:
    return server.app.state.reloads.runs


# ---- 1. admin keys ---------------------------------------------------------------------------
def test_a_user_key_cannot_reload(box: LiveServer, c: httpx.Client) -> None:
    before = _runs(box)
    for headers in (bearer(USER_KEY), basic(USER_KEY)):
        answer = c.post("/admin/reload", headers=headers)
        assert answer.status_code == 403, answer.text
        message = answer.json()["error"]["message"]
        assert "`admin` role" in message and "keys file" in message and "KEY  admin" in message
        for path in RELOAD_ROUTES[1:]:
            refused = c.post(path, headers=headers)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "NotAdmin" and "`admin` role" in refused.json()["detail"]
            assert "www-authenticate" not in refused.headers  # the key is fine; another won't help
    # a body token is the key too, and it is no admin either
    assert c.post("/admin/reload", json={"token": USER_KEY}).status_code == 403
    # a wrong key is still the dialect's missing-key answer, not the role's
    assert c.post("/sdapi/v1/refresh-loras", headers=basic("nope")).status_code == 401
    assert _runs(box) == before  # nothing was reloaded

    for path in RELOAD_ROUTES:  # the admin key, configured hashed, sent as it is
        assert c.post(path, headers=bearer(ADMIN_KEY)).status_code == 200, path
    assert c.post("/sdapi/v1/refresh-checkpoints", headers=basic(ADMIN_KEY)).status_code == 200
    assert _runs(box) > before


def test_anonymous_callers_are_never_admin(make_server) -> None:
    """--allow-anonymous opens generation, not the operator routes: those still need a key
    with the admin role, which anonymous callers never have. The server is bound to loopback
    without ALLOWED_HOSTS, so only the loopback names are answered."""
    server = make_server(TINY_MODELS, api_keys=[f"{hashed_entry(ADMIN_KEY)}  admin"], allow_anonymous=True,
                         reload_interval_s=0)
    with server.client() as c:
        png(c.post("/sd", json=body(token="")))  # anonymous generation is open
        for path in RELOAD_ROUTES:
            refused = c.post(path)
            assert refused.status_code == 403, (path, refused.text)
            assert "anonymous callers" in refused.text and "`admin` role" in refused.text
        assert c.post("/admin/reload", headers=bearer("made-up")).status_code == 403
        for path in RELOAD_ROUTES:
            assert c.post(path, headers=bearer(ADMIN_KEY)).status_code == 200, path
        rebinding = c.get("/sd/models-sdxl", headers={"Host": "evil.example"})
        assert rebinding.status_code == 400 and "evil.example" in rebinding.json()["detail"]
        assert c.get("/sd/models-sdxl", headers={"Host": "localhost"}).status_code == 200


def test_who_is_admin() -> None:
    generated = Authenticator([])
    assert generated.is_admin(key_label(generated.generated_key))  # the operator's own key
    open_box = Authenticator([], allow_anonymous=True)
    assert open_box.generated_key is None and not open_box.is_admin(open_box.authenticate(None, "1.2.3.4"))
    keys = Authenticator([f"{hashed_entry(ADMIN_KEY)}  admin", USER_KEY])
    assert keys.is_admin(keys.authenticate(ADMIN_KEY)) and not keys.is_admin(keys.authenticate(USER_KEY))


def test_a_reload_flood_costs_one_rescan_per_interval(box: LiveServer, c: httpx.Client) -> None:
    """40 reloads at once, then 8 clients reloading back to back for 3 s: every request is
    answered 200, but the engine rescans at most once per RELOAD_INTERVAL_S (1 s here), and a
    generation goes on meanwhile."""
    time.sleep(1.1)
    before = _runs(box)
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: c.post("/admin/reload", headers=bearer(ADMIN_KEY)), range(40)))
    assert [a.status_code for a in answers] == [200] * 40
    assert _runs(box) - before <= 3  # one at once, one for those who came while it ran (+ stragglers)

    def flood() -> int:
        sent = 0
        with box.client() as own:
            while time.monotonic() < end:
                assert own.post("/sdapi/v1/refresh-loras", headers=bearer(ADMIN_KEY)).status_code == 200
                sent += 1
        return sent

    before = _runs(box)
    started = time.monotonic()
    end = started + 3.0
    with ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(flood) for _ in range(8)]
        png(c.post("/sd", json=body(token=USER_KEY)))  # generation is served during the flood
        sent = sum(f.result() for f in floods)
    rescans = _runs(box) - before
    assert rescans <= (time.monotonic() - started) / 1.0 + 1, (rescans, sent)
    assert sent >= rescans

    # a reload still sees the files as they are when it is asked for
    models = box.app.state.settings.models
    original = models.read_text(encoding="utf-8")
    try:
        write_models_file(models.parent, original + "  tiny-late: {source: builtin:tiny-sd15}\n")
        assert c.post("/admin/reload", headers=bearer(ADMIN_KEY)).json()["added"] == ["tiny-late"]
    finally:
        write_models_file(models.parent, original)
        assert c.post("/admin/reload", headers=bearer(ADMIN_KEY)).json()["removed"] == ["tiny-late"]


# ---- 2. cross-site requests ------------------------------------------------------------------
FORMS = {
    "form": {"data": {"prompt": "x"}},
    "multipart": {"files": {"file": ("a.txt", b"x")}},
    "text": {"content": b'{"prompt": "x"}', "headers": {"Content-Type": "text/plain"}},
    "empty form": {"headers": {"Content-Type": "application/x-www-form-urlencoded"}},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_form_post_with_a_valid_key_changes_nothing(box: LiveServer, c: httpx.Client, form: str) -> None:
    """What a page on any site can make a browser send, credentials included (HTTP Basic
    the browser keeps after A1111's challenge, or cookies a proxy checks), is refused 415 in
    the route's dialect before the route runs."""
    extra = FORMS[form]
    headers = {**basic(ADMIN_KEY), **extra.get("headers", {})}
    fields = {k: v for k, v in extra.items() if k != "headers"}
    before = _runs(box)
    for path in ("/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/interrupt",
                 "/sdapi/v1/skip", "/sdapi/v1/options", "/sdapi/v1/txt2img"):
        answer = c.post(path, headers=headers, **fields)
        assert answer.status_code == 415, (path, answer.text)
        data = answer.json()
        assert data["error"] == "UnsupportedMediaType", data
        assert "Content-Type: application/json" in data["detail"] and path in data["detail"]
    for path in ("/admin/reload", "/sd", "/jobs"):
        answer = c.post(path, headers=headers, **fields)
        assert answer.status_code == 415 and "Content-Type" in answer.json()["detail"], (path, answer.text)
    answer = c.post("/v1/images/generations", headers=headers, **fields)
    assert answer.status_code == 415 and answer.json()["error"]["code"] == "unsupported_media_type"
    assert _runs(box) == before


def test_state_changing_requests_need_json_or_nothing(box: LiveServer, c: httpx.Client) -> None:
    # a JSON body without its Content-Type is refused: the type is what a browser cannot forge
    answer = c.post("/sd", content=b'{"prompt": "x"}', headers=bearer(USER_KEY))
    assert answer.status_code == 415 and "no Content-Type" in answer.json()["detail"]
    # DELETE /jobs/{id} takes no body; a form type is refused before the job is looked up
    answer = c.request("DELETE", "/jobs/job-123", headers={**bearer(USER_KEY),
                                                           "Content-Type": "text/plain"})
    assert answer.status_code == 415, answer.text
    assert c.request("DELETE", "/jobs/job-123", headers=bearer(USER_KEY)).status_code == 404
    # what webuiapi sends (no body, no Content-Type), JSON with charset, and the page's own origin
    assert c.post("/sdapi/v1/interrupt", headers=basic(USER_KEY)).json() == {}
    assert c.post("/sdapi/v1/skip", headers={**basic(USER_KEY), "Content-Length": "0"}).status_code == 200
    assert c.post("/sdapi/v1/refresh-loras", headers=basic(ADMIN_KEY)).status_code == 200
    answer = c.post("/sdapi/v1/options", content=b'{"sd_model_checkpoint": "tiny-sdxl"}',
                    headers={**basic(USER_KEY), "Content-Type": "application/json; charset=utf-8",
                             "Sec-Fetch-Site": "same-origin", "Origin": box.url})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_cross_site_request_without_a_body_is_refused(box: LiveServer, c: httpx.Client, site: str) -> None:
    """`fetch(url, {method: "POST", mode: "no-cors", credentials: "include"})` from another
    site has no body and no Content-Type; the browser says where it comes from."""
    before = _runs(box)
    for path, key in (("/sdapi/v1/interrupt", USER_KEY), ("/sdapi/v1/refresh-loras", ADMIN_KEY),
                      ("/admin/reload", ADMIN_KEY)):
        answer = c.post(path, headers={**basic(key), "Sec-Fetch-Site": site, "Origin": "https://evil.example"})
        assert answer.status_code == 403, (path, answer.text)
        assert f"Sec-Fetch-Site: {site}" in answer.text
    assert _runs(box) == before
    assert c.get("/sdapi/v1/options", headers={**basic(USER_KEY), "Sec-Fetch-Site": site}).status_code == 200


# ---- 3. DNS rebinding ------------------------------------------------------------------------
def test_a_host_outside_the_allowed_names_is_refused(box: LiveServer, c: httpx.Client) -> None:
    port = box.url.rsplit(":", 1)[1]
    evil = {"Host": f"evil.example:{port}"}
    answer = c.get("/sd/models-sdxl", headers=evil)
    assert answer.status_code == 400 and "CRAFTSERVE_ALLOWED_HOSTS" in answer.json()["detail"]
    a1111 = c.get("/sdapi/v1/options", headers={**evil, **basic(USER_KEY)})
    assert a1111.status_code == 400 and a1111.json()["error"] == "HostNotAllowed"
    openai = c.get("/v1/models", headers={**evil, **bearer(USER_KEY)})
    assert openai.status_code == 400 and openai.json()["error"]["code"] == "host_not_allowed"
    refused = c.post("/sdapi/v1/interrupt", json={}, headers={**evil, **basic(USER_KEY)})
    assert refused.status_code == 400
    assert c.get("/health", headers=evil).status_code == 200  # health checks call by address
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert c.get("/sd/models-sdxl", headers={"Host": name}).status_code == 200, name


def test_allowed_host_rules() -> None:
    assert allowed_hosts([], "127.0.0.1") == LOOPBACK_NAMES
    assert allowed_hosts([], "::1") == LOOPBACK_NAMES and allowed_hosts([], "localhost") == LOOPBACK_NAMES
    assert allowed_hosts([], "0.0.0.0") is None and allowed_hosts([], "192.168.1.5") is None
    assert allowed_hosts(["*"], "127.0.0.1") is None
    assert allowed_hosts(["img.example"], "0.0.0.0") == ("img.example",)
    assert host_name("[::1]:8000") == "::1" and host_name("Img.Example.:443") == "img.example"
    settings = Settings(allowed_hosts="Img.Example:8000, [::1], *.lan")
    assert settings.allowed_hosts == ["img.example", "::1", "*.lan"]


# ---- 4. who the client is --------------------------------------------------------------------
def test_proxy_headers_are_believed_only_from_trusted_proxies() -> None:
    assert proxy_options(Settings()) == {"proxy_headers": False, "forwarded_allow_ips": ""}
    trusted = proxy_options(Settings(trusted_proxies="10.0.0.5, 10.1.0.0/16"))
    assert trusted == {"proxy_headers": True, "forwarded_allow_ips": ["10.0.0.5", "10.1.0.0/16"]}
    with pytest.raises(ValueError, match="not an IP address or network"):
        Settings(trusted_proxies="proxy.internal")


def test_a_throttled_address_keeps_its_known_keys() -> None:
    failures = AuthFailures(3, max_remembered=2)
    known, other = b"k" * 32, b"o" * 32
    failures.succeeded("10.0.0.1", known)
    for _ in range(3):
        failures.record("10.0.0.1")
    failures.check("10.0.0.1", known)  # passes
    for token in (other, None):
        with pytest.raises(RateLimited):
            failures.check("10.0.0.1", token)
    failures.check("10.0.0.2", other)  # other addresses are untouched
    failures.succeeded("10.0.0.3", other)
    failures.succeeded("10.0.0.4", other)  # past max_remembered: the oldest pair is forgotten
    with pytest.raises(RateLimited):
        failures.check("10.0.0.1", known)


PLAIN_MODELS = "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl}\n"  # nothing to load: ready at once


def _spoofed_bad_keys(url: str, count: int, *, forwarded: str | None = None) -> list[int]:
    statuses = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(count):
            headers = {**basic(f"guess-{i:04d}"),
                       "X-Forwarded-For": forwarded or f"198.51.{i // 250}.{i % 250 + 1}"}
            statuses.append(c.get("/sdapi/v1/options", headers=headers).status_code)
    return statuses


def _status(url: str, key: str, forwarded: str | None = None) -> int:
    headers = basic(key) if forwarded is None else {**basic(key), "X-Forwarded-For": forwarded}
    return httpx.get(url + "/sdapi/v1/options", headers=headers, timeout=30).status_code


def test_forwarded_addresses_are_ignored_by_default(tmp_path: Path) -> None:
    """`craftserve serve` without TRUSTED_PROXIES: 35 wrong keys, each claiming another
    address in X-Forwarded-For, come from one address (127.0.0.1) and are throttled after 30.
    A key that worked from that address before keeps working (users behind one proxy); any
    other token from it, a valid key never used there included, gets 429 without being
    checked, so the answer never tells a guess that is right from one that is wrong."""
    models = write_models_file(tmp_path, PLAIN_MODELS)
    proc, url = serve_process(models, f"{USER_KEY},{OTHER_KEY}")
    try:
        assert _status(url, USER_KEY) == 200
        statuses = _spoofed_bad_keys(url, 35)
        assert statuses[:30] == [401] * 30 and statuses[30:] == [429] * 5, statuses
        assert _status(url, USER_KEY) == 200
        assert _status(url, USER_KEY, forwarded="203.0.113.9") == 200
        assert _status(url, "guess-9999") == 429
        assert _status(url, OTHER_KEY) == 429  # never seen from this address: not even checked
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_forwarded_addresses_from_a_trusted_proxy(tmp_path: Path) -> None:
    """TRUSTED_PROXIES=127.0.0.1: the address the proxy forwards is the client. 35 wrong keys
    from 35 forwarded addresses are 35 addresses' first failures; 35 from one forwarded
    address are throttled there only, and a valid key used from that address goes on."""
    models = write_models_file(tmp_path, PLAIN_MODELS)
    proc, url = serve_process(models, f"{USER_KEY},{OTHER_KEY}", trusted_proxies="127.0.0.1")
    try:
        assert _spoofed_bad_keys(url, 35) == [401] * 35
        office = "203.0.113.7"
        assert _status(url, USER_KEY, forwarded=office) == 200
        statuses = _spoofed_bad_keys(url, 32, forwarded=office)
        assert statuses[:30] == [401] * 30 and statuses[30:] == [429] * 2, statuses
        assert _status(url, USER_KEY, forwarded=office) == 200  # the colleague's key goes on
        assert _status(url, OTHER_KEY, forwarded="203.0.113.8") == 200  # another address
        assert _status(url, "guess-x", forwarded="203.0.113.8") == 401
        # the proxy's chain: the client is the last address before the trusted proxies
        assert _status(url, OTHER_KEY, forwarded=f"198.51.100.1, {office}") == 429
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
