"""The ingress of the Ray Serve application (stream/cluster.py): the page, signaling and the API, for many replicas.

It serves the page itself and hands every other request to a generation replica (stream/replica.py) through
Serve's handles: an offer that starts a session to the replica with the most free places (the request router,
stream/cluster.py), an offer that joins one and every ``/api/sessions/{id}...`` request to the replica holding
that session. It keeps the table of which replica holds which session (``GET /api/sessions`` shows it) and
follows each session's Serve stream, so when a replica's process dies it knows at once which sessions ended.

Routes besides the single server's (stream/server.py):

    GET /api/sessions/{id}/end?wait=S&key=K  waits up to S seconds (default 25, at most 60) for the session
                                       to end; {"session", "state": "running" | "closed" | "lost", "reason"}.
                                       The page polls it: a viewer of a replica that died learns it here, since
                                       the replica's own control channel died with it. With a token set it needs
                                       the token or the session's view or control key (else 401, also for ids
                                       that do not exist, as on one server).

The ingress holds no model and no media; run one replica of it. The table is in its memory: if the ingress
restarts, sessions keep streaming from their replicas, but joins to them, their listing and their per-client
count are lost until they end.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from framepack_rt.stream.replica import ForwardedRequest, ForwardedResponse
from framepack_rt.stream.security import SECURITY_HEADERS, SERVER_NAME, Access, static_files
from framepack_rt.stream.limits import LimitExceeded, PerClient
from framepack_rt.stream.server import RETRY_AFTER_S, STATIC_DIR, ServerSettings, end_wait_seconds, forwarded_client

log = logging.getLogger(__name__)

SESSION_PATH = re.compile(r"^/api/sessions/([^/]+)(/.*)?$")
ENDED_KEPT = 1000  # ended sessions remembered (their /end answer) after they end
OPEN_ATTEMPTS = 3  # replicas tried for a new session when one dies before answering


@dataclass
class HeldSession:
    """A session and the replica that holds it ({"id", "node", "pid"})."""

    id: str
    replica: dict[str, Any]
    keys: tuple[str, ...] = ()  # its view and control keys: either may wait on /end
    release: Callable[[], None] = lambda: None  # its starter's place among the sessions one address may hold
    started: float = field(default_factory=time.time)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    lost: bool = False

    @property
    def state(self) -> str:
        return "running" if not self.ended.is_set() else "lost" if self.lost else "closed"


class SessionTable:
    """Live sessions by id, and the last ENDED_KEPT ended ones (so a late /end still gets its reason)."""

    def __init__(self) -> None:
        self.live: dict[str, HeldSession] = {}
        self._ended: collections.OrderedDict[str, HeldSession] = collections.OrderedDict()
        self.lost_total = 0

    def add(self, session_id: str, replica: dict[str, Any], keys: tuple[str, ...] = (),
            release: Callable[[], None] = lambda: None) -> HeldSession:
        held = self.live[session_id] = HeldSession(session_id, replica, keys, release)
        return held

    def get(self, session_id: str) -> HeldSession | None:
        return self.live.get(session_id) or self._ended.get(session_id)

    def end(self, held: HeldSession, reason: str, lost: bool) -> None:
        held.reason, held.lost = reason, lost
        held.ended.set()
        held.release()
        self.live.pop(held.id, None)
        self._ended[held.id] = held
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        self.lost_total += lost

    def by_replica(self) -> dict[str, list[HeldSession]]:
        held: dict[str, list[HeldSession]] = {}
        for session in self.live.values():
            held.setdefault(session.replica["id"], []).append(session)
        return held


class ReplicaUnavailable(Exception):
    """No generation replica answered: the message says what to do."""


class ClusterIngress:
    """A Serve deployment class (stream/cluster.py deploys it). ``replicas``: the generation deployment's
    handle; ``settings``: the servers' settings, of which the ingress applies the token (on /end), the largest
    body, the sessions one address may hold in the whole cluster, and the trusted proxies (whose
    X-Forwarded-For names the client; each replica checks its own limits too)."""

    def __init__(self, replicas: Any, settings: ServerSettings) -> None:
        self.replicas = replicas
        self.max_request_bytes = settings.max_request_bytes
        self.trusted_proxies = frozenset(settings.trusted_proxies)
        self.access = Access(settings.token)
        self.table = SessionTable()
        # Sessions per address in the whole cluster, offers on their way included (taken before the offer goes).
        self.client_sessions = PerClient(settings.max_sessions_per_client, "sessions", RETRY_AFTER_S)
        self._static = static_files(STATIC_DIR)
        self._followers: set[asyncio.Task] = set()

    async def __call__(self, request: Request) -> Response:
        try:
            response = await self._route(request)
        except ReplicaUnavailable as exc:
            response = JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["Server"] = SERVER_NAME
        return response

    async def _route(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        if method == "GET" and path == "/":
            return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
        if method == "GET" and path.startswith("/static/"):
            file = self._static.get(path.removeprefix("/static/"))
            if file is None:
                return JSONResponse({"error": f"no file {path}"}, status_code=404)
            return FileResponse(file, headers={"Cache-Control": "no-cache"})
        body = await _read_capped(request, self.max_request_bytes)
        if body is None:
            return JSONResponse({"error": f"request body over {self.max_request_bytes} bytes"}, status_code=413)
        query = request.url.query
        forwarded = ForwardedRequest(method, path + (f"?{query}" if query else ""), dict(request.headers), body,
                                     self.client_address(request))
        match = SESSION_PATH.match(path)
        if method == "POST" and path == "/offer":
            return await self._offer(forwarded)
        if method == "GET" and path == "/api/sessions":
            return await self._list(forwarded)
        if match and match.group(2) == "/end" and method == "GET":
            return await self._wait_end(request, match.group(1))
        if match:
            held = self.table.live.get(match.group(1))
            holder = held.replica["id"] if held else None
            if match.group(2) == "/video.mp4" and method == "GET":  # large: passed on as it arrives
                return await self._forward_streamed(forwarded, holder)
            return await self._forward(forwarded, holder)
        if method == "GET" and path == "/api/health":
            return await self._health(forwarded)
        if method == "GET" and path == "/api/config":
            return await self._config(forwarded)
        if method == "GET" and path == "/metrics":
            return await self._metrics(forwarded)
        return await self._forward(forwarded)  # the default image, and the single server's 404s and 405s

    def client_address(self, request: Request) -> str:
        """The peer's address, or behind a trusted proxy (--trusted-proxy) the one it appended to
        X-Forwarded-For: as the single server decides (StreamServer.client_address)."""
        return forwarded_client(request.client.host if request.client else "",
                                request.headers.get("x-forwarded-for", ""), self.trusted_proxies)

    # -- sessions --------------------------------------------------------------------------------------------
    async def _offer(self, forwarded: ForwardedRequest) -> Response:
        joining = _session_named(forwarded.body)
        if joining is not None:  # a join: to the replica holding it (unknown: any replica says 404, or 401)
            held = self.table.live.get(joining)
            return await self._forward(forwarded, held.replica["id"] if held else None)
        try:
            release = self.client_sessions.take(forwarded.client)  # held while the offer is out, too
        except LimitExceeded as exc:
            return JSONResponse({"error": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)})
        try:
            stream, first = await self._open(forwarded)
        except BaseException:
            release()
            raise
        if first["session"] is None:  # refused: no session holds the place
            release()
        else:
            answer = json.loads(first["response"].body)
            keys = tuple(k for k in (answer.get("view_key"), answer.get("control_key")) if k)
            held = self.table.add(first["session"], first["replica"], keys, release)
            task = asyncio.get_running_loop().create_task(self._follow(stream, held))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)
            log.info("session %s on replica %s", held.id, held.replica["id"])
        return _response(first["response"])

    async def _open(self, forwarded: ForwardedRequest) -> tuple[Any, dict[str, Any]]:
        """(the session's Serve stream, its first item: the answer). A replica that died before answering has
        made no session: the offer goes to another (the router has learned of the death from the failure). One
        that answered "full" (429, as its queue looked shorter than a replica with room) is avoided next time."""
        avoid: tuple[str, ...] = ()
        failure: Exception | None = None
        for attempt in range(OPEN_ATTEMPTS):
            stream = self.replicas.options(stream=True).open_session.remote(forwarded, avoid=avoid)
            try:
                first = await stream.__anext__()
            except Exception as exc:  # noqa: BLE001 -- a replica died or none is up
                log.warning("offer not taken by a replica, attempt %d", attempt + 1, exc_info=exc)
                failure = exc
                continue
            if first["response"].status != 429 or first["replica"]["id"] in avoid:
                return stream, first
            avoid += (first["replica"]["id"],)
            failure = None
            full = (stream, first)
        if failure is None:
            return full  # every replica tried is full: their 429
        raise ReplicaUnavailable(f"no generation replica could take the session ({type(failure).__name__}); "
                                 "try again in a moment") from failure

    async def _follow(self, stream: Any, held: HeldSession) -> None:
        """Wait for the session's end on its replica's stream; a broken stream means the replica is gone."""
        reason = "closed"
        try:
            async for item in stream:
                reason = item.get("ended", reason)
        except Exception as exc:  # noqa: BLE001 -- the replica's process died or cannot be reached
            replica = held.replica
            self.table.end(held, f"the generation replica holding this session stopped (replica {replica['id']} on "
                                 f"{replica['node']}: {type(exc).__name__}); start a new session", lost=True)
            log.warning("session %s lost with replica %s", held.id, replica["id"], exc_info=exc)
            return
        self.table.end(held, reason, lost=False)

    async def _wait_end(self, request: Request, session_id: str) -> Response:
        held = self.table.get(session_id)
        key = request.query_params.get("key", "")
        if self.access.required and not self.access.has_token(request) and not (
                held is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in held.keys)):
            return JSONResponse({"error": "this needs the server token or the session's key (?key=, from the join "
                                          "link or the offer's answer)"}, status_code=401)
        if held is None:
            return JSONResponse({"error": f"no session {session_id!r}; GET /api/sessions lists the live ones"},
                                status_code=404)
        try:
            timeout = end_wait_seconds(request.query_params.get("wait"))
        except ValueError:
            return JSONResponse({"error": "wait must be a number of seconds"}, status_code=400)
        try:
            await asyncio.wait_for(held.ended.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return JSONResponse({"session": held.id, "state": held.state, "reason": held.reason,
                             "replica": held.replica["id"]})

    async def _list(self, forwarded: ForwardedRequest) -> Response:
        """Every replica's sessions, each with the replica that holds it."""
        holders = self.table.by_replica()
        if not holders:
            return await self._forward(forwarded)  # an empty list (or the token's 401) from any replica
        listed: list[dict[str, Any]] = []
        for replica_id, held in holders.items():
            answer = await self._forward(forwarded, replica_id)
            if answer.status_code != 200:
                return answer
            info = held[0].replica
            ours = {s.id for s in held}
            listed += [{**s, "replica": info} for s in json.loads(answer.body)["sessions"] if s["id"] in ours]
        return JSONResponse({"sessions": listed})

    # -- the rest of the API ---------------------------------------------------------------------------------
    async def _health(self, forwarded: ForwardedRequest) -> Response:
        answer = await self._forward(forwarded)
        if answer.status_code != 200:
            return answer
        holders = self.table.by_replica()
        return JSONResponse({**json.loads(answer.body), "sessions": len(self.table.live),
                             "cluster": {"sessions_by_replica": {r: len(s) for r, s in holders.items()},
                                         "sessions_lost": self.table.lost_total}})

    async def _config(self, forwarded: ForwardedRequest) -> Response:
        answer = await self._forward(forwarded)
        if answer.status_code != 200:
            return answer
        return JSONResponse({**json.loads(answer.body), "cluster": True})

    async def _metrics(self, forwarded: ForwardedRequest) -> Response:
        """Each replica that holds sessions, labelled replica="ID" (any one when none does), and the table's."""
        live = self.table.by_replica()
        parts = []
        for replica_id in list(live) or [None]:
            answer = await self._forward(forwarded, replica_id)
            if answer.status_code != 200:
                return answer
            parts.append(relabel(answer.body.decode(), replica_id or "any"))
        own = ["# HELP framepack_cluster_sessions Live sessions per generation replica.",
               "# TYPE framepack_cluster_sessions gauge"]
        own += [f'framepack_cluster_sessions{{replica="{r}"}} {len(s)}' for r, s in live.items()]
        own += ["# HELP framepack_cluster_sessions_lost_total Sessions ended because their replica stopped.",
                "# TYPE framepack_cluster_sessions_lost_total counter",
                f"framepack_cluster_sessions_lost_total {self.table.lost_total}"]
        return Response(merge_metrics(parts + ["\n".join(own) + "\n"]),
                        headers={"Content-Type": answer.headers.get("content-type", "text/plain")})

    async def _forward_streamed(self, forwarded: ForwardedRequest, replica_id: str | None) -> Response:
        """A download, chunk by chunk: neither the replica nor the ingress holds the whole file."""
        stream = self.replicas.options(stream=True).forward_stream.remote(forwarded, replica=replica_id)
        try:
            head = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001 -- the replica died while answering
            raise _no_answer(forwarded, exc) from exc
        return StreamingResponse(_rest(stream), status_code=head.status, headers=dict(head.headers))

    async def _forward(self, forwarded: ForwardedRequest, replica_id: str | None = None) -> Response:
        try:
            answer = await self.replicas.forward.remote(forwarded, replica=replica_id)
        except Exception as exc:  # noqa: BLE001 -- the replica died while answering
            raise _no_answer(forwarded, exc) from exc
        return _response(answer)


def _no_answer(forwarded: ForwardedRequest, exc: Exception) -> ReplicaUnavailable:
    """Logged with its cause (the path without its query: keys stay out of logs); the 503 the caller gets."""
    log.warning("a replica did not answer %s %s", forwarded.method, forwarded.path.split("?")[0], exc_info=exc)
    return ReplicaUnavailable(f"the generation replica did not answer ({type(exc).__name__}); try again in a moment")


async def _rest(stream: Any) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield chunk


def _response(answer: ForwardedResponse) -> Response:
    headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-length"}
    return Response(answer.body, status_code=answer.status, headers=headers)


def _session_named(body: bytes) -> str | None:
    """The "session" an offer joins; None for a new session (or a body the replica will refuse with a 400)."""
    try:
        named = json.loads(body).get("session")
    except (ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named else None


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (read no further)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def relabel(text: str, replica: str) -> str:
    """Prometheus text with ``replica="ID"`` added to every sample."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            if "{" in line:  # name{labels} value: label values may hold spaces, so split at the brace
                base, labels = line.split("{", 1)
                line = f'{base}{{replica="{replica}",{labels}'
            else:
                name, _, value = line.partition(" ")
                line = f'{name}{{replica="{replica}"}} {value}'
        out.append(line)
    return "\n".join(out) + "\n"


def merge_metrics(parts: list[str]) -> str:
    """Several exposition texts as one: each metric's HELP and TYPE once, its samples together."""
    order: list[str] = []
    comments: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = collections.defaultdict(list)
    for text in parts:
        current = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split()[2]
                if current not in comments:
                    order.append(current)
                    comments[current] = []
                if line not in comments[current]:
                    comments[current].append(line)
            elif line:
                if current not in comments:  # samples before any HELP/TYPE line
                    order.append(current)
                    comments[current] = []
                samples[current].append(line)
    return "".join("\n".join(comments[m] + samples[m]) + "\n" for m in order)
