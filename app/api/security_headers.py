"""Headers every answer carries, set in one place (an ASGI middleware outside all others, so
error answers of every layer get them too):

- `X-Content-Type-Options: nosniff` on every answer: a browser never reads an answer as
  another type than it says (a JSON error echoing a prompt is never run as HTML or script).
- On HTML (the page at /, /docs): a `Content-Security-Policy` that lets the page load scripts,
  styles and connections from this server only (images also from `data:` and `blob:`, which
  the page's previews and results use), none of it inline; `frame-ancestors 'none'` and
  `X-Frame-Options: DENY` (no other site frames the page where the key is typed);
  `Referrer-Policy: no-referrer`.
- `Cache-Control: private, no-store` on every answer but the files under /static: images,
  generation answers, job states and events, /ready, listings, errors. They are one caller's
  data; no shared cache may keep them and no browser needs to write them to disk. The files
  under /static (the page's scripts and styles, Swagger UI) set their own (app.api.page).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NO_STORE = "private, no-store"
STATIC = "/static/"  # the files that may be cached: they set their own Cache-Control


def content_security_policy(public_url: str | None = None) -> str:
    """The policy of the HTML pages. With a public URL on another origin, the page may also
    connect there (the job API's URLs in answers start with it)."""
    connect = "'self'"
    if public_url:
        parts = urlsplit(public_url)
        connect += f" {parts.scheme}://{parts.netloc}"
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        f"connect-src {connect}",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ])


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, public_url: str | None = None) -> None:
        self.app = app
        self.policy = content_security_policy(public_url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(STATIC)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if not (static and "cache-control" in headers):
                    headers["Cache-Control"] = NO_STORE
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = self.policy
                    headers["X-Frame-Options"] = "DENY"
                    headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)
