"""What crosses between the ingress and a generation replica, as plain values: the job the
ingress sends (JobCall), and the job's events and errors the replica sends back.

The job keeps its id on both sides: the ingress made it and gave it to the client, and the
replica's engine job takes it from the call, so the replica's log lines and error messages
("internal error while generating (job ...)") name the id the client has.

A CraftError subclass does not survive pickling with its own constructor (InvalidParameter
takes three arguments, its args hold one), and an exception raised in a replica would reach
the ingress wrapped in Ray's error types. So a replica yields its job's events, the last one
`done` (the JobResult) or `error` (this module's dict), and the ingress rebuilds an error that
renders exactly as it did in the replica: same status, message, kind, field and headers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.errors import CraftError, Unavailable

if TYPE_CHECKING:
    from app.engine.engine import Engine
    from app.engine.jobs import GenParams, Job

# Events a replica yields for one job, in order: STARTED once a worker took it (payload: the
# replica's name), PROGRESS (steps done), PREVIEW ((step, (h, w, 3) uint8 tensor)), then
# DONE (JobResult) or ERROR (error_to_wire's dict).
STARTED, PROGRESS, PREVIEW, DONE, ERROR = "started", "progress", "preview", "done", "error"


@dataclass(frozen=True)
class JobCall:
    """One job as the ingress sends it to a replica (the argument of the replica's `run`).
    Ray pickles it whole: `params` keeps the job's own pictures, its init picture (Source) and
    its ControlNet units' control images (ControlImages), so the replica needs no other copy."""

    job_id: str  # the id the client was given
    params: GenParams
    client: str  # the key's label
    preview_every: int
    watched: bool  # someone follows its steps: report them every 0.1 s
    deadline_s: float  # what is left of its queue deadline when sent
    replica: str = ""  # the replica the ingress chose (app.cluster.router sends it there)

    @classmethod
    def of(cls, job: Job, replica: str = "") -> JobCall:
        """The call for an ingress job, its deadline counted from now."""
        return cls(job_id=job.id, params=job.params, client=job.client,
                   preview_every=job.preview_every, watched=job.watched,
                   deadline_s=job.expires_at - time.monotonic(), replica=replica)

    def submit_to(self, engine: Engine) -> Job:
        """The replica's side: queue the job in its engine, under the ingress's id."""
        job = engine.submit(self.params, self.client, deadline_s=max(0.0, self.deadline_s),
                            job_id=self.job_id)
        job.preview_every = self.preview_every
        job.watched = self.watched
        return job


def error_to_wire(exc: CraftError) -> dict[str, Any]:
    return {
        "status": exc.status,
        "message": exc.message,
        "kind": exc.kind,
        "field": getattr(exc, "field", None),
        "headers": dict(exc.headers),
        "retry_after": getattr(exc, "retry_after", None),
    }


def error_from_wire(data: dict[str, Any]) -> CraftError:
    """The replica's error as a CraftError with the same status, message, kind, field and
    headers (a 503 as Unavailable, so its Retry-After is kept)."""
    if data["status"] == 503:
        error: CraftError = Unavailable(data["message"], retry_after=data.get("retry_after") or 5,
                                        kind=data["kind"])
    else:
        error = CraftError(data["message"], headers=data.get("headers") or {}, kind=data["kind"])
        error.status = int(data["status"])
    if data.get("field"):
        error.field = data["field"]  # type: ignore[attr-defined]
    return error
