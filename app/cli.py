"""`craftserve serve ...`: run the server with uvicorn; `craftserve hash-key`: a keys-file line."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import threading
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings
from app.registry import RegistryError


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, stop taking jobs at once (waiting ones get 503), then let uvicorn
    finish the running requests within the grace period."""

    def __init__(self, config: uvicorn.Config, app) -> None:  # noqa: ANN001
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001
        engine = self._app.state.engine
        if engine.accepting:
            engine.begin_shutdown()
            # Past the grace period, running jobs are answered 503 by us, before uvicorn
            # (given a few seconds more) cancels whatever is still open.
            timer = threading.Timer(engine.settings.shutdown_grace_s, engine.abort_running)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


class IdleClosingH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has no request in progress for
    `idle_s` seconds on end: one that never sends a complete request head (idle, or sending
    it a byte at a time), not only one idle after a response (uvicorn's keep-alive timeout).
    Idle connections then cost a file descriptor for seconds, not for ever, and never stand
    between a fresh client and the server. A response in progress (a long generation, an
    event stream) is never cut."""

    idle_s = 10.0

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's signature
        super().connection_made(transport)
        self._idle_mark: object = None
        self._idle_timer = self.loop.call_later(self.idle_s, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if not busy and cycle is self._idle_mark:  # no new request since the last look
            self.transport.close()
            return
        self._idle_mark = cycle
        self._idle_timer = self.loop.call_later(self.idle_s, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)


def connection_limits(settings: Settings) -> dict:
    """uvicorn's connection settings, from ours (documented in the README's settings table)."""
    protocol = type("IdleClosingH11", (IdleClosingH11,), {"idle_s": settings.idle_timeout_s})
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections or None,
        "backlog": settings.backlog,
        # headers past this make h11 answer 431 itself (our middleware counts them too)
        "h11_max_incomplete_event_size": settings.max_header_bytes + 8192,
    }


def proxy_options(settings: Settings) -> dict:
    """uvicorn's reading of X-Forwarded-For / X-Forwarded-Proto: only from the peers named in
    CRAFTSERVE_TRUSTED_PROXIES, and not at all when none is (uvicorn's own default believes
    any loopback peer, so anything on the machine, or a local proxy passing the header on,
    could name any client address and escape the per-address failed-key throttle)."""
    if not settings.trusted_proxies:
        return {"proxy_headers": False, "forwarded_allow_ips": ""}
    return {"proxy_headers": True, "forwarded_allow_ips": list(settings.trusted_proxies)}


def uvicorn_options(settings: Settings) -> dict:
    """Every uvicorn option that comes from our settings (connections and proxies)."""
    return {**connection_limits(settings), **proxy_options(settings)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="craftserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="bind address (CRAFTSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (CRAFTSERVE_PORT, default 8000)")
    serve.add_argument("--models", type=Path, help="models file (CRAFTSERVE_MODELS)")
    serve.add_argument(
        "--allow-anonymous", action="store_true", default=None,
        help="accept requests without a key (trusted networks only)",
    )
    serve.add_argument(
        "--ray", action="store_true",
        help="run as a Ray Serve application: replicas across GPUs and nodes (extra craftserve[ray])",
    )
    serve.add_argument(
        "--address",
        help="with --ray: the Ray cluster to join, 'auto' or 'ray://host:10001' "
             "(CRAFTSERVE_RAY_ADDRESS; default: start a local Ray)",
    )
    hash_key = sub.add_parser(
        "hash-key",
        help="print the keys-file line (sha256:<hex>) for an API key, so the file is no secret",
    )
    hash_key.add_argument("key", nargs="?",
                          help="the key; omitted: read from standard input (stays out of shell history)")
    hash_key.add_argument("--new", action="store_true",
                          help="make a new random key, print it once, then its keys-file line")
    return parser


def _hash_key(args: argparse.Namespace) -> int:
    from app.auth import hashed_entry

    if args.new:
        key = secrets.token_urlsafe(32)
        sys.stdout.write(f"key (give it to the client; it is not stored): {key}\n")
    elif args.key is not None:
        key = args.key
    else:
        key = sys.stdin.readline().strip()
    if not key:
        sys.stderr.write("craftserve hash-key: no key given (argument, standard input or --new)\n")
        return 2
    if key.startswith("sha256:"):
        sys.stderr.write("craftserve hash-key: that is already a hashed entry\n")
        return 2
    sys.stdout.write(hashed_entry(key) + "\n")
    return 0


def _serve_on_ray(settings: Settings, address: str | None) -> int:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        sys.stderr.write('craftserve: --ray needs Ray Serve, which is not installed: '
                         'from the clone, pip install -e ".[ray]" (docs/scale-out.md)\n')
        return 2
    from app.cluster.deploy import serve_forever

    return serve_forever(settings, address)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        return _hash_key(args)
    overrides = {
        k: v
        for k, v in {
            "host": args.host, "port": args.port, "models": args.models,
            "allow_anonymous": args.allow_anonymous,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except Exception as exc:  # noqa: BLE001 - pydantic's message names the setting
        sys.stderr.write(f"craftserve: invalid settings: {exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.address and not args.ray:
        sys.stderr.write("craftserve: --address joins a Ray cluster; it needs --ray\n")
        return 2
    if args.ray:
        return _serve_on_ray(settings, args.address)
    from app.main import create_app

    try:
        app = create_app(settings)
    except (RegistryError, ValueError) as exc:
        sys.stderr.write(f"craftserve: {exc}\n")
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        **uvicorn_options(settings),
    )
    _Server(config, app).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
