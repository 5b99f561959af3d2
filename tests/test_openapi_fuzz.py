"""The OpenAPI document tells the truth: schemathesis generates requests for every route from
/openapi.json and checks each answer against the document (status, content type, body schema)
and that none is a server error.

Bodies are kept small through a hook (sizes, steps and image counts capped, the test key put
where a key goes), so generation runs in milliseconds on the tiny model; everything else
schemathesis generates (wrong types, missing fields, odd strings, unknown names) goes as it is.
"""

from __future__ import annotations

import re
import socket

import httpx
import pytest

pytestmark = pytest.mark.fuzz

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import API_KEY  # noqa: E402

MODELS = """
models:
  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}
  tiny-sd15: {source: builtin:tiny-sd15}
"""
_SMALL = {"steps": 2, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "n": 1,
          "image_count": 1}
_SIZE = re.compile(r"^\d+x\d+$")


def _small_body(context, body):  # noqa: ANN001 - schemathesis' hook signature
    if not isinstance(body, dict):
        return body
    for key, cap in _SMALL.items():
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
            body[key] = cap
    operation = getattr(context, "operation", None)
    if "prompt" in body or "txt2img" in getattr(operation, "path", ""):
        # a generation body: small defaults instead of 512²-1024² and 30-50 steps
        for key in ("steps", "width", "height"):
            body.setdefault(key, _SMALL[key])
        body.setdefault("size", "64x64")
    if isinstance(body.get("size"), str) and _SIZE.match(body["size"]):
        body["size"] = "64x64"
    if "token" in body:
        body["token"] = API_KEY
    if isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
        body["model"] = "tiny-sdxl"  # half the time a served model, so generation runs too
    body.pop("enable_hr", None)
    return body


@pytest.fixture(scope="module")
def api_schema(make_server):
    server = make_server(MODELS, queue_deadline_s=60)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.hook("map_body")(_small_body)
    return schema


def test_every_route_answers_as_documented(api_schema):
    """Each operation of the document, its own generated cases; every failure is collected
    (operation, the check's message and the request to replay it) before the test fails."""
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 40
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def run(case):  # noqa: ANN001
            case.call_and_validate(
                headers={"Authorization": f"Bearer {API_KEY}"},
                checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                        response_schema_conformance],
                timeout=120,
            )

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected, reported below
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)


# ---- the bad input, by hand ------------------------------------------------------------
_GENERATION_ROUTES = ("/sd", "/sdapi/v1/txt2img", "/v1/images/generations")


def _by_hand() -> dict[str, bytes]:
    good = b'"token": "' + API_KEY.encode() + b'", "model": "tiny-sdxl", "prompt": "x"'
    return {
        "10,000 nested objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        "10,000 nested arrays": b"[" * 10_000 + b"]" * 10_000,
        "invalid UTF-8": b"{" + good + b', "negative_prompt": "\xff\xfe"}',
        "NaN literal": b"{" + good + b', "cfg_scale": NaN}',
        "Infinity literal": b"{" + good + b', "steps": Infinity}',
        "1 MB prompt": b'{"token": "' + API_KEY.encode() + b'", "model": "tiny-sdxl", "prompt": "'
                       + b"x" * 1_000_000 + b'"}',
        "not JSON at all": b"\x00\x01 garbage",
    }


@pytest.mark.parametrize("case", list(_by_hand()))
def test_bad_bodies_get_documented_answers(api_schema, make_server, case):
    """Each is refused with a status the document lists for the route, in the route's error
    shape, naming the body; nothing is echoed back."""
    doc = api_schema.raw_schema
    url = api_schema.get_base_url()
    data = _by_hand()[case]
    with httpx.Client(base_url=url, timeout=60) as c:
        for path in _GENERATION_ROUTES:
            answer = c.post(path, content=data, headers={"content-type": "application/json",
                                                          "Authorization": f"Bearer {API_KEY}"})
            documented = doc["paths"][path]["post"]["responses"]
            assert str(answer.status_code) in documented, (case, path, answer.status_code)
            assert answer.status_code in (400, 413, 422), (case, path, answer.text[:300])
            assert answer.headers["content-type"] == "application/json"
            assert len(answer.content) < 4000  # the body is never echoed
            assert API_KEY not in answer.text


def test_duplicate_keys_take_the_last_value(api_schema):
    """As Python's and most JSON parsers do (RFC 8259 leaves it open): the last `steps` counts."""
    body = (f'{{"token": "{API_KEY}", "model": "tiny-sdxl", "prompt": "x", "width": 64, '
            '"height": 64, "steps": 2, "steps": 31}').encode()
    with httpx.Client(base_url=api_schema.get_base_url(), timeout=60) as c:
        answer = c.post("/sd", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "steps 31" in answer.json()["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_content_type_lies(api_schema, content_type):
    body = f'{{"token": "{API_KEY}", "model": "tiny-sdxl", "prompt": "x"}}'.encode()
    with httpx.Client(base_url=api_schema.get_base_url(), timeout=60) as c:
        answer = c.post("/sd", content=body, headers={"content-type": content_type})
    assert answer.status_code == 415  # a type a web form can send: never read (app.api.guards)
    assert "Content-Type: application/json" in answer.json()["detail"]
    assert API_KEY not in answer.text


def test_hundred_megabyte_body_is_refused_before_it_is_read(api_schema):
    host, port = api_schema.get_base_url().removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /sd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 104857600\r\n\r\n" + b"{" * 65536)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
