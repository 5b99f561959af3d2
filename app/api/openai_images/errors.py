"""OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) for every error
under /v1/."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.api.errors import ErrorInfo
from app.errors import ErrorKind

_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {
    ErrorKind.MODEL_NOT_FOUND: "model_not_found",
    ErrorKind.UNAUTHORIZED: "invalid_api_key",
    ErrorKind.FORBIDDEN: "invalid_api_key",
    ErrorKind.RATE_LIMITED: "rate_limit_exceeded",
    ErrorKind.INVALID_PARAMETER: "invalid_value",
    ErrorKind.NOT_SERVED: "invalid_value",
    ErrorKind.INVALID_LORA: "invalid_value",
}
# 5xx a retry of the same request cannot fix: a bug, a model that failed to load (retried by the
# server after CRAFTSERVE_LOAD_RETRY_S), memory exhausted after the server's own retries.
_NO_RETRY_KINDS = {ErrorKind.INTERNAL, ErrorKind.MODEL_UNAVAILABLE, ErrorKind.OUT_OF_MEMORY}
_PARAMS = {"lora": "loras", "body": None}


def _code(info: ErrorInfo) -> str | None:
    if info.errors:
        first = info.errors[0].get("type")
        if first == "missing":
            return "missing_required_parameter"
        if first == "json_invalid":
            return "invalid_json"
    return _CODES.get(info.kind, info.kind)


def render_error(request: Request, info: ErrorInfo) -> Response:
    """Every error under /v1/ in OpenAI's shape. Validation errors answer 400 as OpenAI does
    (the SDK raises BadRequestError); answers a retry cannot fix carry `x-should-retry: false`
    (the SDK otherwise retries every 5xx twice)."""
    status = 400 if info.status == 422 else info.status
    kind = "server_error" if status >= 500 else _TYPES.get(status, "invalid_request_error")
    param = _PARAMS.get(info.field, info.field) if info.field else None
    body = {"error": {"message": info.message, "type": kind, "param": param, "code": _code(info)}}
    headers = dict(info.headers)
    retryable = status in (408, 409, 429) or (status >= 500 and info.kind not in _NO_RETRY_KINDS)
    if not retryable:
        headers["x-should-retry"] = "false"
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(body, status_code=status, headers=headers)


