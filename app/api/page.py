"""The playground page at GET /: plain HTML, CSS and JavaScript shipped in the package
(app/static), no build step and nothing fetched from elsewhere. It drives the job API."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)


def _static(name: str) -> bytes:
    return resources.files("app").joinpath("static", name).read_bytes()


@router.get("/")
def page() -> HTMLResponse:
    return HTMLResponse(_static("index.html"))


@router.get("/static/app.js")
def script() -> Response:
    return Response(_static("app.js"), media_type="text/javascript")
