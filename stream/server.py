"""The HTTP side of ``framepack-rt serve``: the page, signaling (``POST /offer``) and the JSON API.

Routes::

    GET  /                   the browser page (stream/static/index.html)
    GET  /static/...         its JS and CSS
    POST /offer              {sdp, type, session?, key?, token?, prompt?, image? (data URL), seed?}
                             -> {sdp, type, session, role, view_key (control role only)}
    GET  /api/sessions       [{id, prompt, sections_done, viewers, state, ...}]
    GET  /api/sessions/{id}  one session with its current stats
    GET  /api/sessions/{id}/stamps?since=N  send times of stamped frames (with ``--stamp``; benchmarks)
    GET  /api/health         liveness, model, counts
    GET  /api/config         defaults the page shows (prompt, fps, steps)
    GET  /api/default-image  the built-in start image (PNG)
    GET  /metrics            Prometheus text format (stream/metrics.py); needs the token when one is set

Without ``session`` an offer starts a new generation session (from the image and prompt sent, or the built-in
scene and prompt); with it, the offer joins that session as one more viewer of the same generator. The
session runs its encoders only once a viewer's connection is up, and closes at ``--connect-timeout`` if none
comes up. Before aiortc sees an offer, its media sections are counted and its candidates filtered
(:mod:`.candidates`); ICE follows ``--host`` and the network flags (:mod:`.ice`).

Who may do what (the token, roles, join links): :mod:`.security`. Limits and their status codes:
:mod:`.limits` -- 400 malformed input, 401 no valid token or key (and, with a token set, an unknown session:
the same answer), 404 no such session or file, 408 a request too slow, 413 too many bytes, 415 an offer not
sent as application/json, 429 at a capacity (sessions, viewers, per-client limits; with Retry-After), 431
headers too large, 503 too many connections or shutting down. Connections: :mod:`.connections`; logs:
:mod:`.logs`. Other 5xx answers are faults of the server, logged with a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from framepack_rt.stream import DEFAULT_MODEL
from framepack_rt.stream.buffer import rgb_to_yuv420
from framepack_rt.stream.generation import DeviceWorker
from framepack_rt.stream import ice
from framepack_rt.stream.candidates import CandidatePolicy, check_offer
from framepack_rt.stream.connections import ConnectionGuard, ConnectionLimits, GuardedSite
from framepack_rt.stream.images import DEFAULT_PROMPT, default_scene, png_bytes, resize_rgb
from framepack_rt.stream.limits import (
    CONTROL_SLOTS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_PENDING_PER_CLIENT, MAX_SESSIONS, MAX_SESSIONS_PER_CLIENT,
    LimitExceeded, PerClient, Reservations, SessionPolicy, TooLarge)
from framepack_rt.stream.logs import RejectionLog
from framepack_rt.stream.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from framepack_rt.stream.metrics import ServerMetrics
from framepack_rt.stream.offers import MAX_SDP_CHARS, Offer, parse_json_body, parse_offer
from framepack_rt.stream.security import (
    CONTROL, JOIN_REFUSED, Access, Unauthorized, add_security_headers, check_token, json_errors, static_files)
from framepack_rt.stream.session import Session
from framepack_rt.stream.stamp import StampLog
from framepack_rt.stream.uploads import decode_start_image

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER_S = 10  # what a 429 tells clients to wait: sessions and viewers come and go on that scale
_POLICY = SessionPolicy()  # the per-session defaults, in one place
_CONNECTIONS = ConnectionLimits()
TOKEN_HINT = "FRAMEPACK_RT_TOKEN (or --token)"


@dataclass
class ServerSettings:
    """How sessions generate and play. ``steps``/``teacache``/``cfg`` None: the pipeline's defaults."""

    model: str = DEFAULT_MODEL
    fps: float = 30.0
    window: int = 9
    steps: int | None = None
    teacache: float | None = None
    cfg: float | None = None  # real classifier-free guidance scale (1: off)
    mode: str = "f1"  # live streams go forward; "inverted" builds fixed-length clips end-first
    buffer_seconds: float = 2.0  # bounded buffer: at most this much generated video waits to be played
    # Limits (see limits.py and the README): capacity, input sizes, how long unused things live.
    max_sessions: int = MAX_SESSIONS
    max_viewers: int = _POLICY.max_viewers  # per session
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_prompt_chars: int = _POLICY.max_prompt_chars
    message_rate: float = _POLICY.message_rate  # control messages a second per viewer (bursts of twice that)
    grace: float = _POLICY.grace  # a session without viewers stops generating at once, closes after this long
    idle_timeout: float = _POLICY.idle_timeout  # generating nothing (paused, stopped, ended) this long: closed
    connect_timeout: float = _POLICY.connect_timeout  # a viewer whose connection is not up by then is dropped
    viewer_timeout: float = _POLICY.viewer_timeout  # silent (no RTCP receiver reports) this long: dropped
    token: str | None = field(default=None, repr=False)  # needed for /offer and control (security.py)
    ice_servers: list[str] = field(default_factory=list)  # --ice-server URLs, e.g. ["stun:stun.example.org"]
    default_prompt: str | None = None  # None: the model's example prompt (the demo's), else images.DEFAULT_PROMPT
    stamp: bool = False  # benchmarks: frame numbers in the pixels' top rows + send times (stream/stamp.py)
    # Where and how the model loads (framepack_rt.pipeline.devices): --device, --dtype, --low-vram,
    # --memory-budget-gb, --quantize, --compile.
    device: str = "auto"
    dtype: str = "auto"
    low_vram: bool = False
    memory_budget_gb: float | None = None
    quantize: str | None = None
    compile: bool = False
    # Real networks (stream/ice.py): TURN credentials (from the environment), a 1:1 NAT's public address,
    # the UDP ports viewers' connections use, and whether clients' *.local (mDNS) candidates are resolved.
    turn_username: str | None = field(default=None, repr=False)
    turn_credential: str | None = field(default=None, repr=False)
    public_ip: str | None = None
    udp_ports: tuple[int, int] | None = None
    allow_mdns: bool = False
    # Per client (address; behind --trusted-proxy the X-Forwarded-For one): sessions started and offers whose
    # connection is not up yet. With a token, view-key viewers leave control_slots of each session free.
    max_sessions_per_client: int = MAX_SESSIONS_PER_CLIENT
    max_pending_per_client: int = MAX_PENDING_PER_CLIENT
    control_slots: int = CONTROL_SLOTS
    trusted_proxies: tuple[str, ...] = ()
    # HTTP connections (stream/connections.py): caps in total and per address, read deadlines, keep-alive.
    max_connections: int = _CONNECTIONS.max_connections
    max_connections_per_client: int = _CONNECTIONS.max_per_client
    header_timeout: float = _CONNECTIONS.header_timeout
    body_timeout: float = _CONNECTIONS.body_timeout
    keepalive_timeout: float = _CONNECTIONS.keepalive_timeout

    def __post_init__(self) -> None:
        if not 0 < self.fps <= 60:
            raise ValueError(f"--fps {self.fps}: must be in (0, 60] (the encoders cap at 30)")
        if self.window < 1:
            raise ValueError(f"--window {self.window}: must be at least 1 latent frame")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be at least 1")
        if self.mode != "f1":
            raise ValueError(f"mode {self.mode!r}: live streaming plays sections as they come, which only "
                             "F1 (forward) generates in playback order; use mode 'f1'")
        if self.buffer_seconds <= 0:
            raise ValueError(f"buffer of {self.buffer_seconds} s: must be positive")
        if self.max_sessions < 1:
            raise ValueError(f"--max-sessions {self.max_sessions}: must be at least 1")
        for name in ("max_sessions_per_client", "max_pending_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.control_slots < 0:
            raise ValueError(f"--control-slots {self.control_slots}: must be 0 or more")
        self.trusted_proxies = tuple(self.trusted_proxies)
        self.connection_limits()  # validates them
        if self.max_image_bytes < 1024 or self.max_image_pixels < 64:
            raise ValueError("--max-image-mb and --max-image-pixels: too small for any start image")
        self.session_policy()  # validates the per-session limits
        check_token(self.token)
        ice.ice_servers(self.ice_servers, self.turn_username, self.turn_credential)  # validates the URLs
        if self.public_ip is not None:
            self.public_ip = ice.parse_public_ip(self.public_ip)
        if self.udp_ports is not None:
            self.udp_ports = ice.parse_port_range(f"{self.udp_ports[0]}-{self.udp_ports[1]}")

    def session_policy(self) -> SessionPolicy:
        return SessionPolicy(max_viewers=self.max_viewers, grace=self.grace, idle_timeout=self.idle_timeout,
                             connect_timeout=self.connect_timeout, viewer_timeout=self.viewer_timeout,
                             message_rate=self.message_rate, message_burst=max(1, round(2 * self.message_rate)),
                             max_prompt_chars=self.max_prompt_chars)

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.max_connections, self.max_connections_per_client, self.header_timeout,
                                self.body_timeout, self.keepalive_timeout)

    @property
    def view_slots(self) -> int:
        """With a token set, view-key viewers are let in while fewer viewers than this watch a session: the
        last ``control_slots`` places stay free for viewers with control."""
        return max(1, self.max_viewers - self.control_slots)

    @property
    def max_request_bytes(self) -> int:
        """The largest body /offer reads: a maximal start image as base64 text, plus the SDP and fields."""
        return (self.max_image_bytes + 2) // 3 * 4 + MAX_SDP_CHARS + 3 * self.max_prompt_chars + 4096

    @property
    def buffer_frames(self) -> int:
        return max(1, round(self.buffer_seconds * self.fps))


