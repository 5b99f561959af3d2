"""JSON bodies of the image routes parsed off the event loop.

FastAPI parses a JSON body with `json.loads` on the event loop. A body with a picture is
megabytes of base64 (a 1024x1024 PNG: 3 to 4 MB), 10 to 20 ms of parsing that holds up every
other request and event stream meanwhile, and several arriving together hold it up for the sum.
The image routes' requests join and parse a body past `OFF_LOOP_BYTES` on the decoding thread
(app.image_inputs.off_loop) instead: one at a time there, the event loop free between.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.image_inputs import off_loop

OFF_LOOP_BYTES = 256 * 1024  # smaller bodies parse in well under a millisecond: on the loop


class OffLoopJSONRequest(Request):
    async def body(self) -> bytes:
        """The body's chunks joined, off the loop when they are many megabytes (a fresh
        allocation that size costs milliseconds in page faults alone)."""
        if not hasattr(self, "_body"):
            chunks = [chunk async for chunk in self.stream()]
            if len(chunks) == 1:
                self._body = chunks[0]
            elif sum(map(len, chunks)) < OFF_LOOP_BYTES:
                self._body = b"".join(chunks)
            else:
                self._body = await off_loop(b"".join, chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = json.loads(body) if len(body) < OFF_LOOP_BYTES else await off_loop(json.loads, body)
        return self._json


class ImageRoute(APIRoute):
    """The route class of routers whose bodies may carry pictures."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return route
