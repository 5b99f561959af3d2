"""EngineAPI: everything the HTTP side (routes, app.main, app.cli) may ask of an engine.

Two classes implement it without inheriting from it: `app.engine.engine.Engine` (the queue
and the workers of this machine) and `app.cluster.remote.RemoteEngine` (the Ray Serve
ingress, whose jobs run on generation replicas). The routes see only these members, so how
an engine queues its jobs stays its own business; tests/test_engine_api.py checks that both
classes have every member with a compatible signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from app.config import Settings
    from app.engine.jobs import GenParams, Job
    from app.engine.reload import ReloadReport
    from app.errors import CraftError


@runtime_checkable
class EngineAPI(Protocol):
    settings: Settings  # the server's settings (the CLI reads the shutdown grace period)
    accepting: bool  # False before start() and from begin_shutdown() on

    # ---- life cycle ----------------------------------------------------------------
    def describe(self) -> str:
        """Where jobs run, for the start-up log line."""
        ...

    def start(self) -> None:
        """Start taking jobs (called on the server's event loop)."""
        ...

    def begin_shutdown(self) -> None:
        """Stop accepting; answer every waiting job 503. Running jobs go on."""
        ...

    def abort_running(self) -> None:
        """Answer the running jobs 503 and stop them."""
        ...

    def stop(self, grace_s: float | None = None) -> None:
        """Shut down: running jobs get the grace period (the setting's when None)."""
        ...

    # ---- jobs ----------------------------------------------------------------------
    def submit(self, params: GenParams, client: str, deadline_s: float | None = None) -> Job:
        """Queue one job for `client` (a key's label), on the running event loop; raises a
        CraftError (503 when shutting down or full, a model that cannot be served now)."""
        ...

    def cancel(self, job: Job, answer: CraftError | None = None) -> None:
        """Take a waiting job back (answered `answer` when given) or stop a running one."""
        ...

    def jobs_of(self, client: str) -> list[Job]:
        """The client's running jobs, then its waiting ones in the order they will run."""
        ...

    def waiting(self, client: str) -> list[Job]:
        """The client's waiting (not yet started) jobs, in the order they will run."""
        ...

    def queue_position(self, job: Job) -> int | None:
        """The job's place among every key's waiting jobs, 1 = the next to start; None once
        it is not waiting. Each engine documents how exact it is."""
        ...

    # ---- models and health -----------------------------------------------------------
    def reload(self) -> ReloadReport:
        """Read the models file again and serve what it says now. Blocking: off the loop."""
        ...

    def readiness(self) -> tuple[bool, dict]:
        """(ready, /ready's JSON body)."""
        ...

    def unload_model(self, name: str, timeout_s: float = 300.0) -> bool:
        """Release the model's device memory (A1111's unload-checkpoint); True once done,
        False if still waiting for a running batch after `timeout_s`. Blocking: off the loop.
        An engine that cannot raises NotSupported (501)."""
        ...

    def load_model(self, name: str, timeout_s: float = 300.0) -> bool:
        """Load the model into device memory (A1111's reload-checkpoint); True once loaded,
        False if still loading after `timeout_s`, Unavailable (503) when loading failed.
        Blocking: off the loop. An engine that cannot raises NotSupported (501)."""
        ...
