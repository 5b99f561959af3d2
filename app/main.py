"""create_app(): assembles settings, registry, auth, engine, routers and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from app import __version__
from app.api import a1111, admin, health, jobs, openai_images, openapi, page, visioncraft
from app.api.a1111 import A1111State, ModelHashes
from app.api.admin import Reloads
from app.api.edge import EdgeLimits, image_route_caps
from app.api.errors import ErrorInfo, ErrorRenderers
from app.api.guards import RequestGuards, allowed_hosts
from app.api.head import HeadAsGet
from app.api.job_tracker import JobTracker
from app.api.security_headers import SecurityHeaders
from app.auth import Authenticator
from app.config import Settings, get_settings
from app.engine.controlnet_fit import match_controlnets
from app.engine.engine import Engine
from app.engine.lora_fit import match_loras
from app.engine.protocol import EngineAPI
from app.errors import CraftError, ErrorKind, quoted, shown
from app.file_hashes import HashCache
from app.image_inputs import image_body_cap
from app.imaging import ImageStore
from app.metrics import Metrics
from app.registry import Registry, load_registry

logger = logging.getLogger(__name__)


def _loc(err: dict) -> list:
    """The error's location, each part cut short (a JSON object key may be a megabyte)."""
    return [shown(p) if isinstance(p, str) else p for p in err.get("loc", ())]


def _field_of(err: dict) -> str:
    loc = [str(p) for p in _loc(err)]
    return ".".join(loc[1:] if loc and loc[0] == "body" else loc) or "body"


def _rule(field: str, msg: str) -> str:
    """Pydantic's message as a rule about the field: 'Input should be ...' → 'steps should be ...'."""
    msg = msg.removeprefix("Value error, ")
    if msg.startswith("Input "):
        return field + msg.removeprefix("Input")
    if msg.startswith(("must ", "should ")):
        return f"{field} {msg}"
    return msg


