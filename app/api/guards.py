"""What a browser must not be made to do: checks on every request before any route runs (an
ASGI middleware), answered in the shape of the path's dialect (app.api.errors).

- **Host** (DNS rebinding): a page on `evil.example` whose name the attacker then points at
  127.0.0.1 talks to a local server as if it were its own origin. The Host header it sends
  is `evil.example`, so only the names in CRAFTSERVE_ALLOWED_HOSTS are answered (400
  otherwise). Unset, that is the loopback names when the server is bound to a loopback
  address (the desktop case, where the attack works) and any name otherwise (a server on
  the network, whose names the operator knows and may list). `GET /health` and `/ready` are
  answered whatever the Host, for health checks that call the server by its address.
- **Cross-site requests** (CSRF): a web page may make a browser send a POST anywhere without
  asking the server first, if its Content-Type is one an HTML form can send
  (`application/x-www-form-urlencoded`, `multipart/form-data`, `text/plain`) or it has no
  body, and the browser adds the credentials it holds for the server (HTTP Basic, which A1111
  clients' 401 challenge makes it keep). So every request that changes state (POST, PUT,
  PATCH, DELETE):
  - with a body, must send it as `Content-Type: application/json` (or `+json`), which a
    browser sends across sites only after a CORS preflight that craftserve never grants (415
    otherwise);
  - without one, must not send a form's content type either (415);
  - is refused (403) when the browser says it comes from another site
    (`Sec-Fetch-Site: cross-site` or `same-site`, sent by every current browser), which also
    covers a body-less `fetch` with no Content-Type.
  Programs (curl, webuiapi, the OpenAI SDK, the VisionCraft wrapper) send JSON or nothing,
  and no Sec-Fetch-Site; the page at / sends JSON from the server's own origin.
- **One exception, multipart uploads of OpenAI's image routes** (`MULTIPART_ROUTES`:
  `POST /v1/images/edits` and `/v1/images/variations`, which OpenAI defines as
  `multipart/form-data` only): a multipart body passes there when the request carries
  `Authorization: Bearer <something>`. A browser never adds a Bearer header by itself (the
  credentials it keeps and sends on its own are HTTP Basic and cookies), and a page that sets
  one makes the request non-simple, so it goes out only after a CORS preflight that craftserve
  never grants. A cross-site form post therefore still arrives without one and is refused as
  before; the Sec-Fetch-Site check above applies to these routes too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from app.api.credentials import has_bearer
from app.api.edge import ASGIApp, Receive, Scope, Send, answer_at_edge
from app.errors import ErrorKind, RequestRefused

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# answered whatever the Host: health checks (Docker, Kubernetes) call the server by its address,
# and these tell a page nothing the public discovery routes do not
PROBES = frozenset({"/health", "/ready"})
CHANGES_STATE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# the types an HTML form (or a no-cors fetch) sends to any site without a preflight
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
# OpenAI's image routes that take multipart/form-data (with a Bearer header: see the docstring)
MULTIPART_ROUTES = frozenset({"/v1/images/edits", "/v1/images/variations"})
_JSON_RULE = ("a request that changes state takes a JSON body sent as `Content-Type: application/json`, "
              "or no body and no Content-Type")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(configured: Iterable[str], bind_host: str) -> tuple[str, ...] | None:
    """The Host names answered (None: any): CRAFTSERVE_ALLOWED_HOSTS, else the loopback names
    for a server bound to a loopback address, else any."""
    names = tuple(configured)
    if names:
        return None if "*" in names else names
    return LOOPBACK_NAMES if is_loopback(bind_host) else None


def host_name(header: str) -> str:
    """The name of a Host header, lower case, without its port or brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.removesuffix(".")


def host_matches(name: str, allowed: Iterable[str]) -> bool:
    for pattern in allowed:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def media_type(header: str) -> str:
    return header.partition(";")[0].strip().lower()


def is_json(kind: str) -> bool:
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))




def multipart_allowed(method: str, path: str, kind: str, headers: dict[bytes, bytes]) -> bool:
    """A multipart upload to one of OpenAI's image routes from a program (the docstring)."""
    return (method == "POST" and path in MULTIPART_ROUTES and kind == "multipart/form-data"
            and has_bearer(headers.get(b"authorization", b"").decode("latin-1")))


class RequestGuards:
    def __init__(self, app: ASGIApp, *, allowed: tuple[str, ...] | None) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self.check(scope)
            except RequestRefused as exc:
                await answer_at_edge(scope, exc, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name, value)  # the first of a repeated header
        host = headers.get(b"host")
        probe = scope.get("method") in ("GET", "HEAD") and scope.get("path") in PROBES
        if self.allowed is not None and host is not None and not probe:
            name = host_name(host.decode("latin-1"))
            if not host_matches(name, self.allowed):
                raise RequestRefused(
                    400, ErrorKind.HOST_NOT_ALLOWED,
                    f"this server does not answer to the Host {name[:100]!r}: it answers only "
                    f"{', '.join(self.allowed)} (setting CRAFTSERVE_ALLOWED_HOSTS, comma-separated "
                    "names; the default is the loopback names while the server is bound to a "
                    "loopback address). This keeps web pages on other names (DNS rebinding) out")
        method = scope.get("method", "GET")
        if method not in CHANGES_STATE:
            return
        route = f"{method} {scope.get('path', '')}"
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
        if site in ("cross-site", "same-site"):
            raise RequestRefused(
                403, ErrorKind.CROSS_SITE,
                f"{route} was sent by a web page of another site (Sec-Fetch-Site: {site}): a "
                "browser may change this server's state only from the server's own page; call "
                "the API from a program or from this server's page")
        kind = media_type(headers.get(b"content-type", b"").decode("latin-1"))
        length = headers.get(b"content-length", b"").strip()
        has_body = (length not in (b"", b"0")
                    or b"chunked" in headers.get(b"transfer-encoding", b"").lower())
        if multipart_allowed(method, scope.get("path", ""), kind, headers):
            return
        if kind in FORM_TYPES or (has_body and not is_json(kind)):
            rule = _JSON_RULE
            if scope.get("path", "") in MULTIPART_ROUTES and kind == "multipart/form-data":
                rule = ("this route takes multipart/form-data only with the API key sent as "
                        "`Authorization: Bearer <key>` (no browser adds that header by itself)")
            sent = f"`Content-Type: {kind}`" if kind else "no Content-Type"
            raise RequestRefused(
                415, ErrorKind.UNSUPPORTED_MEDIA_TYPE,
                f"{route} came with {sent}{' and a body' if has_body else ''}: {rule} (a "
                "web page can make a browser send a form's content type to any site, so it is "
                "never accepted)")