class StreamServer:
    """The aiohttp application, its sessions, the device worker and the control thread."""

    def __init__(self, pipe: Any, settings: ServerSettings | None = None) -> None:
        self.pipe = pipe
        self.settings = settings or ServerSettings()
        self.sessions: dict[str, Session] = {}
        self.device = _device_name(pipe)
        self.worker = DeviceWorker(self.device)
        # One control thread, so prompt changes and pause/resume reach the pipeline in the order sent.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framepack-control")
        self.access = Access(self.settings.token)
        self._starting = Reservations()  # sessions being built count against max_sessions too
        s = self.settings
        self._client_sessions = PerClient(s.max_sessions_per_client, "sessions", RETRY_AFTER_S)
        self._pending = PerClient(s.max_pending_per_client, "offers whose connection is not up yet", RETRY_AFTER_S)
        self._owned: dict[str, Callable[[], None]] = {}  # session id -> release of its creator's place
        self._tasks: set[asyncio.Task] = set()  # sessions waiting for their first connection
        self._stopping = False
        self._static = static_files(STATIC_DIR)
        self.connections: ConnectionGuard | None = None  # open HTTP connections, once listening
        self.metrics = ServerMetrics(sessions=lambda: len(self.sessions), viewers=lambda: self.peer_connections,
                                     connections=lambda: self.connections.total if self.connections else 0,
                                     device=self.device)
        self.rejections = RejectionLog(log, on_reject=self.metrics.reject)  # one line each, rate-limited
        self.app = self._build_app()
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._log_flusher: asyncio.Task | None = None
        self._default_png: bytes | None = None
        self._ice_servers = ice.ice_servers(self.settings.ice_servers, self.settings.turn_username,
                                            self.settings.turn_credential)
        self.ice_policy = self._make_ice_policy(["127.0.0.1"])  # until start() knows the bound addresses
        # The model's own example (the demo model knows only its world of shapes), else the landscape.
        example = getattr(pipe, "example", None)
        self.default_image = example[0] if example else default_scene()
        self.default_prompt = self.settings.default_prompt or (example[1] if example else DEFAULT_PROMPT)

    def _build_app(self) -> web.Application:
        limit = self.settings.max_request_bytes
        app = web.Application(client_max_size=limit,
                              middlewares=[json_errors(limit, self.rejections, self.client_address),
                                           self._guard_sessions])
        app.on_response_prepare.append(add_security_headers)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static_file)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/api/sessions", self._list_sessions)
        app.router.add_get("/api/sessions/{id}", self._get_session)
        app.router.add_get("/api/sessions/{id}/stamps", self._get_stamps)
        app.router.add_get("/api/health", self._health)
        app.router.add_get("/api/config", self._config)
        app.router.add_get("/api/default-image", self._default_image)
        app.router.add_get("/metrics", self._metrics)
        return app

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _make_ice_policy(self, bound: list[str]) -> ice.IcePolicy:
        """ICE follows --host: host candidates only on the bound addresses, and remote candidates on loopback
        only while the server listens there (and never otherwise)."""
        s = self.settings
        remote = CandidatePolicy(loopback=ice.listens_on_loopback(bound), allow_mdns=s.allow_mdns)
        return ice.IcePolicy(addresses=ice.host_addresses(bound), ports=s.udp_ports, public_ip=s.public_ip,
                             remote=remote)

    async def start(self, host: str = "127.0.0.1", port: int = 8188) -> str:
        """Listen; returns the URL to open (with the real port when ``port`` is 0)."""
        limits = self.settings.connection_limits()
        # aiohttp's handler settings; the access log stays off (rejections are logged, rate-limited, instead).
        handler = dict(access_log=None, keepalive_timeout=limits.keepalive_timeout,
                       lingering_time=min(2.0, limits.body_timeout))
        self._runner = web.AppRunner(self.app, handle_signals=False, **handler)
        await self._runner.setup()
        self.connections = ConnectionGuard(limits.within_descriptors(), self.rejections,
                                           exempt=self.settings.trusted_proxies)
        site = GuardedSite(self._runner, host, port, self.connections, handler)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.ice_policy = self._make_ice_policy([a[0] for a in self._runner.addresses])
        log.info("listening on %s; ICE host candidates on %s", ", ".join(str(a[0]) for a in self._runner.addresses),
                 ", ".join(self.ice_policy.addresses))
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound_port}/"
        self._log_flusher = asyncio.get_running_loop().create_task(self._flush_rejections())
        return self.url

    async def _flush_rejections(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.rejections.flush()

    async def stop(self) -> None:
        """Close every session (hanging up on viewers), stop listening, end the worker threads."""
        self._stopping = True
        if self._log_flusher is not None:
            self._log_flusher.cancel()
        self.rejections.flush()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(s.close("the server is shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.worker.close)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- sessions --------------------------------------------------------------------------------------------
    def _reserve_session(self, client: str) -> tuple[Callable[[], None], Callable[[], None]]:
        """(release the server-wide place, release the client's place); LimitExceeded at either capacity."""
        if len(self.sessions) + self._starting.count >= self.settings.max_sessions:
            raise LimitExceeded(f"the server runs its maximum of {self.settings.max_sessions} sessions; join "
                                "one (GET /api/sessions) or try again later", RETRY_AFTER_S)
        owned = self._client_sessions.take(client)
        return self._starting.take(), owned

    async def _create_session(self, image, release: Callable[[], None], owned: Callable[[], None],
                              owner: str) -> Session:
        """A listed session that shows ``image`` and generates nothing yet: cheap, no encoder has run."""
        s = self.settings
        loop = asyncio.get_running_loop()
        height, width = await loop.run_in_executor(self.executor, self.pipe.frame_size, image)
        # Off the loop: resizing a large start image takes long enough to stall every paced track.
        placeholder = await loop.run_in_executor(None, lambda: rgb_to_yuv420(resize_rgb(image, height, width)))
        session = Session(loop=loop, worker=self.worker, executor=self.executor, fps=s.fps,
                          capacity=s.buffer_frames, placeholder_yuv=placeholder, ice_servers=self._ice_servers,
                          ice_policy=self.ice_policy, policy=s.session_policy(), on_closed=self._forget,
                          view_slots=s.view_slots if self.access.required else None, metrics=self.metrics)
        release()  # the session counts itself from here on
        self.sessions[session.id] = session
        self._owned[session.id] = owned  # the creating client's place, freed when the session closes
        if s.stamp:
            session.track.stamps = StampLog()
        session.open()  # from now on it closes by itself if no viewer connects in time
        log.info("session %s started by %s", session.id, owner)
        return session

    def _start_when_connected(self, session: Session, image, prompt: str | None, seed: int) -> None:
        """Run the encoders only once a viewer's connection is up (an offer that never connects costs none)."""

        async def start() -> None:
            if not await session.wait_connected():
                return
            try:
                await self._start_session(session, image, prompt, seed)
            except Exception:  # noqa: BLE001 -- a fault of the server (the model): logged, the session closed
                log.exception("session %s: generation could not start", session.id)

        task = asyncio.get_running_loop().create_task(start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_session(self, session: Session, image, prompt: str | None, seed: int) -> None:
        """Build the pipeline's stream (the encoders run: the expensive part) and start generating."""
        s = self.settings
        prompt = prompt or self.default_prompt

        def build(on_step: Callable[[Any], None]):
            guidance = None if s.cfg is None else self.pipe.guidance(s.cfg)
            return self.pipe.stream(image, prompt, seed=seed, steps=s.steps, window=s.window, mode=s.mode,
                                    teacache=s.teacache, on_step=on_step, guidance=guidance)

        try:
            await session.start(build, prompt)
        except Exception:  # noqa: BLE001 -- whatever failed, do not leave a half-started session listed
            await session.close("generation could not start; the server log has the details")
            raise
        log.debug("session %s generating: %r", session.id, prompt[:80])

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self._owned.pop(session.id, lambda: None)()
        g = session.generation
        log.info("session %s ended after %.0f s (%s): %d sections, %d frames generated", session.id, session.age,
                 session.close_reason, g.sections, g.frames)

    def client_address(self, request: web.Request) -> str:
        """Who sent ``request``: its peer address, or behind a trusted proxy (--trusted-proxy) the address
        that proxy appended to X-Forwarded-For."""
        peer = request.remote or ""
        if peer in self.settings.trusted_proxies:
            forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
            return forwarded or peer
        return peer

    # -- handlers --------------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _offer(self, request: web.Request) -> web.Response:
        """Start or join a session. Every way this can fail because of the request is a 4xx (see the top)."""
        if self._stopping:
            return _error(503, "the server is shutting down; try again in a moment")
        try:
            body = parse_json_body(await request.read())
            offer = parse_offer(body, self.settings.max_prompt_chars)
            # Only after the body parses (so a malformed one still gets its 400): cross-site pages can post
            # text/plain without asking, but not application/json, which is what keeps them out.
            if request.content_type != "application/json":
                return _error(415, "send the offer with Content-Type: application/json")
            return await self._answer(request, body, offer)
        except TooLarge as exc:
            return _error(413, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        except LimitExceeded as exc:
            return _error(429, str(exc), {"Retry-After": str(exc.retry_after)})
        except LookupError as exc:
            return _error(404, str(exc.args[0]))

    async def _answer(self, request: web.Request, body: dict[str, Any], offer: Offer) -> web.Response:
        client = self.client_address(request)
        pending = self._pending.take(client)  # freed once the viewer's connection is up, or it is gone
        try:
            if offer.session is None:
                role = self.access.role_to_create(request, body)
                offer = self._checked(offer, client)
                session, image = await self._session_for(offer, client)
            else:
                session = self._joinable(request, body, offer.session)
                role = self.access.role_to_join(request, body, session.view_key)
                offer = self._checked(offer, client)
            try:
                answer = await session.add_viewer(offer.sdp, offer.type, role, settled=pending)
            except (ValueError, LimitExceeded):
                if offer.session is None:  # nobody can watch it: do not leave it up until it times out
                    await session.close()
                raise
        except BaseException:
            pending()
            raise
        if offer.session is None:
            self._start_when_connected(session, image, offer.prompt, offer.seed)
        reply = {"sdp": answer.sdp, "type": answer.type, "session": session.id, "role": role}
        if role == CONTROL:
            reply["view_key"] = session.view_key  # for the join link: ?session=<id>&key=<view_key>
        return web.json_response(reply)

    def _checked(self, offer: Offer, client: str) -> Offer:
        """The offer as aiortc may see it: media sections counted, candidates filtered (stream/candidates.py);
        before anything is spent on it (a session, an image decode, a peer connection)."""
        checked = check_offer(offer.sdp, self.ice_policy.remote)
        if checked.dropped:
            log.debug("offer from %s: candidates refused: %s", client, dict(checked.dropped))
        return dataclasses.replace(offer, sdp=checked.sdp)

    async def _session_for(self, offer: Offer, client: str) -> tuple[Session, Any]:
        """A new session for ``offer`` (and its start image), within the server's and the client's limits."""
        release, owned = self._reserve_session(client)  # before decoding: a full server spends nothing on it
        try:
            image = self.default_image
            if offer.image is not None:
                s = self.settings
                image = await asyncio.get_running_loop().run_in_executor(
                    None, decode_start_image, offer.image, s.max_image_bytes, s.max_image_pixels)
            return await self._create_session(image, release, owned, client), image
        except BaseException:
            owned()
            raise
        finally:
            release()

    def _joinable(self, request: web.Request, body: dict[str, Any], session_id: str) -> Session:
        """The live session ``session_id``. With a token set, a stranger gets the same 401 for a session that
        does not exist as for a wrong key: the answer tells nothing about which ids exist."""
        session = self.sessions.get(session_id)
        if session is not None and not session.closed:
            return session
        if self.access.required and not self.access.has_token(request, body):
            raise Unauthorized(JOIN_REFUSED)
        raise LookupError(f"no session {session_id!r}; GET /api/sessions lists the live ones, or post without "
                          "\"session\" to start a new one")

    @web.middleware
    async def _guard_sessions(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Session listings show prompts and ids: with a token set, they need it too."""
        if request.path.startswith("/api/sessions"):
            self.access.require(request)
        return await handler(request)

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        path = self._static.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def _list_sessions(self, request: web.Request) -> web.Response:
        return web.json_response({"sessions": [s.summary() for s in self.sessions.values()]})

    async def _get_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, f"no session {request.match_info['id']!r}; GET /api/sessions lists them")
        return web.json_response({**session.summary(), "stats": session.stats()})

    async def _get_stamps(self, request: web.Request) -> web.Response:
        """[[frame, section, generated, sent], ...] in time.monotonic() seconds: this host's clock."""
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, f"no session {request.match_info['id']!r}; GET /api/sessions lists them")
        stamp_log = session.track.stamps
        if stamp_log is None:
            return _error(404, "this server does not stamp frames; start it with --stamp")
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return _error(400, "since must be a frame number")
        stamps = [r.as_list() for r in stamp_log.since(since)]
        return web.json_response({"clock": "monotonic", "now": time.monotonic(), "stamps": stamps})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok" if self.worker.alive else "worker stopped", "model": self.settings.model,
            "device": self.device, "sessions": len(self.sessions),
            "viewers": self.peer_connections, "max_sessions": self.settings.max_sessions,
        })

    @property
    def peer_connections(self) -> int:
        """Open viewer connections (each viewer holds exactly one RTCPeerConnection)."""
        return sum(len(s.viewers) for s in self.sessions.values())

    async def _config(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({"model": s.model, "fps": s.fps, "window": s.window, "steps": s.steps,
                                  "teacache": s.teacache, "cfg": s.cfg, "default_prompt": self.default_prompt,
                                  "buffer_frames": s.buffer_frames, "token_required": self.access.required,
                                  "max_prompt_chars": s.max_prompt_chars, "max_image_bytes": s.max_image_bytes,
                                  "max_image_pixels": s.max_image_pixels,
                                  # STUN only: TURN credentials are the server's own, never handed out.
                                  "ice_servers": [url for url in s.ice_servers if url.startswith("stun:")]})


    async def _metrics(self, request: web.Request) -> web.Response:
        """Prometheus' text format (stream/metrics.py); with a token set, it needs the token."""
        self.access.require(request)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _default_image(self, request: web.Request) -> web.Response:
        if self._default_png is None:
            self._default_png = png_bytes(self.default_image)
        return web.Response(body=self._default_png, content_type="image/png",
                            headers={"Cache-Control": "max-age=3600"})


def _device_name(pipe: Any) -> str:
    """The device the pipeline generates on (its worker thread is named after it)."""
    device = getattr(pipe, "device", None) or getattr(getattr(pipe, "parts", None), "device", None)
    return str(device or "cpu")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def load_pipeline(model: str | ServerSettings, *, device: str = "auto", dtype: str = "auto", low_vram: bool = False,
                  memory_budget_gb: float | None = None, quantize: str | None = None, compile: bool = False) -> Any:
    """``FramePackPipeline.from_pretrained(model, device=, dtype=, ...)``; given ServerSettings, its model, device,
    dtype, low-VRAM, quantize and compile fields. A clear error if the pipeline module is missing; one that says
    what is needed and free (and the flag that fits) when the device cannot hold the model."""
    if isinstance(model, ServerSettings):
        settings = model
        model, device, dtype = settings.model, settings.device, settings.dtype
        low_vram, memory_budget_gb = settings.low_vram, settings.memory_budget_gb
        quantize, compile = settings.quantize, settings.compile
    try:
        from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
    except ImportError as exc:
        raise RuntimeError(f"cannot import framepack_rt.pipeline.framepack_pipeline ({exc}); reinstall framepack-rt") from None
    return FramePackPipeline.from_pretrained(model, device=device, dtype=dtype, low_vram=low_vram,
                                             memory_budget_gb=memory_budget_gb, quantize=quantize, compile=compile)


async def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8188,
                announce: Callable[[str], None] = print) -> bool:
    """Load the model, serve until SIGINT/SIGTERM, then shut down cleanly. False if stopped while loading."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(f"loading model {settings.model!r} ...")
    pipe = await _load_or_stop(settings, stop)
    if pipe is None:
        announce("stopped before the model finished loading")
        return False
    server = StreamServer(pipe, settings)
    url = await server.start(host, port)
    announce(f"framepack-rt serve: open {url} in a browser (Ctrl-C to stop)")
    if settings.token:
        announce("access needs the token: open the URL with ?token=<your token> added (it is not printed)")
    elif host not in ("127.0.0.1", "::1", "localhost"):
        announce(f"warning: listening on {host} without a token: anyone who reaches this port can start and "
                 f"steer sessions; set {TOKEN_HINT}")
    try:
        await stop.wait()
    finally:
        announce("stopping ...")
        await server.stop()
    return True


async def _load_or_stop(model: str | ServerSettings, stop: asyncio.Event) -> Any | None:
    """Load on a daemon thread so that Ctrl-C during a long load exits at once (the thread dies with us)."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()

    def load() -> None:
        try:
            pipe = load_pipeline(model)
        except Exception as exc:  # noqa: BLE001 -- handed to the loop and re-raised there
            # Bound now: Python deletes ``exc`` when this block ends, possibly before the loop runs the lambda.
            loop.call_soon_threadsafe(lambda error=exc: result.done() or result.set_exception(error))
        else:
            loop.call_soon_threadsafe(lambda: result.done() or result.set_result(pipe))

    threading.Thread(target=load, name="framepack-load", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({result, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return result.result() if result.done() else None
