"""The OpenAPI document tells the truth: schemathesis generates requests for every route from
/openapi.json and checks each answer against the document (status, content type, body schema)
and that none is a server error.

Bodies are kept small through a hook (sizes, steps and image counts capped, the test key put
where a key goes), so generation runs in milliseconds on the tiny model; everything else
schemathesis generates (wrong types, missing fields, odd strings, unknown names) goes as it is.
"""

from __future__ import annotations

import re

import pytest

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
