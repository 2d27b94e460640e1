"""The generation deployment's Serve request router (stream/cluster.py): sessions stay on their replica."""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class SessionRouter(RequestRouter):
    """A request naming a replica (``replica=ID``: a session's holder) goes there; every other request goes to
    the replica with the fewest ongoing requests among those with room. Each session is one ongoing request
    (its stream, stream/replica.py) and every replica takes the same number, so that is the most free one.
    A named replica that is gone is not waited for: any replica answers (with a 404: no such session). An offer
    refused by a full replica (429) is offered once more elsewhere, with that replica in ``avoid``."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        wanted: Any = pending_request.kwargs.get("replica") if pending_request is not None else None
        if wanted:
            holder = [r for r in candidate_replicas if r.replica_id.unique_id == wanted]
            if holder:
                return [holder]
        # Replicas that just answered "full" for this offer go last. Within a rank the base class probes the
        # queue lengths and takes the shortest that is not full.
        avoid = set(pending_request.kwargs.get("avoid", ())) if pending_request is not None else set()
        first = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid]
        rest = [r for r in candidate_replicas if r.replica_id.unique_id in avoid]
        return [ranked for ranked in (first, rest) if ranked]
