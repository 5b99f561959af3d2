"""A1111's error shape (`{"error", "detail", "body", "errors"}`) and the error answers each
/sdapi/v1 route documents."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.api.a1111.models import A1111Error
from app.api.errors import ErrorInfo
from app.errors import ErrorKind


def _class_name(kind: ErrorKind) -> str:
    """A1111's `error` field, a class name: interrupted → Interrupted, not_served → NotServed."""
    return "".join(part.capitalize() for part in kind.split("_")) or "Error"


def render_error(request: Request, info: ErrorInfo) -> Response:
    """Every error under /sdapi/ in A1111's shape: `error` (the class), `detail` (the message),
    `body`, and `errors` (the message, or the validation details). A 401 carries the Basic
    challenge clients answer with their configured user and password."""
    validation = info.errors is not None
    body = {
        "error": "RequestValidationError" if validation else _class_name(info.kind),
        "detail": info.message,
        "body": "",
        "errors": info.errors if validation else info.message,
    }
    headers = dict(info.headers)
    if info.status == 401:
        headers.setdefault("WWW-Authenticate", "Basic")
    return JSONResponse(body, status_code=info.status, headers=headers)


def _error(description: str) -> dict:
    return {"model": A1111Error, "description": description}


AUTH_ERRORS = {401: _error("missing or wrong API key (`WWW-Authenticate: Basic`)")}
ADMIN_ERRORS = {
    **AUTH_ERRORS,
    403: _error("`NotAdmin`: the key is valid but lacks the `admin` role (keys file: `KEY  admin`)"),
}
INPUT_ERRORS = {
    **AUTH_ERRORS,
    422: _error("a field out of range or of the wrong type, malformed JSON, an unknown model, "
                "sampler, scheduler or LoRA, a `<lora:...>` tag without a numeric weight; the "
                "message names the field and the value"),
}
GENERATION_ERRORS = {
    **INPUT_ERRORS,
    409: _error("`Interrupted`: POST /sdapi/v1/interrupt or skip with the same key stopped it"),
    500: _error("a bug; the server log has it under the job id"),
    429: _error("the key is past its rate limit, or `KeyQueueFull`: it has its whole share of the "
                "queue waiting (`CRAFTSERVE_MAX_QUEUE_PER_KEY`); with `Retry-After`"),
    503: _error("the queue is full, a job outlived its queue deadline, the model cannot be served "
                "now, out of memory, or the server is shutting down (with `Retry-After`)"),
}
REFRESH_FAILED = _error("`RefreshFailed`: the models file is no longer valid; nothing changed")
