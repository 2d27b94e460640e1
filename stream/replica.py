"""One generation replica of the Ray Serve application (stream/cluster.py): a device group and its sessions.

A replica is the single-machine server, whole: it loads the pipeline on its device, runs a
:class:`~framepack_rt.stream.server.StreamServer` (sessions, the device worker, limits, tokens, recordings)
and each session's aiortc peers, so media goes from this replica's host straight to the viewers; with
``sequence_parallel`` N it runs ``serve --sequence-parallel N``'s workers instead, rank 0 serving. Its HTTP API
listens on loopback only: the ingress (stream/ingress.py) reaches the replica through Serve's handles, and the
replica hands each request to its own server, with the viewer's address in X-Forwarded-For.

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
import threading
from typing import Any, AsyncIterator

import aiohttp

from framepack_rt.stream.cluster import ClusterSettings
from framepack_rt.stream.server import ServerSettings, StreamServer, load_pipeline

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
WORLD_START_S = 600.0  # a replica's worker processes load the model (the 13B: minutes) before rank 0 serves
STOP_S = 60.0
STREAM_CHUNK = 1 << 20  # a download's pieces through Serve's object store
END_POLL_GIVE_UP_S = 30.0  # a replica's own server unreachable this long: its sessions are reported lost
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
    """The replica server's answer: status, the headers worth passing on, the body."""

    status: int
    headers: dict[str, str]
    body: bytes


class GenerationReplica:
    """A Serve deployment class (stream/cluster.py deploys it): one device group's sessions.

    ``settings``: the server's settings (model, limits, token, TURN); ``cluster``: where viewers' connections go
    (``media_host``: "node" takes this Ray node's address, else as given; 127.0.0.1 keeps a local cluster on
    loopback) and the replica's workers (``sequence_parallel`` > 1: a world of that many processes, one GPU
    each, with rank 0 serving; commands/parallel.py).
    """

    async def __init__(self, settings: ServerSettings, cluster: ClusterSettings) -> None:
        import ray
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        node = ray.util.get_node_ip_address()
        self.info = {"id": self.replica_id, "node": node, "pid": os.getpid()}
        media = [node if cluster.media_host == "node" else cluster.media_host]
        # The ingress is this process: the server trusts its X-Forwarded-For and exempts it from per-address caps.
        settings = dataclasses.replace(settings, trusted_proxies=(LOOPBACK,))
        self._http = aiohttp.ClientSession(auto_decompress=False)
        self._own = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._server: StreamServer | None = None
        self._world: ReplicaWorld | None = None
        if cluster.sequence_parallel > 1 or cluster.cfg_parallel:
            self._world = ReplicaWorld(settings, cluster, media)
            self.url = await self._world.wait_ready(self._http)
        else:
            pipe = await asyncio.get_running_loop().run_in_executor(None, load_pipeline, settings)
            self._server = StreamServer(pipe, settings)
            self.url = await self._server.start(LOOPBACK, 0, media_hosts=media)
        log.info("replica %s (pid %d) serves on %s, media on %s", self.replica_id, os.getpid(), self.url, media[0])

    async def forward(self, request: ForwardedRequest, replica: str | None = None) -> ForwardedResponse:
        """Answer ``request`` with this replica's server. ``replica``: the replica the ingress wants (read by
        the request router, stream/cluster_router.py; when that one is gone any replica answers, with a 404)."""
        async with self._send(request) as resp:
            return ForwardedResponse(resp.status, _kept(resp), await resp.read())

    async def forward_stream(self, request: ForwardedRequest, replica: str | None = None) -> AsyncIterator[Any]:
        """``forward`` for large answers (a session's video.mp4), as a Serve stream: the status and headers
        first (a ForwardedResponse with an empty body), then the body in STREAM_CHUNK pieces."""
        async with self._send(request) as resp:
            yield ForwardedResponse(resp.status, _kept(resp), b"")
            async for chunk in resp.content.iter_chunked(STREAM_CHUNK):
                yield chunk

    def _send(self, request: ForwardedRequest) -> Any:
        """``request`` to this replica's server (an aiohttp response context), with the viewer's address."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
        headers["X-Forwarded-For"] = request.client
        return self._http.request(request.method, self.url.rstrip("/") + request.path, data=request.body,
                                  headers=headers, allow_redirects=False)

    async def open_session(self, request: ForwardedRequest, avoid: tuple[str, ...] = ()) -> AsyncIterator[dict[str, Any]]:
        """Start a session from an offer (a Serve stream). Yields the answer {"response", "replica", "session"}
        at once, then, when the session has ended, {"ended": reason}. A refused offer yields its answer only.
        ``avoid``: replicas that refused it as full (read by the request router)."""
        response = await self.forward(request)
        session = json.loads(response.body).get("session") if response.status == 200 else None
        yield {"response": response, "replica": self.info, "session": session}
        if session is not None:
            yield {"ended": await self._wait_end(session)}

    async def _wait_end(self, session: str) -> str:
        """Why ``session`` ended, once it has (the server's long poll, GET /api/sessions/ID/end). A poll that
        fails is asked again: only a server that stays unreachable for END_POLL_GIVE_UP_S ends the wait."""
        url = f"{self.url.rstrip('/')}/api/sessions/{session}/end?wait=60"
        failing_since: float | None = None
        while True:
            try:
                async with self._http.get(url, headers=self._own) as resp:
                    if resp.status == 404:  # ended and forgotten between two polls
                        return "closed"
                    resp.raise_for_status()
                    answer = await resp.json()
                if answer["state"] != "running":
                    return answer["reason"]
                failing_since = None
            except (aiohttp.ClientError, ValueError, KeyError) as exc:
                now = asyncio.get_running_loop().time()
                failing_since = failing_since or now
                if now - failing_since > END_POLL_GIVE_UP_S:
                    raise RuntimeError(f"this replica's server stopped answering about session {session}") from exc
                await asyncio.sleep(1.0)

    def check_health(self) -> None:
        """Serve's health check: a replica whose device worker (or worker world) stopped is replaced."""
        if self._server is not None and not self._server.worker.alive:
            raise RuntimeError(f"replica {self.replica_id}: the device worker stopped; the replica log has why")
        if self._world is not None and not self._world.alive:
            raise RuntimeError(f"replica {self.replica_id}: its worker processes stopped: {self._world.error}")

    async def __del__(self) -> None:
        """Serve's shutdown of this replica: hang up on its viewers, end the workers."""
        if self._server is not None:
            await self._server.stop()
        if self._world is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._world.close)
        await self._http.close()


