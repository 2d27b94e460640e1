"""One generation replica of the Ray Serve application (stream/cluster.py): a device group and its sessions.

A replica is the single-machine server, whole: it loads the pipeline on its device, runs a
:class:`~framepack_rt.stream.server.StreamServer` (sessions, the device worker, limits, tokens, recordings)
and each session's aiortc peers, so media goes from this replica's host straight to the viewers. Its HTTP API
listens on loopback only, for this process: the ingress (stream/ingress.py) reaches the replica through Serve's
handles, and the replica hands each request to its own server, with the viewer's address in X-Forwarded-For.

A session started here is one long Serve request (:meth:`GenerationReplica.open_session`, a stream): its first
item is the offer's answer, its last says why the session ended. So Serve counts a replica's sessions as its
ongoing requests (autoscaling on sessions per replica is Serve's own), and when this process dies the ingress
learns it from the broken stream at once and tells those sessions' viewers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from typing import Any, AsyncIterator

import aiohttp

from framepack_rt.stream.server import ServerSettings, StreamServer, load_pipeline

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Headers a forwarded request keeps, each way; everything else (hop-by-hop, Host, cookies) stays behind.
REQUEST_HEADERS = ("authorization", "content-type", "range")
RESPONSE_HEADERS = ("content-type", "retry-after", "content-disposition", "x-frames", "cache-control",
                    "content-length", "www-authenticate")


@dataclasses.dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress received it: what the replica's server needs to answer it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes
    client: str  # the viewer's address (per-client limits, logs)


@dataclasses.dataclass(frozen=True)
class ForwardedResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class GenerationReplica:
    """A Serve deployment class (stream/cluster.py deploys it): one device group's sessions.

    ``settings``: the server's settings (model, limits, token, TURN); ``media_host``: the address viewers'
    connections go to (ICE host candidates): 127.0.0.1 keeps a local cluster on loopback, "node" takes this
    Ray node's address, anything else is used as given.
    """

    async def __init__(self, settings: ServerSettings, media_host: str = "node") -> None:
        import ray
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        node = ray.util.get_node_ip_address()
        self.info = {"id": self.replica_id, "node": node, "pid": os.getpid()}
        loop = asyncio.get_running_loop()
        pipe = await loop.run_in_executor(None, load_pipeline, settings)
        # The ingress is this process: trust its X-Forwarded-For, and exempt it from per-address caps.
        self.server = StreamServer(pipe, dataclasses.replace(settings, trusted_proxies=(LOOPBACK,)))
        media = [node if media_host == "node" else media_host]
        self.url = await self.server.start(LOOPBACK, 0, media_hosts=media)
        self._http = aiohttp.ClientSession(auto_decompress=False)
        log.info("replica %s (pid %d) serves on %s, media on %s", self.replica_id, os.getpid(), self.url, media[0])

    async def forward(self, request: ForwardedRequest, replica: str | None = None) -> ForwardedResponse:
        """Answer ``request`` with this replica's server. ``replica``: the replica the ingress wants (read by
        the request router, stream/cluster.py; when that one is gone any replica answers, with a 404)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
        headers["X-Forwarded-For"] = request.client
        async with self._http.request(request.method, self.url.rstrip("/") + request.path, data=request.body,
                                      headers=headers, allow_redirects=False) as resp:
            body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() in RESPONSE_HEADERS}
            return ForwardedResponse(resp.status, kept, body)

    async def open_session(self, request: ForwardedRequest, avoid: tuple[str, ...] = ()) -> AsyncIterator[dict[str, Any]]:
        """Start a session from an offer (a Serve stream). Yields the answer {"response", "replica", "session"}
        at once, then, when the session has ended, {"ended": reason}. A refused offer yields its answer only.
        ``avoid``: replicas that refused it as full (read by the request router)."""
        response = await self.forward(request)
        session = None
        if response.status == 200:
            session = self.server.sessions.get(json.loads(response.body).get("session", ""))
        yield {"response": response, "replica": self.info, "session": session.id if session else None}
        if session is not None:
            yield {"ended": await session.wait_closed()}

    def check_health(self) -> None:
        """Serve's health check: a replica whose device worker stopped is replaced."""
        if not self.server.worker.alive:
            raise RuntimeError(f"replica {self.replica_id}: the device worker stopped")

    async def __del__(self) -> None:
        """Serve's shutdown of this replica: hang up on its viewers, end the worker."""
        await self.server.stop()
        await self._http.close()
