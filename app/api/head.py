"""HEAD on every GET route (RFC 9110: a server that answers GET answers HEAD).

FastAPI registers a route for the methods it names, so HEAD got 405 everywhere. This ASGI
middleware, outside every other, runs a HEAD request as GET and sends the answer's status and
headers (Content-Length included: the length a GET would get) without its body. A streamed
answer (the job API's events) ends with its headers: the request is then told its client went
away, so the stream stops. A route without GET answers HEAD as it answers GET: 405.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def receive_until_answered() -> Message:
            if ended:
                return {"type": "http.disconnect"}
            return await receive()

        async def send_headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] != "http.response.body":
                await send(message)
            elif not ended:
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        # a copy: the server's own scope stays HEAD (it sends no body for it either)
        await self.app({**scope, "method": "GET"}, receive_until_answered, send_headers_only)
