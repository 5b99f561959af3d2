"""The Ray Serve application, and `craftserve serve --ray`.

Two deployments: `Ingress` runs the craftserve FastAPI app (serve.ingress) with a
RemoteEngine, one replica, no CPU reserved (it only validates, routes and encodes);
`Generator` runs craftserve's Engine on one device a replica, RAY_MIN_REPLICAS to
RAY_MAX_REPLICAS of them (autoscaled on ongoing requests when max > min).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from functools import partial
from typing import Any
from urllib.parse import urlparse

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from app.cluster.board import NAMESPACE, board_name, get_board
from app.cluster.dispatch import replica_slots
from app.cluster.remote import RemoteEngine
from app.cluster.replica import GenerationReplica
from app.cluster.router import TargetRouter
from app.config import Settings

logger = logging.getLogger(__name__)

APP_NAME = "craftserve"
INGRESS_MAX_ONGOING = 4096  # open requests (event streams too) the one ingress replica takes


@serve.ingress()
class Ingress:
    """The craftserve app, built in the replica (its settings travel as the bind argument)."""

    def __init__(self, settings: dict[str, Any], generator: Any, app_name: str) -> None:
        self._settings = settings
        self._generator = generator
        self._app_name = app_name

    def __serve_build_asgi_app__(self) -> Any:
        from app.main import create_app

        settings = Settings(**self._settings)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        factory = partial(RemoteEngine, generator=self._generator, board=get_board(self._app_name))
        return create_app(settings, engine_factory=factory)


def generator_options(settings: Settings, gpus: float) -> dict[str, Any]:
    """The generation deployment's Serve options, from craftserve's settings."""
    options: dict[str, Any] = {
        "name": "Generator",
        "ray_actor_options": {"num_cpus": settings.ray_cpus_per_replica, "num_gpus": gpus},
        # the ingress sends a replica at most RAY_REPLICA_SLOTS calls (app.cluster.dispatch)
        # and names the replica in the call (app.cluster.router); the bounds below only guard
        "max_ongoing_requests": max(settings.max_queue, settings.max_batch,
                                    replica_slots(settings)),
        "max_queued_requests": settings.ray_max_queued,
        "request_router_config": RequestRouterConfig(request_router_class=TargetRouter),
        # scale-down and shutdown wait for in-flight jobs (queued ones run out their deadline)
        "graceful_shutdown_timeout_s": settings.queue_deadline_s + settings.shutdown_grace_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 60.0,
        "max_constructor_retry_count": 3,
    }
    if settings.ray_max_replicas > settings.ray_min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "initial_replicas": settings.ray_min_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing,
            "upscale_delay_s": settings.ray_upscale_delay_s,
            "downscale_delay_s": settings.ray_downscale_delay_s,
        }
    else:
        options["num_replicas"] = settings.ray_min_replicas
    return options


def build(settings: Settings, gpus: float, app_name: str = APP_NAME) -> serve.Application:
    values = settings.model_dump()
    generator = serve.deployment(GenerationReplica).options(**generator_options(settings, gpus))
    ingress = serve.deployment(Ingress).options(
        name="Ingress", num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        # its open requests wait for their jobs as long as the generation replicas may run them
        graceful_shutdown_timeout_s=settings.queue_deadline_s + settings.shutdown_grace_s,
    )
    return ingress.bind(values, generator.bind(values, app_name), app_name)


def from_env(args: dict[str, Any]) -> serve.Application:
    """The application builder for Serve config files (KubeRay's `serveConfigV2`,
    `serve deploy`): `import_path: app.cluster.deploy:from_env`. Settings come from the
    CRAFTSERVE_* environment (the application's runtime_env), each key of `args` overriding
    the setting of that name; `app_name` (default craftserve) must equal the application's
    name in the config, as the replicas find their board by it."""
    args = dict(args or {})
    app_name = str(args.pop("app_name", APP_NAME))
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"args {unknown} are not craftserve settings (app_name, or a setting's "
                         "name in lower case, e.g. ray_max_replicas)")
    settings = Settings(**args)
    gpus = gpus_per_replica(settings)
    if settings.ray_gpus_per_replica is None and not gpus:
        logger.warning("no GPU in the cluster now: the generation replicas run on CPUs (set "
                       "CRAFTSERVE_RAY_GPUS_PER_REPLICA=1 where GPU nodes start on demand)")
    return build(settings, gpus, app_name)


def gpus_per_replica(settings: Settings) -> float:
    """The setting, or unset: one GPU a replica where the cluster has GPUs, else CPU replicas."""
    if settings.ray_gpus_per_replica is not None:
        return settings.ray_gpus_per_replica
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def deploy(settings: Settings, app_name: str = APP_NAME) -> str:
    """Deploy on the Ray this process is connected to; returns the HTTP address. Waits until
    the app is running (raises RuntimeError when it cannot deploy)."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings, gpus_per_replica(settings), app_name), name=app_name,
              route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def undeploy(app_name: str = APP_NAME) -> None:
    with contextlib.suppress(Exception):
        serve.delete(app_name)
    with contextlib.suppress(Exception):
        ray.kill(ray.get_actor(board_name(app_name), namespace=NAMESPACE))


def check_address(address: str) -> str | None:
    """Why `address` cannot be reached (a quick TCP look, 5 s), or None. 'auto' is left to
    ray.init, which says itself when no cluster runs here."""
    if address == "auto":
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname:
        return "it is not 'auto', 'host:port' or 'ray://host:port'"
    port = parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            return None
    except OSError as exc:
        return f"nothing answers at {parsed.hostname}:{port} ({exc.strerror or exc})"


def serve_forever(settings: Settings, address: str | None) -> int:
    """`craftserve serve --ray`: join the cluster at `address` (or start a local Ray), deploy,
    and serve until SIGINT/SIGTERM; then take the app down (and the local Ray with it)."""
    address = address or settings.ray_address
    if address:
        reason = check_address(address)
        if reason:
            sys.stderr.write(f"craftserve: cannot reach the Ray cluster at {address!r}: {reason}; "
                             "start it (`ray start --head`) or fix --address / CRAFTSERVE_RAY_ADDRESS\n")
            return 2
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        sys.stderr.write(f"craftserve: cannot join the Ray cluster at {address!r}: {exc}\n")
        return 2
    # Signals are ours before the app can answer: /ready may say 200 before deploy() returns.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    board = get_board(APP_NAME)  # SIGHUP: the ingress and every replica re-read models.yaml
    signal.signal(signal.SIGHUP, lambda *_: board.request_reload.remote())
    try:
        url = deploy(settings)
    except RuntimeError as exc:
        sys.stderr.write(f"craftserve: the Ray Serve application did not start: {exc}\n")
        undeploy()
        ray.shutdown()
        return 1
    sys.stderr.write(f"craftserve on Ray Serve at {url} (SIGINT or SIGTERM stops it)\n")
    while not stop.wait(1.0):
        pass
    sys.stderr.write("craftserve: draining the replicas, then stopping\n")
    undeploy()
    if not address:
        serve.shutdown()
    ray.shutdown()
    return 0
