"""What crosses from a generation replica to the ingress: job events and errors as plain values.

A CraftError subclass does not survive pickling with its own constructor (InvalidParameter
takes three arguments, its args hold one), and an exception raised in a replica would reach
the ingress wrapped in Ray's error types. So a replica yields its job's events, the last one
`done` (the JobResult) or `error` (this module's dict), and the ingress rebuilds an error that
renders exactly as it did in the replica: same status, message, kind, field and headers.
"""

from __future__ import annotations

from typing import Any

from app.errors import CraftError, Unavailable

# Events a replica yields for one job, in order: STARTED once a worker took it (payload: the
# replica's name), PROGRESS (steps done), PREVIEW ((step, (h, w, 3) uint8 tensor)), then
# DONE (JobResult) or ERROR (error_to_wire's dict).
STARTED, PROGRESS, PREVIEW, DONE, ERROR = "started", "progress", "preview", "done", "error"


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
