"""The HTTP side of ``framepack-rt serve``: the page, signaling (``POST /offer``) and the JSON API.

Routes::

    GET  /                   the browser page (stream/static/index.html)
    GET  /static/...         its JS and CSS
    POST /offer              {sdp, type, session?, key?, token?, prompt?, image? (data URL), seed?, steps?, cfg?,
                              window?, bucket? ("HxW")} -> {sdp, type, session, role, view_key, control_key
                              (these two with control only)}
    GET  /api/sessions       [{id, prompt, sections_done, viewers, state, ...}]
    GET  /api/sessions/{id}  one session with its current stats
    GET  /api/sessions/{id}/stamps?since=N  send times of stamped frames (with ``--stamp``; benchmarks)
    GET  /api/sessions/{id}/end?wait=S  waits up to S seconds (default 25, at most 60) for the session to end:
                             {session, state: "running" | "closed", reason}
    GET  /api/sessions/{id}/video.mp4?key=K  everything recorded so far, one MP4 (stream/recording.py)
    DELETE /api/sessions/{id}?key=K  end the session now (its page's Restart and reload)
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
import hmac
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Collection

from aiohttp import web

from framepack_rt.stream.buffer import rgb_to_yuv420
from framepack_rt.stream.batching import BatchingWorker
from framepack_rt.stream.generation import DeviceWorker
from framepack_rt.stream import ice
from framepack_rt.stream.control import MAX_TRANSITION_SECTIONS
from framepack_rt.stream.candidates import CandidatePolicy, check_offer
from framepack_rt.stream.connections import ConnectionGuard, GuardedSite
from framepack_rt.stream.images import DEFAULT_PROMPT, default_scene, png_bytes, resize_rgb
from framepack_rt.stream.limits import LimitExceeded, PerClient, Reservations, TooLarge
from framepack_rt.stream.logs import RejectionLog
from framepack_rt.stream.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from framepack_rt.stream.metrics import ServerMetrics
from framepack_rt.stream.offers import Offer, StartLimits, StartSettings, parse_json_body, parse_offer
from framepack_rt.stream.recording import NothingRecorded, Recorder, Recording
from framepack_rt.stream.security import (
    CONTROL, JOIN_REFUSED, Access, Unauthorized, add_security_headers, json_errors, static_files)
from framepack_rt.stream.session import Session
from framepack_rt.stream.settings import ServerSettings
from framepack_rt.stream.stamp import StampLog
from framepack_rt.stream.uploads import decode_start_image

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER_S = 10  # what a 429 tells clients to wait: sessions and viewers come and go on that scale
TOKEN_HINT = "FRAMEPACK_RT_TOKEN (or --token)"
VIDEO_ROUTE, RELEASE_ROUTE = "session-video", "session-release"  # check their access themselves (by key)
DOWNLOAD_CHUNK = 1 << 20
END_WAIT_S, END_WAIT_MAX_S = 25.0, 60.0  # GET /api/sessions/{id}/end: a long poll's default and longest wait


class StreamServer:
    """The aiohttp application, its sessions, the device worker and the control thread."""

    def __init__(self, pipe: Any, settings: ServerSettings | None = None) -> None:
        self.pipe = pipe
        self.settings = settings or ServerSettings()
        self.sessions: dict[str, Session] = {}
        self.device = _device_name(pipe)
        self.worker = _make_worker(self.device, self.settings)
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
        # Each session's video as generated, until the session ends (None: --record-max-seconds 0).
        self.recorder = (Recorder(_model_fps(pipe), self.settings.record_max_seconds)
                         if self.settings.record_max_seconds > 0 else None)
        self.recordings: dict[str, Recording] = {}
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
        app.router.add_delete("/api/sessions/{id}", self._release_session, name=RELEASE_ROUTE)
        app.router.add_get("/api/sessions/{id}/video.mp4", self._get_video, name=VIDEO_ROUTE)
        app.router.add_get("/api/sessions/{id}/stamps", self._get_stamps)
        app.router.add_get("/api/sessions/{id}/end", self._wait_end)
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

    async def start(self, host: str = "127.0.0.1", port: int = 8188, media_hosts: list[str] | None = None) -> str:
        """Listen; returns the URL to open (with the real port when ``port`` is 0). ``media_hosts``: where
        viewers' connections go (ICE host candidates), when not where HTTP listens (a cluster replica answers
        HTTP on loopback, for its ingress, and streams from its node's address)."""
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
        self.ice_policy = self._make_ice_policy(media_hosts or [a[0] for a in self._runner.addresses])
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
        if self.recorder is not None:
            await loop.run_in_executor(None, self.recorder.close)  # deletes every recording left
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
        # bucket: what the transformer generates at; the frames may be larger (a fast decoder that upsamples).
        # Pipelines without bucket() stream frames of their bucket's size.
        (height, width), bucket = await loop.run_in_executor(
            self.executor, lambda: (self.pipe.frame_size(image), getattr(self.pipe, "bucket", self.pipe.frame_size)(image)))
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
        session.settings["bucket"], session.settings["frame"] = list(bucket), [height, width]
        session.transition_sections = s.transition_sections
        if self.recorder is not None:
            session.generation.recording = self.recordings[session.id] = self.recorder.open(session.id)
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
            use = session.settings  # the values in use, shown to viewers (_settings_in_use)
            guidance = self._guidance(use.get("cfg"))
            return self.pipe.stream(image, prompt, seed=seed, steps=use.get("steps"), window=use["window"], mode=s.mode,
                                    teacache=s.teacache, on_step=on_step, guidance=guidance,
                                    **s.decode_overlap_kwargs())

        try:
            await session.start(build, prompt)
        except Exception:  # noqa: BLE001 -- whatever failed, do not leave a half-started session listed
            await session.close("generation could not start; the server log has the details")
            raise
        log.debug("session %s generating: %r", session.id, prompt[:80])

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        recording = self.recordings.pop(session.id, None)
        if recording is not None:
            recording.close()  # its files are deleted on the recorder's thread
        self._owned.pop(session.id, lambda: None)()
        g = session.generation
        log.info("session %s ended after %.0f s (%s): %d sections, %d frames generated", session.id, session.age,
                 session.close_reason, g.sections, g.frames)

    def client_address(self, request: web.Request) -> str:
        """Who sent ``request``: its peer address, or behind a trusted proxy (--trusted-proxy) the address
        that proxy appended to X-Forwarded-For."""
        return forwarded_client(request.remote or "", request.headers.get("X-Forwarded-For", ""),
                                self.settings.trusted_proxies)

    # -- handlers --------------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _offer(self, request: web.Request) -> web.Response:
        """Start or join a session. Every way this can fail because of the request is a 4xx (see the top)."""
        if self._stopping:
            return _error(503, "the server is shutting down; try again in a moment")
        try:
            body = parse_json_body(await request.read())
            offer = parse_offer(body, self.settings.max_prompt_chars, self.settings.start_limits())
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
            reply["control_key"] = session.control_key  # ?key= of DELETE /api/sessions/ID and video.mp4
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
            self._check_bucket(offer.start.bucket)
            image = self.default_image
            if offer.image is not None:
                s = self.settings
                image = await asyncio.get_running_loop().run_in_executor(
                    None, decode_start_image, offer.image, s.max_image_bytes, s.max_image_pixels)
            if offer.start.bucket is not None:  # the resolution asked for: the image fitted to that bucket
                image = await asyncio.get_running_loop().run_in_executor(None, fit_image, image, offer.start.bucket)
            session = await self._create_session(image, release, owned, client)
            session.settings.update(self._settings_in_use(offer.start, offer.seed))
            return session, image
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
        route = request.match_info.route.name
        if request.path.startswith("/api/sessions") and route not in (VIDEO_ROUTE, RELEASE_ROUTE):  # own checks
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
        recording = self.recordings.get(session.id)
        return web.json_response({**session.summary(), "stats": session.stats(),
                                  "recording": recording.summary() if recording else {"enabled": False}})

    async def _wait_end(self, request: web.Request) -> web.Response:
        """A long poll: answers when the session ends or after ``wait`` seconds (scripts; a cluster replica
        follows its sessions with it)."""
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, f"no session {request.match_info['id']!r}; GET /api/sessions lists the live ones")
        try:
            wait = end_wait_seconds(request.query.get("wait"))
        except ValueError:
            return _error(400, "wait must be a number of seconds")
        try:
            await asyncio.wait_for(session.wait_closed(), wait)
        except asyncio.TimeoutError:
            pass
        return web.json_response({"session": session.id, "state": "closed" if session.closed else "running",
                                  "reason": session.close_reason})

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

    # -- start settings, release, recording -------------------------------------------------------------------
    def _check_bucket(self, bucket: tuple[int, int] | None) -> None:
        """ValueError (400) unless ``bucket`` is None or one of the model's resolutions."""
        buckets = [tuple(b) for b in getattr(self.pipe, "buckets", ())]
        if bucket is not None and bucket not in buckets:
            listed = ", ".join(f"{h}x{w}" for h, w in buckets) or "none (this model fits images itself)"
            raise ValueError(f"bucket {bucket[0]}x{bucket[1]} is not one of this model's resolutions: {listed}")

    def _settings_in_use(self, start: StartSettings, seed: int) -> dict[str, Any]:
        """The values a session generates with: what the page asked for, else the server's, else the model's."""
        s = self.settings
        model_cfg = getattr(getattr(self.pipe, "default_guidance", None), "cfg", None)
        return {"seed": seed, "steps": start.steps or s.steps or getattr(self.pipe, "default_steps", None),
                "cfg": next((c for c in (start.cfg, s.cfg, model_cfg) if c is not None), None),
                "window": start.window or s.window}

    def _guidance(self, cfg: float | None) -> Any:
        """The guidance for ``cfg``; None (the pipeline's own default) when it is the model's default scale."""
        model_cfg = getattr(getattr(self.pipe, "default_guidance", None), "cfg", None)
        return None if cfg is None or cfg == model_cfg else self.pipe.guidance(cfg)

    def _start_config(self) -> dict[str, Any]:
        """The page's start settings: defaults (bucket None: from the start image's shape) and limits."""
        return {**self._settings_in_use(StartSettings(), 0), "bucket": None,
                "buckets": [list(b) for b in getattr(self.pipe, "buckets", ())],
                "max_steps": self.settings.max_steps, "max_window": self.settings.max_window,
                "max_cfg": StartLimits().max_cfg}

    def _recording_config(self) -> dict[str, Any]:
        s = self.settings
        return {"enabled": self.recorder is not None, "max_seconds": s.record_max_seconds,
                "for_viewers": s.recording_for_viewers}

    def _session_by_key(self, request: web.Request, recording: bool = False) -> Session:
        """The session of ``{id}`` if the request may act on it: the server token, or the session's control key
        (``?key=``, given with control at the offer); for its recording with ``--recording-for-viewers`` also the
        view key (any viewer without a token set). With a token set, an unknown session gets the same 401."""
        session = self.sessions.get(request.match_info["id"])
        key = request.query.get("key")
        if self.access.has_token(request):
            allowed = True
        elif session is None:
            if self.access.required:
                raise Unauthorized(JOIN_REFUSED)
            allowed = True  # answered with 404 below
        elif key is not None and hmac.compare_digest(key.encode("utf-8", "replace"), session.control_key.encode()):
            allowed = True
        elif recording and self.settings.recording_for_viewers:
            allowed = not self.access.required or (
                key is not None and hmac.compare_digest(key.encode("utf-8", "replace"), session.view_key.encode()))
        else:
            allowed = False
        if not allowed:
            raise Unauthorized("this needs control of the session: its control key (?key=, from the offer's "
                               "answer) or the server token" + ("" if recording else "; viewers cannot end it"))
        if session is None or session.closed:
            raise LookupError(f"no session {request.match_info['id']!r}; GET /api/sessions lists the live ones")
        return session

    async def _release_session(self, request: web.Request) -> web.Response:
        """DELETE /api/sessions/{id}: end the session now (the page lets go of its previous one on Restart and
        reload), freeing its place at once instead of after --grace."""
        try:
            session = self._session_by_key(request)
        except LookupError as exc:
            return _error(404, str(exc.args[0]))
        await session.close("ended by the viewer who controls it")
        return web.json_response({"closed": session.id})

    async def _get_video(self, request: web.Request) -> web.StreamResponse:
        """GET /api/sessions/{id}/video.mp4: everything recorded so far, as one MP4 (a download)."""
        try:
            session = self._session_by_key(request, recording=True)
        except LookupError as exc:
            return _error(404, str(exc.args[0]))
        recording = self.recordings.get(session.id)
        if recording is None:
            return _error(409, "this server does not record sessions (it runs with --record-max-seconds 0)")
        try:
            handle, size, frames = await asyncio.wrap_future(recording.export())
        except NothingRecorded as exc:
            return _error(409, str(exc.args[0]))
        with handle:
            response = web.StreamResponse(headers={
                "Content-Type": "video/mp4", "Content-Length": str(size), "Cache-Control": "no-store",
                "Content-Disposition": f'attachment; filename="framepack-{session.id[:8]}.mp4"',
                "X-Frames": str(frames)})
            await response.prepare(request)
            loop = asyncio.get_running_loop()
            while chunk := await loop.run_in_executor(None, handle.read, DOWNLOAD_CHUNK):
                await response.write(chunk)
            await response.write_eof()
        return response

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

    def _lora_config(self) -> list[dict[str, Any]]:
        """The loaded LoRA adapters (name, default scale, fused, ...) for the page's sliders."""
        describe = getattr(self.pipe, "lora_info", None)  # pipelines built elsewhere (tests) may have none
        return describe() if describe is not None else []

    async def _config(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({"model": s.model, "fps": s.fps, "window": s.window, "steps": s.steps,
                                  "teacache": s.teacache, "cfg": s.cfg, "default_prompt": self.default_prompt,
                                  "buffer_frames": s.buffer_frames, "token_required": self.access.required,
                                  "max_prompt_chars": s.max_prompt_chars, "max_image_bytes": s.max_image_bytes,
                                  "max_image_pixels": s.max_image_pixels,
                                  "transition_sections": s.transition_sections,
                                  "max_transition_sections": MAX_TRANSITION_SECTIONS,
                                  "start": self._start_config(), "recording": self._recording_config(),
                                  "loras": self._lora_config(),
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


def forwarded_client(peer: str, forwarded_for: str, trusted_proxies: Collection[str]) -> str:
    """The client a request comes from: its peer, or behind a trusted proxy the address that proxy appended
    to X-Forwarded-For (the last entry: the ones before it are the client's own say)."""
    if peer in trusted_proxies:
        return forwarded_for.split(",")[-1].strip() or peer
    return peer


def end_wait_seconds(text: str | None) -> float:
    """GET /api/sessions/{id}/end's ``wait``: END_WAIT_S when absent, clipped to [0, END_WAIT_MAX_S];
    ValueError when it is no number."""
    return END_WAIT_S if text is None else min(END_WAIT_MAX_S, max(0.0, float(text)))


def _model_fps(pipe: Any) -> float:
    """The frame rate the model generates for (recordings play at it): the pipeline's, else FramePack's 30."""
    fps = getattr(pipe, "fps", None)
    if fps is None:
        from framepack_rt.pipeline.framepack_pipeline import FPS as fps
    return float(fps)


def fit_image(image: Any, bucket: tuple[int, int]) -> Any:
    """``image`` resized and center-cropped to ``bucket`` (H, W), as the pipeline fits start images."""
    from framepack_rt.pipeline.media import fit_to_bucket, load_image

    return fit_to_bucket(load_image(image), bucket)


def _make_worker(device: str, settings: ServerSettings) -> DeviceWorker | BatchingWorker:
    """The device's generation thread: batching sessions' steps (--batching on) or taking turns (off)."""
    if settings.batching:
        return BatchingWorker(device, settings.max_batch)
    return DeviceWorker(device)


def _device_name(pipe: Any) -> str:
    """The device the pipeline generates on (its worker thread is named after it)."""
    device = getattr(pipe, "device", None) or getattr(getattr(pipe, "parts", None), "device", None)
    return str(device or "cpu")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def load_pipeline(model: str | ServerSettings, *, device: str = "auto", dtype: str = "auto", low_vram: bool = False,
                  memory_budget_gb: float | None = None, quantize: str | None = None, compile: bool = False,
                  decoder: str = "auto") -> Any:
    """``FramePackPipeline.from_pretrained(model, device=, dtype=, ...)``; given ServerSettings, its model, device,
    dtype, low-VRAM, quantize, compile and decoder fields. A clear error if the pipeline module is missing; one that says
    what is needed and free (and the flag that fits) when the device cannot hold the model."""
    loras, fuse_lora = (), False
    if isinstance(model, ServerSettings):
        settings = model
        model, device, dtype = settings.model, settings.device, settings.dtype
        low_vram, memory_budget_gb = settings.low_vram, settings.memory_budget_gb
        quantize, compile, decoder = settings.quantize, settings.compile, settings.decoder
        loras, fuse_lora = settings.loras, settings.fuse_lora
    try:
        from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
    except ImportError as exc:
        raise RuntimeError(f"cannot import framepack_rt.pipeline.framepack_pipeline ({exc}); reinstall framepack-rt") from None
    pipe = FramePackPipeline.from_pretrained(model, device=device, dtype=dtype, low_vram=low_vram,
                                             memory_budget_gb=memory_budget_gb, quantize=quantize, compile=compile,
                                             decoder=decoder)
    if loras or fuse_lora:
        pipe.load_loras(loras, fuse=fuse_lora)
    return pipe


async def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8188,
                announce: Callable[[str], None] = print, load: Callable[[], Any] | None = None,
                media_hosts: list[str] | None = None) -> bool:
    """Load the model, serve until SIGINT/SIGTERM, then shut down cleanly. False if stopped while loading.
    ``load``: returns the pipeline (default: load_pipeline(settings); several workers pass rank 0's).
    ``media_hosts``: see StreamServer.start (a cluster replica's rank 0)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(f"loading model {settings.model!r} ...")
    pipe = await _load_or_stop(settings, stop, load)
    if pipe is None:
        announce("stopped before the model finished loading")
        return False
    server = StreamServer(pipe, settings)
    url = await server.start(host, port, media_hosts=media_hosts)
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


async def _load_or_stop(model: str | ServerSettings, stop: asyncio.Event,
                        loader: Callable[[], Any] | None = None) -> Any | None:
    """Load on a daemon thread so that Ctrl-C during a long load exits at once (the thread dies with us)."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()

    def load() -> None:
        try:
            pipe = loader() if loader is not None else load_pipeline(model)
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
