"""The playground page at GET /, and the API docs at GET /docs: plain HTML, CSS and JavaScript
shipped in the package (app/static), no build step and nothing fetched from elsewhere: the page
and /docs run under a Content-Security-Policy that allows this server's own files only
(app.api.security_headers), so no script or style is inline. The page drives the job API.

/docs is Swagger UI from the npm package swagger-ui-dist, vendored unmodified in
app/static/swagger (its LICENSE and VERSION beside it; scripts/vendor_swagger_ui.sh refreshes
it), so it works on an offline box and no third-party script runs where a key is typed.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

# Every file served under /static, and its type; anything else is 404 (no path is joined).
_FILES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "snippets.js": "text/javascript",
    "docs.js": "text/javascript",
    "swagger/swagger-ui-bundle.js": "text/javascript",
    "swagger/swagger-ui.css": "text/css",
    "swagger/favicon-32x32.png": "image/png",
}
# The page's own files change with craftserve: the browser asks each time. Swagger UI's
# change only with the vendored version: kept a day.
_CACHE = {"swagger/": "public, max-age=86400"}
_REVALIDATE = "no-cache"


def _static(name: str) -> bytes:
    return resources.files("app").joinpath("static", *name.split("/")).read_bytes()


@router.get("/")
def page() -> HTMLResponse:
    return HTMLResponse(_static("index.html"))


@router.get("/docs")
def docs() -> HTMLResponse:
    return HTMLResponse(_static("docs.html"))


@router.get("/static/{name:path}")
def static_file(name: str) -> Response:
    media_type = _FILES.get(name)
    if media_type is None:
        raise HTTPException(404, "no such file")
    cache = next((v for prefix, v in _CACHE.items() if name.startswith(prefix)), _REVALIDATE)
    return Response(_static(name), media_type=media_type, headers={"Cache-Control": cache})
