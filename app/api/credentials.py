"""Who calls: the API key from each way a client sends it, and the dependencies every route
that needs a key uses (`CallerDep`, `GeneratingCallerDep`, `AdminDep` for the routes that
change the server: reload and A1111's refresh routes), and the caller's share of the queue
that generation routes hand to the shared core (`QueueShareDep`).

A key travels in one of three ways, whatever the route:
- `Authorization: Bearer <key>` (the OpenAI SDK, the page, curl);
- `Authorization: Basic base64(user:key)`, the key as the password and any user name (A1111
  clients: webuiapi, Open WebUI, SillyTavern); a credential without a colon is the key;
- `"token": "<key>"` at the top level of a JSON body (VisionCraft clients).
A body token wins over a header credential. A key is never read from the URL, where it would
reach access logs and browser history.

A missing or wrong key raises `Unauthorized` (401); each dialect renders it in its own shape
(VisionCraft answers 403, as the service did; A1111 adds `WWW-Authenticate: Basic`, OpenAI
`Bearer`). The dependencies run before the body is validated, so an unauthenticated request
learns nothing about the server's rules. A valid key without the `admin` role on an operator
route raises `NotAdmin` (403 in every dialect).

They also hold the one check every JSON body gets, whatever its route and dialect, once the
key is known (and, for routes that queue work, counted): text that is not valid Unicode (a lone
surrogate) anywhere in it is a 422 naming its path (app.api.rules.check_unicode), before any
route reads the body. Such text would fail the tokenizer inside a batch, and every answer that
quoted it.

The client address is the connection's peer, or the address a proxy named in
CRAFTSERVE_TRUSTED_PROXIES forwards (uvicorn reads `X-Forwarded-For` only from those; app.cli).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBase
from fastapi.security.base import SecurityBase

from app.api.deps import AuthDep, SettingsDep
from app.api.rules import check_unicode
from app.auth import ANONYMOUS, HOW_TO_SEND_A_KEY
from app.errors import NotAdmin, Unauthorized


class Unreadable:
    """An Authorization header that carries no key: another scheme, or Basic that is not
    base64 of UTF-8 text."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def client_host(request: Request) -> str | None:
    """The address the request came from (the failed-key throttle counts per address): the
    peer of the connection, unless it is a trusted proxy (CRAFTSERVE_TRUSTED_PROXIES), whose
    `X-Forwarded-For` uvicorn has already applied."""
    return request.client.host if request.client else None


def has_bearer(header: str) -> bool:
    """Whether an Authorization header is `Bearer <token>` with a token (right or wrong)."""
    scheme, value = header_scheme(header)
    return scheme == "bearer" and bearer_key(value) is not None


def bearer_key(value: str) -> str | None:
    """The key of a Bearer credential's value (what follows `Bearer `)."""
    return value.strip() or None


def basic_key(value: str) -> str | Unreadable | None:
    """The key of a Basic credential's value: the password of `user:password`, or the whole
    text when it has no colon; None for `Basic ` with nothing after it (what clients send when
    no user is configured)."""
    if not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return Unreadable("its Basic credential is not base64 of `user:key`")
    user, colon, password = decoded.partition(":")
    return (password or user if colon else decoded) or None


def header_scheme(header: str) -> tuple[str, str]:
    """(scheme in lower case, the rest) of an Authorization header."""
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower(), value


def header_key(header: str | None) -> str | Unreadable | None:
    """The key an Authorization header carries (Bearer or Basic); None without one."""
    if not header or not header.strip():
        return None
    scheme, value = header_scheme(header)
    if scheme == "bearer":
        return bearer_key(value)
    if scheme == "basic":
        return basic_key(value)
    return Unreadable("it is neither `Bearer <key>` nor HTTP Basic")


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().lstrip().startswith("multipart/")


async def body_key(request: Request) -> str | None:
    """The `token` of a JSON object body. FastAPI parsed the body before any dependency runs
    and Starlette keeps the parsed value, so this costs nothing for a JSON body; anything that
    is not a JSON object with a string `token` carries no key, and a multipart body is not read
    here at all."""
    if request.method in ("GET", "HEAD", "DELETE"):
        return None
    if _is_multipart(request):
        return None  # an upload (OpenAI's edits): the route reads it as a stream, the key is a header
    if not await request.body():
        return None
    try:
        data = await request.json()
    except ValueError:
        return None
    token = data.get("token") if isinstance(data, dict) else None
    return token if isinstance(token, str) and token else None


class _Documented(SecurityBase):
    """A way to send the key, for the OpenAPI document (and /docs' Authorize button); the
    header itself is read by `caller`."""

    def __init__(self, scheme: str, description: str) -> None:
        self.model = HTTPBase(scheme=scheme, description=description)
        self.scheme_name = f"craftserve_{scheme}"

    async def __call__(self, request: Request) -> None:
        return None


_bearer = _Documented("bearer", "a craftserve API key")
_basic = _Documented("basic", "any user name, the craftserve API key as the password")


