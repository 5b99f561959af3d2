"""Limits at the edge (bodies, URLs, headers, slow bodies), failed-key throttling per address,
and hashed keys at rest."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import sys
import time

import httpx
import pytest

from app.auth import Authenticator, hashed_entry, key_label
from app.errors import RateLimited, Unauthorized
from tests.conftest import API_KEY, body, png
from tests.live import ROOT

CAP = 64 * 1024


@pytest.fixture(scope="module")
def edge(make_server):
    return make_server(max_body_bytes=CAP, max_image_body_bytes=2 * CAP, body_timeout_s=1.5,
                       max_url_bytes=1024, max_header_bytes=4096, auth_failures_per_minute=5)


def _raw(server, request: bytes, *, read_timeout: float = 10.0) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_body_over_the_cap_is_413_before_parsing(edge):
    with edge.client() as c:
        big = {**body(), "prompt": "x" * (CAP + 10)}
        data = json.dumps(big).encode()
        answer = c.post("/sd", content=data, headers={"content-type": "application/json"})
        assert answer.status_code == 413
        size = len(data)
        assert answer.json()["detail"] == (
            f"the request body is {size} bytes; at most {CAP} bytes are accepted on this route "
            "(setting CRAFTSERVE_MAX_BODY_BYTES)")
        # the text-to-image routes take picture-sized bodies (ControlNet units): their own cap
        bigger = {**body(), "prompt": "x" * (2 * CAP + 10)}
        a1111 = c.post("/sdapi/v1/txt2img", json=bigger, auth=("u", API_KEY))
        assert a1111.status_code == 413 and "at most" in a1111.json()["detail"]
        assert a1111.json()["detail"].endswith("(setting CRAFTSERVE_MAX_IMAGE_BODY_BYTES)")
        openai = c.post("/v1/images/generations", json=bigger, headers={"Authorization": f"Bearer {API_KEY}"})
        assert openai.status_code == 413 and "at most" in openai.json()["error"]["message"]
        png(c.post("/sd", json=body()))  # the server goes on


def test_chunked_body_over_the_cap_is_413(edge):
    with edge.client() as c:
        def chunks():
            for _ in range(CAP // 4096 + 2):
                yield b"x" * 4096

        answer = c.post("/sd", content=chunks(), headers={"content-type": "application/json"})
        assert answer.status_code == 413
        assert "passed 65536 bytes while being sent" in answer.json()["detail"]
        png(c.post("/sd", json=body()))


def test_body_that_never_ends_times_out(edge):
    started = time.monotonic()
    raw = _raw(edge, b"POST /sd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
    assert _status(raw) == 408
    assert time.monotonic() - started < 10
    raw = _raw(edge, b"POST /sd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"a\": 1")
    assert _status(raw) == 408
    with edge.client() as c:
        png(c.post("/sd", json=body()))


def test_long_url_and_big_headers(edge):
    with edge.client() as c:
        assert c.get("/sd/models-sdxl?" + "a" * 2000).status_code == 414
        answer = c.get("/sd/models-sdxl", headers={"x-junk": "a" * 5000})
        assert answer.status_code == 431
        assert "CRAFTSERVE_MAX_HEADER_BYTES" in answer.json()["detail"]
        assert c.get("/sd/models-sdxl").status_code == 200


def test_failed_keys_throttle_one_address_only(make_server):
    # API_KEY has been used from 127.0.0.1 (the server's readiness poll); FRESH has not
    fresh = "a-key-never-used-from-here"
    server = make_server(auth_failures_per_minute=3, api_keys=[API_KEY, fresh])
    port = server.url.rsplit(":", 1)[1]
    other = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60)
    with server.client() as c, other:
        for _ in range(3):
            assert c.post("/sd", json=body(token="wrong")).status_code == 403
        # a token not seen valid from this address is refused unchecked, a right one too
        refused = c.post("/sd", json=body(token=fresh))
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert "failed API key attempts from this address" in refused.json()["detail"]
        png(other.post("/sd", json=body(token=fresh)))  # another address with a valid key: served
        png(c.post("/sd", json=body()))  # a key that succeeded from here before: served


def test_hashed_keys_authenticate_and_share_the_label():
    line = hashed_entry("s3cret-key")
    assert line == "sha256:" + hashlib.sha256(b"s3cret-key").hexdigest()
    auth = Authenticator([line + "  5/60s", "plain-key"])
    assert auth.authenticate("s3cret-key") == key_label("s3cret-key") == key_label(line)
    assert auth.authenticate("plain-key") == key_label("plain-key")
    with pytest.raises(Unauthorized):
        auth.authenticate(line)  # the hash itself is not a key
    for _ in range(5):
        auth.admit(key_label("s3cret-key"))
    with pytest.raises(RateLimited):  # its own limit applies to the hashed entry
        auth.admit(key_label("s3cret-key"))


def test_hash_key_command():
    run = [sys.executable, "-m", "app.cli", "hash-key"]
    out = subprocess.run(run + ["abc"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    piped = subprocess.run(run, input="abc\n", cwd=ROOT, capture_output=True, text=True, check=True)
    assert piped.stdout == out.stdout
    new = subprocess.run(run + ["--new"], cwd=ROOT, capture_output=True, text=True, check=True)
    key_line, hash_line = new.stdout.splitlines()
    key = key_line.rsplit(" ", 1)[1]
    assert hash_line == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert subprocess.run(run + [hash_line], cwd=ROOT, capture_output=True).returncode == 2


def test_prompts_are_logged_only_when_asked(make_server, caplog):
    prompt = "a very particular purple giraffe 4471"
    quiet = make_server()
    loud = make_server(log_prompts=True)
    with caplog.at_level(logging.INFO, logger="app"):
        for server in (quiet, loud):
            with server.client() as c:
                png(c.post("/sd", json=body(prompt=prompt, seed=int(server is loud))))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert len(lines) == 2
    assert [prompt in line for line in lines] == [False, True]


def test_idle_connections_are_closed_and_never_block_a_fresh_client(make_server):
    """Connections that never send a request are closed after IDLE_TIMEOUT_S (uvicorn alone
    keeps them for ever); while they are open a fresh client is served."""
    server = make_server(idle_timeout_s=1.0)
    host, port = server.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
    try:
        with server.client() as c:
            png(c.post("/sd", json=body()))
        deadline = time.monotonic() + 30
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert sock.recv(1) == b""  # closed by the server, not by us
    finally:
        for sock in idle:
            sock.close()
