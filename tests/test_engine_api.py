"""The seam between the HTTP side and the engines: EngineAPI (app.engine.protocol).

Both engines (this machine's Engine, the Ray ingress's RemoteEngine) have every member of the
protocol with a compatible signature, and the HTTP side (routes, app.main, app.cli) asks an
engine for nothing else. RemoteEngine's waiting jobs and positions are checked with a fake
generation deployment (no Ray cluster).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import pytest

from app.config import Settings
from app.engine.engine import Engine
from app.engine.jobs import GenParams
from app.engine.protocol import EngineAPI
from app.metrics import Metrics
from app.registry import load_registry
from app.samplers import resolve_sampler
from tests.conftest import TINY_MODELS, write_models_file

APP = Path(__file__).resolve().parent.parent / "app"


def protocol_members() -> tuple[set[str], dict[str, inspect.Signature]]:
    """The protocol's data members and its methods' signatures."""
    data = set(EngineAPI.__annotations__)
    methods = {name: inspect.signature(value) for name, value in vars(EngineAPI).items()
               if inspect.isfunction(value) and not name.startswith("_")}
    return data, methods


def engine_classes() -> list[type]:
    classes: list[type] = [Engine]
    try:
        from app.cluster.remote import RemoteEngine
    except ImportError:  # Ray is the craftserve[ray] extra
        return classes
    return [*classes, RemoteEngine]


def test_the_protocol_has_what_the_routes_need() -> None:
    data, methods = protocol_members()
    assert data == {"settings", "accepting"}
    assert set(methods) == {"describe", "start", "begin_shutdown", "abort_running", "stop",
                            "submit", "cancel", "jobs_of", "waiting", "queue_position",
                            "reload", "readiness", "unload_model", "load_model"}


@pytest.mark.parametrize("cls", engine_classes(), ids=lambda cls: cls.__name__)
def test_each_engine_has_every_member_with_a_compatible_signature(cls: type) -> None:
    """Every protocol parameter is there with the same name, kind and annotation (a default
    where the protocol has one); extra parameters have defaults; the returns are the same."""
    _, methods = protocol_members()
    for name, wanted in methods.items():
        found = inspect.signature(getattr(cls, name))
        assert found.return_annotation == wanted.return_annotation, (cls, name)
        params = dict(found.parameters)
        for pname, param in wanted.parameters.items():
            assert pname in params, (cls, name, pname)
            got = params.pop(pname)
            assert got.kind == param.kind, (cls, name, pname)
            assert got.annotation == param.annotation, (cls, name, pname)
            if param.default is not inspect.Parameter.empty:
                assert got.default == param.default, (cls, name, pname)
        assert all(p.default is not inspect.Parameter.empty for p in params.values()), (cls, name)


def tiny_settings(tmp_path: Path, **overrides) -> Settings:
    return Settings(models=write_models_file(tmp_path, TINY_MODELS), devices="cpu", **overrides)


def test_both_engines_are_instances_of_the_protocol(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    engine = Engine(settings, load_registry(settings.models), Metrics())
    assert isinstance(engine, EngineAPI)
    ray = pytest.importorskip("ray", reason="Ray Serve is the `craftserve[ray]` extra")
    assert ray
    from app.cluster.remote import RemoteEngine

    remote = RemoteEngine(settings, load_registry(settings.models), Metrics(), generator=None,
                          board=None)
    assert isinstance(remote, EngineAPI)


def engine_uses(path: Path) -> set[str]:
    """Every attribute read from a name `engine` in the file (engine.submit → submit)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "engine"}


def test_the_http_side_asks_an_engine_only_for_protocol_members() -> None:
    data, methods = protocol_members()
    files = [*sorted((APP / "api").rglob("*.py")), APP / "main.py", APP / "cli.py"]
    used = {str(path.relative_to(APP)): engine_uses(path) for path in files}
    seen = set().union(*used.values())
    assert seen >= {"submit", "waiting", "jobs_of", "queue_position"}  # the walk sees the calls
    stray = {path: uses - data - set(methods) for path, uses in used.items()}
    assert all(not uses for uses in stray.values()), stray


# ---- RemoteEngine's waiting jobs, with a fake generation deployment --------------------------
class FakeStream:
    """One streaming call: yields the events the test puts in."""

    def __init__(self) -> None:
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self):  # noqa: ANN204
        event = await self.events.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def cancel(self) -> None:
        self.cancelled = True


