"""Serve's request router for the generation deployment: the ingress picked the replica.

The ingress (app.cluster.dispatch) decides which replica runs each job and names it in the
call (JobCall.replica); this router, which Serve runs in the ingress's process for its
handle to the generation deployment, sends the call there. A call naming a replica the router
does not list (just started, Serve's list not updated yet; or gone), or naming none, goes to
the less loaded of two replicas at random (Serve's usual choice), and the replica's first
event tells the ingress where it ran. (Returning no replica to wait for the named one
left calls unrouted in tests.)
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def replica_name(replica: RunningReplica) -> str:
    """The name a replica gives itself (app.cluster.replica): Generator#<unique id>."""
    return f"{replica.replica_id.deployment_id.name}#{replica.replica_id.unique_id}"


def target_of(request: PendingRequest | None) -> str:
    if request is None or not request.args:
        return ""
    return getattr(request.args[0], "replica", "") or ""


class TargetRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        target = target_of(pending_request)
        if pending_request is not None:  # a replica that refused, or none found: back off
            pending_request.routing_context.should_backoff = True  # (else Serve retries at once)
        if target:
            for replica in candidate_replicas:
                if replica_name(replica) == target:
                    return [[replica]]
        if len(candidate_replicas) <= 2:
            return [list(candidate_replicas)]
        return [random.sample(candidate_replicas, 2)]