async def presented_key(request: Request, auth: AuthDep) -> str | None:
    """The key the request carries, None without one. A body `token` comes first: a client
    behind a proxy with HTTP Basic auth of its own still reaches craftserve with the key in its
    body. An Authorization header that carries no key is a failed key check (401, counted
    against the address), except with anonymous access, where it is ignored."""
    key = await body_key(request)
    if key is not None:
        return key
    found = header_key(request.headers.get("authorization"))
    if isinstance(found, Unreadable):
        if auth.allow_anonymous:
            return None
        host = client_host(request)
        auth.failures.check(host)
        auth.failures.record(host)
        raise Unauthorized(f"Invalid API key: the Authorization header carries none, "
                           f"{found.reason}; {HOW_TO_SEND_A_KEY}")
    return found


async def readable_body(request: Request) -> None:
    """422 for a JSON body holding text that is not valid Unicode (`check_unicode`). The parsed
    body is the one FastAPI parsed (Starlette keeps it); the walk is skipped when the bytes
    cannot hold a lone surrogate: UTF-8 (no byte order mark, no NUL among the first four bytes,
    as the JSON parser detects encodings), with no `\\u` escape and no 0xED byte (that starts
    a surrogate's UTF-8 form, which the JSON parser decodes as one)."""
    if request.method in ("GET", "HEAD", "DELETE") or _is_multipart(request):
        return  # multipart text is decoded by the form parser (UTF-8, else Latin-1): no surrogates
    body = await request.body()
    if not body or (b"\\u" not in body and b"\xed" not in body and b"\x00" not in body[:4]
                    and not body.startswith((b"\xff\xfe", b"\xfe\xff"))):
        return
    try:
        data = await request.json()
    except ValueError:
        return  # not JSON: FastAPI answers it (this runs only where it could parse it)
    # Off the event loop: finding a lone surrogate in a body of many small items is a walk in
    # Python, a few times the parse's cost, which other requests should not wait for.
    await asyncio.to_thread(check_unicode, data)


async def _identified(request: Request, auth: AuthDep, _bearer_doc: Annotated[None, Depends(_bearer)],
                      _basic_doc: Annotated[None, Depends(_basic)]) -> str:
    """The caller's label (a key's, or an anonymous address's with --allow-anonymous); 401
    (`Unauthorized`) without a valid key."""
    return auth.authenticate(await presented_key(request, auth), client_host(request))


IdentifiedDep = Annotated[str, Depends(_identified)]


async def caller(client: IdentifiedDep, request: Request) -> str:
    """The caller's label (`_identified`); then the body's text is checked (`readable_body`)."""
    await readable_body(request)
    return client


async def optional_caller(request: Request, auth: AuthDep,
                          _bearer_doc: Annotated[None, Depends(_bearer)],
                          _basic_doc: Annotated[None, Depends(_basic)]) -> str | None:
    """The label of the key the request carries, or None when it carries none: for routes
    that answer everyone and tell a caller with a key more (/ready). A key that is sent is
    checked as on every route: a wrong one is 401 and counts against the address, so the
    route is no way to try keys unthrottled. An anonymous label (--allow-anonymous) is never
    returned: it is not a key."""
    key = await presented_key(request, auth)
    if key is None:
        return None
    label = auth.authenticate(key, client_host(request))
    return label if label in auth.entries else None


CallerDep = Annotated[str, Depends(caller)]
OptionalCallerDep = Annotated[str | None, Depends(optional_caller)]


async def generating_caller(client: IdentifiedDep, auth: AuthDep, request: Request) -> str:
    """`caller`, and the request counts against the caller's rate limit (429 past it) before
    its body is checked or validated, so an invalid body counts too. Every route that queues
    work uses this one; discovery and status routes use `caller`."""
    auth.admit(client)
    await readable_body(request)
    return client


GeneratingCallerDep = Annotated[str, Depends(generating_caller)]


ADMIN_HOW_TO = ("the `admin` role is given in the keys file: write `admin` after the key on its line "
                "(`KEY  admin`, or `sha256:<hex>  admin` for a hashed key; CRAFTSERVE_API_KEYS_FILE "
                "or CRAFTSERVE_API_KEYS) and restart the server")


def admin_caller(request: Request, client: CallerDep, auth: AuthDep) -> str:
    """`caller`, and the caller's key has the `admin` role (403 `NotAdmin` otherwise; an
    anonymous caller never has it). Every route that changes the server for all its users
    (reloading the models file) uses this one."""
    if not auth.is_admin(client):
        route = f"{request.method} {request.url.path}"
        if client.startswith(ANONYMOUS):
            raise NotAdmin(f"{route} needs an API key with the `admin` role; anonymous callers "
                           f"(--allow-anonymous) never have it: send an admin key; {ADMIN_HOW_TO}")
        raise NotAdmin(f"{route} needs an API key with the `admin` role, and this key does not "
                       f"have it; {ADMIN_HOW_TO}")
    return client


AdminDep = Annotated[str, Depends(admin_caller)]


def queue_share(client: GeneratingCallerDep, auth: AuthDep, settings: SettingsDep) -> int:
    """The jobs the caller may have waiting at once: its key's `queue=N` in the keys file, else
    CRAFTSERVE_MAX_QUEUE_PER_KEY (anonymous callers, one label per address, get the setting's).
    The caller is the request's own (FastAPI runs `generating_caller` once a request)."""
    return auth.queue_share(client) or settings.max_queue_per_key or 1


QueueShareDep = Annotated[int, Depends(queue_share)]
