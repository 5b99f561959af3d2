"""Error answers in each dialect's shape: one error, one status, rendered by the dialect.

Every deliberate error (app.errors.CraftError), every body that fails validation and every
HTTP error (unknown route, ...) becomes an `ErrorInfo`; the renderer registered for the
request's path prefix (`/sdapi/` A1111, `/v1/` OpenAI) turns it into a response, and the
VisionCraft shape serves every other path. Whatever an error quotes, its answer can be encoded:
text that is not valid Unicode (a lone surrogate from a JSON `\\ud800` escape) is escaped
before any renderer sees it, never answered as a 500 from the JSON encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.errors import ErrorKind


@dataclasses.dataclass(frozen=True)
class ErrorInfo:
    status: int
    message: str  # one readable sentence (or several, "; "-joined) naming field, value and rule
    kind: ErrorKind  # the label of craftserve_errors_total
    field: str | None = None  # the request field at fault, when there is one
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: list[dict] | None = None  # validation details: [{loc, msg, type}]


Renderer = Callable[[Request, ErrorInfo], Response]


def encodable(value: Any) -> Any:
    """`value` (text, or lists and dicts of it) with every lone surrogate written as its escape
    (`\\ud800`), so that UTF-8 can encode it; anything else as it is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, list | tuple):
        return [encodable(v) for v in value]
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    return value


def _encodable_info(info: ErrorInfo) -> ErrorInfo:
    return dataclasses.replace(
        info, message=encodable(info.message), field=encodable(info.field),
        errors=None if info.errors is None else encodable(info.errors))


def visioncraft_message(info: ErrorInfo) -> str:
    """The message as the published VisionCraft wrapper (1.0.8) needs it. The wrapper takes
    any 422 as an invalid parameter and names it by the word after "doesn't have"; a 422
    without that phrase crashes it (IndexError). craftserve's own 422 messages all carry it;
    one raised elsewhere without it (e.g. a LoRA file that cannot be used) gets it appended,
    naming the field at fault when the error knows it."""
    if info.status == 422 and "doesn't have" not in info.message:
        field = info.field or "body"
        return f"{info.message} (this server doesn't have {field} as sent)"
    return info.message


def visioncraft_error(request: Request, info: ErrorInfo) -> Response:
    """`detail` (a string) as craftserve always answered, plus `error.message` with the same
    text, which the published VisionCraft wrapper reads first (visioncraft.models.ErrorBody).
    A missing or wrong key is 403, as the VisionCraft service answers it (the wrapper's
    InvalidAPIKey); it carries no challenge."""
    message = visioncraft_message(info)
    body: dict = {"detail": message, "error": {"message": message}}
    if info.errors is not None:
        body["errors"] = info.errors
    status = 403 if info.kind == ErrorKind.UNAUTHORIZED else info.status
    headers = {k: v for k, v in info.headers.items() if k.lower() != "www-authenticate"}
    return JSONResponse(body, status_code=status, headers=headers)


class ErrorRenderers:
    """Path prefix → renderer; the VisionCraft shape when no prefix matches."""

    def __init__(self) -> None:
        self._by_prefix: list[tuple[str, Renderer]] = []

    def register(self, prefix: str, renderer: Renderer) -> None:
        self._by_prefix.append((prefix, renderer))
        self._by_prefix.sort(key=lambda item: -len(item[0]))  # the longest prefix wins

    def render(self, request: Request, info: ErrorInfo) -> Response:
        info = _encodable_info(info)
        path = request.url.path
        for prefix, renderer in self._by_prefix:
            if path.startswith(prefix):
                return renderer(request, info)
        return visioncraft_error(request, info)