def describe_validation_errors(errors: list[dict]) -> str:
    """One readable sentence per error naming the field, the value and the rule, each with
    "doesn't have <field>", the phrase the published VisionCraft wrapper parses to name the
    parameter (its InvalidParam.param; a 422 without it crashes the wrapper)."""
    parts = []
    for err in errors:
        field = _field_of(err)
        kind = err.get("type", "")
        if kind == "missing":
            parts.append(f"The request doesn't have {field}: {field} is a required field")
        elif field == "body" and isinstance(err.get("input"), bytes | bytearray):
            # a JSON body sent under another Content-Type: never echo it (it may hold the key)
            parts.append("The request doesn't have body as JSON: it was not sent as "
                         "`Content-Type: application/json`; send a JSON object with that header")
        elif kind == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"The request doesn't have body as valid JSON: malformed JSON ({reason}); "
                         "send a JSON object")
        else:
            rule = _rule(field, str(err.get("msg", "invalid")))
            parts.append(f"This server doesn't have {field} {quoted(err.get('input'))}: {rule}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI, metrics: Metrics, renderers: ErrorRenderers) -> None:
    @app.exception_handler(CraftError)
    async def craft_error(request: Request, exc: CraftError) -> Response:
        metrics.errors.labels(exc.kind).inc()
        info = ErrorInfo(exc.status, exc.message, exc.kind, getattr(exc, "field", None), exc.headers)
        return renderers.render(request, info)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        metrics.errors.labels(ErrorKind.INVALID_PARAMETER).inc()
        errors = [
            {"loc": _loc(e), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        fields = [_field_of(e) for e in exc.errors()]
        info = ErrorInfo(422, describe_validation_errors(list(exc.errors())), ErrorKind.INVALID_PARAMETER,
                         fields[0] if fields else None, errors=errors)
        return renderers.render(request, info)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer for a JSON body it cannot decode other than malformed JSON: bytes
            # that are not UTF-8, or nesting deeper than Python's JSON parser goes.
            body = await request.body()
            try:
                body.decode("utf-8")
                reason = "it is nested too deeply to parse"
            except UnicodeDecodeError as bad:
                reason = f"it is not UTF-8 (byte {bad.start})"
            metrics.errors.labels(ErrorKind.INVALID_PARAMETER).inc()
            message = f"The request doesn't have body as valid JSON: {reason}; send a JSON object"
            return renderers.render(request, ErrorInfo(422, message, ErrorKind.INVALID_PARAMETER, "body"))
        kind = ErrorKind.NOT_FOUND if exc.status_code == 404 else ErrorKind.HTTP
        metrics.errors.labels(kind).inc()
        info = ErrorInfo(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {}))
        return renderers.render(request, info)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.errors.labels(ErrorKind.INTERNAL).inc()
        info = ErrorInfo(500, "internal server error; the server log has the details",
                         ErrorKind.INTERNAL)
        return renderers.render(request, info)


def reload_on_hangup(engine: EngineAPI) -> None:
    """SIGHUP rescans models.yaml and its folders, as POST /admin/reload does (where signals
    can be handled: the main thread of a Unix process; tests run the server in a thread)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, engine.reload))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        logger.debug("SIGHUP cannot be handled here; use POST /admin/reload")


EngineFactory = Callable[[Settings, Registry, Metrics], EngineAPI]


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = Engine) -> FastAPI:
    """Build the app. Fails fast (RegistryError, ValueError) on a bad models file or settings.
    `engine_factory`: what runs the jobs; the Engine on this machine's devices, or under Ray
    Serve a facade with the same members (EngineAPI) over the generation replicas (app.cluster)."""
    settings = settings or get_settings()
    registry = load_registry(settings.models)
    match_loras(registry)  # which LoRA fits which model, from their layers (no weights)
    match_controlnets(registry)  # and which ControlNet, the same way
    metrics = Metrics()
    auth = Authenticator(settings.all_api_keys(), allow_anonymous=settings.allow_anonymous,
                         rate_limit=settings.rate_limit, metrics=metrics,
                         auth_failures_per_minute=settings.auth_failures_per_minute)
    engine = engine_factory(settings, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if auth.generated_key:
            sys.stderr.write(
                "\n  No API key is configured (CRAFTSERVE_API_KEYS / CRAFTSERVE_API_KEYS_FILE).\n"
                f"  This run accepts only this key: {auth.generated_key}\n"
                "  (use --allow-anonymous to open the server on a trusted network)\n\n"
            )
        engine.start()
        hashes.warm()  # every model's sha256, in a background thread (cached across restarts)
        reload_on_hangup(engine)
        logger.info(
            "craftserve %s serving %s on %s",
            __version__,
            ", ".join(registry.models),
            engine.describe(),
        )
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await jobs_state.close()
            engine.stop()

    app = FastAPI(
        title="craftserve",
        version=__version__,
        description="Self-hosted, VisionCraft-compatible image generation on diffusers.",
        lifespan=lifespan,
        docs_url=None,  # /docs is served from the package (app.api.page), not from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.auth = auth
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.images = ImageStore(settings.image_store_mb * 2**20,
                                  (settings.image_store_mb_per_key or settings.image_store_mb) * 2**20)
    app.state.jobs = jobs_state = JobTracker(settings)  # the job API's jobs and their events
    app.state.reloads = Reloads(engine, settings.reload_interval_s)  # coalesced, admin keys only
    # A1111's options (each caller's own) and skipped jobs
    hashes = ModelHashes(registry, HashCache(settings.cache_folder()))
    app.state.a1111 = A1111State(registry, is_key=auth.entries.__contains__, hashes=hashes)
    app.include_router(visioncraft.router)
    app.include_router(a1111.router)
    app.include_router(a1111.extra_router)
    app.include_router(a1111.controlnet_router)
    app.include_router(a1111.gradio_router)
    app.include_router(openai_images.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.add_middleware(EdgeLimits, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, max_url_bytes=settings.max_url_bytes,
                       max_header_bytes=settings.max_header_bytes,
                       route_caps=image_route_caps(image_body_cap(settings)))
    # outside the edge limits: a refused Host or a form post is answered before its body is read
    app.add_middleware(RequestGuards, allowed=allowed_hosts(settings.allowed_hosts, settings.host))
    app.include_router(jobs.router)
    app.include_router(page.router)
    app.state.error_renderers = renderers = ErrorRenderers()
    renderers.register("/sdapi/", a1111.render_error)
    renderers.register("/controlnet/", a1111.render_error)  # sd-webui-controlnet: A1111's shape
    for path in ("/queue/status", "/login_check"):  # gradio's: a 401 as A1111 clients expect it
        renderers.register(path, a1111.render_error)
    renderers.register("/v1/", openai_images.render_error)
    _install_error_handlers(app, metrics, renderers)
    openapi.install(app)
    _wrap_outside(app, settings)
    return app


def _wrap_outside(app: FastAPI, settings: Settings) -> None:
    """HEAD as GET (app.api.head) and the security headers (app.api.security_headers) go
    outside FastAPI's whole stack, its ServerErrorMiddleware included, so that every answer,
    a 500 too, gets them (`add_middleware` would put them inside it)."""
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return SecurityHeaders(HeadAsGet(build()), public_url=settings.public_url)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
