"""The OpenAPI document, completed so that it tells the truth about every error answer.

Each router documents its own answers (the statuses only its routes give, in its dialect's
error shape). What holds for every route is added here, in the shape of the dialect the path
belongs to (the same prefixes app.api.errors renders by):

- the limits at the edge (app.api.edge): 414 and 431 on every route, 413 and 408 on every
  route that takes a body;
- 400 on every route (a Host header outside ALLOWED_HOSTS), and 403 and 415 on every route
  that changes state (a browser's cross-site request, a content type a web form can send;
  app.api.guards);
- 429 on every route that checks a key (an address past its failed key checks);
- 500 on every route (a bug: logged, answered without a traceback);
- 422 in the dialect's real shape where FastAPI would document its own `detail: [...]` array,
  which no craftserve route ever answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.guards import CHANGES_STATE

# path prefix → the error schema its answers use (longest prefix first; the rest: VisionCraft)
_DIALECT_SCHEMAS = (("/sdapi/", "A1111Error"), ("/v1/", "OpenAIError"))
_DEFAULT_SCHEMA = "ErrorBody"
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"

_EDGE = {
    408: "the request body did not arrive within BODY_TIMEOUT_S",
    413: "the request body is larger than MAX_BODY_BYTES (answered before it is parsed)",
}
_ALWAYS = {
    414: "the URL is longer than MAX_URL_BYTES",
    431: "the request headers are larger than MAX_HEADER_BYTES",
    500: "a bug: logged with its traceback, answered without one; the server goes on",
}
_HOST = "the Host header is not one of ALLOWED_HOSTS (DNS rebinding)"
_CHANGES_STATE = {
    403: "sent by a browser from another site (`Sec-Fetch-Site`), or the key is missing, wrong or "
         "lacks a role the route needs",
    415: "a body not sent as `Content-Type: application/json`, or a content type a web form can send",
}
_THROTTLED = "the client address is past AUTH_FAILURES_PER_MINUTE failed key checks (`Retry-After`)"


def _schema_for(path: str) -> str:
    for prefix, schema in _DIALECT_SCHEMAS:
        if path.startswith(prefix):
            return schema
    return _DEFAULT_SCHEMA


def _error(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _complete(doc: dict[str, Any]) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in doc.get("paths", {}).items():
        schema = _schema_for(path)
        if schema not in schemas:  # pragma: no cover - every dialect's router references it
            schema = _DEFAULT_SCHEMA
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            wanted = {**_ALWAYS, 400: _HOST}
            if method.upper() in CHANGES_STATE:
                wanted.update(_CHANGES_STATE)
            if "requestBody" in operation:
                wanted.update(_EDGE)
            if {"401", "403"} & responses.keys():
                wanted[429] = _THROTTLED
            for status, description in wanted.items():
                responses.setdefault(str(status), _error(schema, description))
            unprocessable = responses.get("422")
            if unprocessable is not None:
                content = unprocessable.get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref") == _FASTAPI_422:
                    content["schema"] = {"$ref": f"#/components/schemas/{schema}"}
    text = str(doc.get("paths"))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}'" not in text:
            schemas.pop(unused, None)
    return doc


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (and in /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            ))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