class FakeGenerator:
    """The generation deployment's handle: records each call's arguments and stream."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, FakeStream]] = []

    def options(self, **kwargs) -> FakeGenerator:
        return self

    @property
    def run(self) -> FakeGenerator:
        return self

    def remote(self, *args) -> FakeStream:
        stream = FakeStream()
        self.calls.append((args, stream))
        return stream


def params(seed: int) -> GenParams:
    return GenParams(model="tiny-sdxl", prompt="p", negative_prompt="",
                     sampler=resolve_sampler("Euler"), steps=4, width=64, height=64,
                     cfg_scale=7.0, loras=(), seed=seed)


def test_remote_engine_positions_are_among_the_jobs_no_replica_started(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray Serve is the `craftserve[ray]` extra")
    from app.cluster.remote import RemoteEngine
    from app.cluster.wire import STARTED

    settings = tiny_settings(tmp_path)
    generator = FakeGenerator()
    remote = RemoteEngine(settings, load_registry(settings.models), Metrics(),
                          generator=generator, board=None)
    remote.accepting = True  # start() would poll the board
    # what the board would say: one replica holding the model, with room for every job
    remote.replicas = {"replica-1": {"name": "replica-1", "device": "cpu", "alive": True,
                                     "preloaded": True, "pid": 1, "models": {"tiny-sdxl": "loaded"},
                                     "loaded": ["tiny-sdxl"], "queue_depth": 0, "running": 0}}
    remote.dispatcher.update(remote.replicas)

    async def scenario() -> None:
        a = [remote.submit(params(i), "a") for i in range(3)]
        b = remote.submit(params(10), "b")
        await asyncio.sleep(0)  # each job's call is made
        assert len(generator.calls) == 4
        assert [args[0].job_id for args, _ in generator.calls] == [j.id for j in [*a, b]]  # JobCall
        assert remote.waiting("a") == a and remote.waiting("b") == [b]
        assert [remote.queue_position(j) for j in [*a, b]] == [1, 2, 3, 4]
        generator.calls[0][1].events.put_nowait((STARTED, "replica-1"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert a[0].started_at is not None
        assert remote.waiting("a") == a[1:] and remote.jobs_of("a") == a
        assert [remote.queue_position(j) for j in [*a, b]] == [None, 1, 2, 3]
        remote.cancel(a[1])
        assert [remote.queue_position(j) for j in [*a, b]] == [None, None, 1, 2]
        remote.stop()
        await asyncio.sleep(0)
        assert all(job.future.done() for job in [*a, b])
        assert remote.waiting("a") == remote.waiting("b") == []

    asyncio.run(scenario())


def test_remote_engine_readiness_body(tmp_path: Path) -> None:
    """/ready under Ray, from the board's replicas: a model loaded on any replica is loaded,
    one that failed on a replica names it, a preload model not loaded is a reason."""
    pytest.importorskip("ray", reason="Ray Serve is the `craftserve[ray]` extra")
    from app.cluster.remote import RemoteEngine

    models = write_models_file(tmp_path, """
models:
  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}
  tiny-sd15: {source: builtin:tiny-sd15}
  other: {source: builtin:tiny-sd15}
""")
    settings = Settings(models=models, devices="cpu")
    remote = RemoteEngine(settings, load_registry(models), Metrics(), generator=None, board=None)
    remote.accepting = True
    assert remote.readiness() == (False, {
        "ready": False, "status": "loading",
        "reasons": ["no generation replica is up yet (Ray Serve is starting or replacing them)",
                    "tiny-sdxl: loading"],
        "models": {"tiny-sdxl": "loading", "tiny-sd15": "loads on first request",
                   "other": "loads on first request"},
        "waiting_for_weights": [], "workers": [], "queue_depth": 0, "last_reload": None,
        "ingress_waiting": 0,
    })

    def replica(name: str, states: dict[str, str]) -> dict:
        return {"name": name, "device": "cpu", "alive": True, "preloaded": True, "pid": 1,
                "models": states, "loaded": [m for m, s in states.items() if s == "loaded"],
                "queue_depth": 1, "running": 0}

    remote.replicas = {
        "r1": replica("r1", {"tiny-sdxl": "loaded", "tiny-sd15": "unavailable: bad weights"}),
        "r2": replica("r2", {"tiny-sdxl": "loading", "other": "unavailable: gone"}),
    }
    ready, body = remote.readiness()
    assert ready and body["reasons"] == [] and body["queue_depth"] == 2
    assert body["models"] == {"tiny-sdxl": "loaded", "tiny-sd15": "r1: unavailable: bad weights",
                              "other": "r2: unavailable: gone"}
    assert [w["name"] for w in body["workers"]] == ["r1", "r2"]
    assert list(body) == ["ready", "status", "reasons", "models", "waiting_for_weights", "workers",
                          "queue_depth", "last_reload", "ingress_waiting"]
    remote.accepting = False
    assert remote.readiness()[1]["reasons"] == ["the server is shutting down"]
