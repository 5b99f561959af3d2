"""Limits at the edge, before any route parses anything (an ASGI middleware).

- URL longer than `max_url_bytes` → 414; request headers over `max_header_bytes` in all → 431.
- Body: a `Content-Length` over the route's cap → 413 at once, without reading the body; a
  body without one (chunked) is read up to the cap and answered 413 as soon as it passes it.
  The cap is `max_body_bytes` (setting MAX_BODY_BYTES, 2 MiB) unless a route prefix has its
  own (`route_caps`): the routes that take images (IMAGE_ROUTES) have the cap
  app.image_inputs.image_body_cap derives from the image settings (MAX_IMAGE_BODY_BYTES).
- The whole body must arrive within `body_timeout_s`; a body that never ends (a chunked body
  without its last chunk, a Content-Length that lies) is answered 408 then.

The body is read here once and handed to the route as it came, so the route's own reading
and its watching for a client disconnect (app.api.generation) work unchanged. Answers are in
the shape of the dialect of the path (app.api.errors).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request

from app.api.errors import ErrorInfo
from app.errors import CraftError, ErrorKind, PayloadTooLarge, RequestTimeout, TooLarge

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Path prefixes of the routes whose bodies carry images (base64 in JSON, files in multipart
# forms): VisionCraft's img2img and upscale, A1111's img2img, extras, png-info and interrogate,
# OpenAI's edits and variations, the job API.
IMAGE_ROUTES = (
    "/img2img", "/upscale",
    # txt2img and generations carry ControlNet units' pictures
    "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image",
    "/sdapi/v1/extra-batch-images", "/sdapi/v1/png-info", "/sdapi/v1/interrogate",
    "/controlnet/detect",
    "/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
    "/jobs",
)
IMAGE_BODY_SETTING = "CRAFTSERVE_MAX_IMAGE_BODY_BYTES"


def image_route_caps(cap: int) -> dict[str, int]:
    """`route_caps` giving every image route (IMAGE_ROUTES) the body cap `cap`."""
    return dict.fromkeys(IMAGE_ROUTES, cap)


class EdgeLimits:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        max_url_bytes: int,
        max_header_bytes: int,
        route_caps: Mapping[str, int] | None = None,
        route_caps_setting: str = IMAGE_BODY_SETTING,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes
        self.route_caps = dict(route_caps or {})
        self.route_caps_setting = route_caps_setting  # named in the 413 of a route with its own cap

    def cap_for(self, path: str) -> int:
        return self._cap_and_setting(path)[0]

    def _cap_and_setting(self, path: str) -> tuple[int, str]:
        best = max((p for p in self.route_caps if path.startswith(p)), key=len, default=None)
        if best is None:
            return self.max_body_bytes, "CRAFTSERVE_MAX_BODY_BYTES"
        return self.route_caps[best], self.route_caps_setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_head(scope)
            body = await self._read_body(scope, receive)
        except CraftError as exc:
            await answer_at_edge(scope, exc, send)
            return
        if body is None:
            await self.app(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_head(self, scope: Scope) -> None:
        url = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
        if url > self.max_url_bytes:
            raise TooLarge(414, ErrorKind.URL_TOO_LONG,
                           f"the URL is {url} bytes long; at most {self.max_url_bytes} bytes are "
                           "accepted (setting CRAFTSERVE_MAX_URL_BYTES)")
        headers = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if headers > self.max_header_bytes:
            raise TooLarge(431, ErrorKind.HEADERS_TOO_LARGE,
                           f"the request headers are {headers} bytes in all; at most "
                           f"{self.max_header_bytes} bytes are accepted (setting "
                           "CRAFTSERVE_MAX_HEADER_BYTES)")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, read within the cap and the time limit; None when the request
        announces no body (GET, HEAD, ...) and may stream whatever it has to the route."""
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if length is None and not chunked:
            return None
        cap, setting = self._cap_and_setting(scope["path"])
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                announced = -1
            if announced > cap:
                raise PayloadTooLarge(announced, cap, setting=setting)
        try:
            return await asyncio.wait_for(self._collect(receive, cap, setting), self.body_timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.body_timeout_s:g} s (setting "
                "CRAFTSERVE_BODY_TIMEOUT_S); send the whole body at once"
            ) from None

    @staticmethod
    async def _collect(receive: Receive, cap: int, setting: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise PayloadTooLarge(size, cap, streamed=True, setting=setting)
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def answer_at_edge(scope: Scope, exc: CraftError, send: Send) -> None:
    """Answer `exc` from an ASGI middleware, before any route runs: counted in
    craftserve_errors_total, in the shape of the path's dialect, and closing the connection
    (the request's body may be unread)."""
    app = scope.get("app")
    state = getattr(app, "state", None)
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(exc.kind).inc()
    if isinstance(exc, _Gone):
        return  # nobody to answer
    renderers = getattr(state, "error_renderers", None)
    info = ErrorInfo(exc.status, exc.message, exc.kind, getattr(exc, "field", None),
                     {**exc.headers, "Connection": "close"})
    request = Request(scope)
    if renderers is None:  # pragma: no cover - the app always has them
        from app.api.errors import visioncraft_error

        response = visioncraft_error(request, info)
    else:
        response = renderers.render(request, info)
    await response(scope, _no_receive, send)


class _Gone(CraftError):
    status = 499
    kind = ErrorKind.DISCONNECTED

    def __init__(self) -> None:
        super().__init__("the client went away while sending its body")


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the real channel (for disconnect notices)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
