"""JSON bodies of the image routes joined and parsed off the event loop.

FastAPI parses a JSON body with `json.loads` on the event loop, after Starlette joins its
pieces there. A body with a picture is megabytes of base64 (a 1024x1024 PNG: 3 to 4 MB): 10 to
20 ms of joining and parsing that hold up every other request and event stream meanwhile, and
several bodies arriving together hold it up for the sum. The image routes (`ImageRoute`) read a
body past `OFF_LOOP_BYTES` themselves, join and parse it on the decoding thread
(app.image_inputs.off_loop: one at a time there, the event loop free between), and leave the
results in the request's own caches (Starlette's `_body` and `_json`, which `body()` and
`json()` return when set), so FastAPI and every handler of the request see the same body. A
body that does not parse is left to FastAPI, which answers it as it always does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.image_inputs import off_loop

OFF_LOOP_BYTES = 256 * 1024  # smaller bodies join and parse in well under a millisecond


def _is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def read_off_loop(request: Request) -> None:
    """Read a JSON body past OFF_LOOP_BYTES into the request's caches, off the event loop."""
    if hasattr(request, "_body") or not _is_json(request):
        return
    chunks = [chunk async for chunk in request.stream()]
    size = sum(map(len, chunks))
    body = b"".join(chunks) if size < OFF_LOOP_BYTES else await off_loop(b"".join, chunks)
    request._body = body
    if size >= OFF_LOOP_BYTES:
        with contextlib.suppress(ValueError, RecursionError):  # FastAPI parses it again, answers it
            request._json = await off_loop(json.loads, body)


class ImageRoute(APIRoute):
    """The route class of routers whose bodies may carry pictures."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            await read_off_loop(request)
            return await handler(request)

        return route