def _kept(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The response headers worth passing on to the viewer."""
    return {k: v for k, v in resp.headers.items() if k.lower() in RESPONSE_HEADERS}


class ReplicaWorld:
    """A replica's worker processes for one stream (commands/parallel.py's serve on N workers): rank 0 runs the
    server on a loopback port, the others follow its transformer calls. The launch runs on a thread of the
    replica; the workers take the replica's GPUs (Ray sets CUDA_VISIBLE_DEVICES), worker r on cuda:r."""

    def __init__(self, settings: ServerSettings, cluster: ClusterSettings, media: list[str]) -> None:
        from framepack_rt.commands.parallel import launch_device, parallel_serve_settings, serve_worker
        from framepack_rt.pipeline.parallel_launch import LaunchConfig, free_port, launch

        settings = parallel_serve_settings(settings, announce=log.info)
        config = LaunchConfig(cluster.sequence_parallel, cluster.cfg_parallel, launch_device(settings.device),
                              cluster.parallel_timeout)
        self.url = f"http://{LOOPBACK}:{free_port(LOOPBACK)}/"
        port = int(self.url.rsplit(":", 1)[1].strip("/"))
        self._stop = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                launch(serve_worker, config, settings, LOOPBACK, port, config.timeout_s, media, stop=self._stop)
            except BaseException as exc:  # noqa: BLE001 -- kept for the health check and wait_ready
                self.error = exc

        self._thread = threading.Thread(target=run, name="framepack-replica-world", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = WORLD_START_S) -> str:
        """The server's URL once rank 0 answers; RuntimeError if the world failed or took too long."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if not self.alive:
                raise RuntimeError(f"the replica's worker processes failed: {self.error}")
            try:
                async with http.get(self.url + "api/health") as resp:
                    if resp.status == 200:
                        return self.url
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, self.close)
        raise RuntimeError(f"the replica's worker processes did not start serving within {timeout_s:.0f} s")

    def close(self) -> None:
        """Stop the workers (rank 0 first: its server hangs up on its viewers)."""
        self._stop.set()
        self._thread.join(STOP_S)
