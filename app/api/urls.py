"""The absolute URLs answers hand out: /generate's images, OpenAI `url`, the job API's status,
events and image URLs.

With CRAFTSERVE_PUBLIC_URL set (e.g. `https://images.example.com/base`), every one is that
base followed by the route's path: whatever `Host` (or `X-Forwarded-*`) a client sends, the
links point at the server's public address. Unset, they are built from the request, as
Starlette's `url_for` does: the scheme, the `Host` header and the root path. That is right on a
loopback or a trusted network, but a client can then make the server hand out links to another
host (in answers a proxy may cache, or in job states another tool reads); set the public URL on
any server reached through a name or a proxy.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request


def public_url_for(request: Request, name: str, /, **path_params: Any) -> str:
    """The absolute URL of the route `name` with `path_params`, from the public URL when set."""
    base = request.app.state.settings.public_url
    if base is None:
        return str(request.url_for(name, **path_params))
    return base + str(request.app.url_path_for(name, **path_params))
