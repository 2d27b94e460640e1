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

Without ``session`` an offer starts a new generation session (from the image and prompt sent, or the built-in
scene and prompt); with it, the offer joins that session as one more viewer of the same generator.

Who may do what (the token, roles, join links): :mod:`.security`. Limits and their status codes:
:mod:`.limits` -- 400 malformed input, 401 no valid token or key, 404 no such session or file, 413 too many
bytes, 415 an offer not sent as application/json, 429 at a capacity (sessions, viewers; with Retry-After),
503 while shutting down. Other 5xx answers are faults of the server, logged with a traceback.
"""

from __future__ import annotations

import asyncio
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
from framepack_rt.stream.ice import ensure_host_candidates
from framepack_rt.stream.images import DEFAULT_PROMPT, default_scene, png_bytes, resize_rgb
from framepack_rt.stream.limits import (
    MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_SESSIONS, LimitExceeded, Reservations, SessionPolicy, TooLarge)
from framepack_rt.stream.offers import MAX_SDP_CHARS, Offer, parse_json_body, parse_offer
from framepack_rt.stream.security import (
    CONTROL, Access, add_security_headers, check_token, json_errors, static_files)
from framepack_rt.stream.session import Session
from framepack_rt.stream.stamp import StampLog
from framepack_rt.stream.uploads import decode_start_image

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER_S = 10  # what a 429 tells clients to wait: sessions and viewers come and go on that scale
_POLICY = SessionPolicy()  # the per-session defaults, in one place
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
    ice_servers: list[str] = field(default_factory=list)  # e.g. ["stun:stun.l.google.com:19302"]
    default_prompt: str | None = None  # None: the model's example prompt (the demo's), else images.DEFAULT_PROMPT
    stamp: bool = False  # benchmarks: frame numbers in the pixels' top rows + send times (stream/stamp.py)

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
        if self.max_image_bytes < 1024 or self.max_image_pixels < 64:
            raise ValueError("--max-image-mb and --max-image-pixels: too small for any start image")
        self.session_policy()  # validates the per-session limits
        check_token(self.token)

    def session_policy(self) -> SessionPolicy:
        return SessionPolicy(max_viewers=self.max_viewers, grace=self.grace, idle_timeout=self.idle_timeout,
                             connect_timeout=self.connect_timeout, viewer_timeout=self.viewer_timeout,
                             message_rate=self.message_rate, message_burst=max(1, round(2 * self.message_rate)),
                             max_prompt_chars=self.max_prompt_chars)

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
        self._stopping = False
        self._static = static_files(STATIC_DIR)
        self.app = self._build_app()
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._default_png: bytes | None = None
        # The model's own example (the demo model knows only its world of shapes), else the landscape.
        example = getattr(pipe, "example", None)
        self.default_image = example[0] if example else default_scene()
        self.default_prompt = self.settings.default_prompt or (example[1] if example else DEFAULT_PROMPT)

    def _build_app(self) -> web.Application:
        limit = self.settings.max_request_bytes
        app = web.Application(client_max_size=limit, middlewares=[json_errors(limit), self._guard_sessions])
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
        return app

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 8188) -> str:
        """Listen; returns the URL to open (with the real port when ``port`` is 0)."""
        ensure_host_candidates()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound_port}/"
        return self.url

    async def stop(self) -> None:
        """Close every session (hanging up on viewers), stop listening, end the worker threads."""
        self._stopping = True
        await asyncio.gather(*(s.close("the server is shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.worker.close)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- sessions --------------------------------------------------------------------------------------------
    async def new_session(self, image=None, prompt: str | None = None, seed: int = 0) -> Session:
        """Start generating from ``image`` (HxWx3 uint8; None: the built-in scene) and ``prompt``.

        Raises LimitExceeded when ``max_sessions`` run already.
        """
        image = self.default_image if image is None else image
        release = self._reserve_session()
        try:
            session = await self._create_session(image, release)
        finally:
            release()
        await self._start_session(session, image, prompt, seed)
        return session

    def _reserve_session(self) -> Callable[[], None]:
        if len(self.sessions) + self._starting.count >= self.settings.max_sessions:
            raise LimitExceeded(f"the server runs its maximum of {self.settings.max_sessions} sessions; join "
                                "one (GET /api/sessions) or try again later", RETRY_AFTER_S)
        return self._starting.take()

    async def _create_session(self, image, release: Callable[[], None]) -> Session:
        """A listed session that shows ``image`` and generates nothing yet: cheap, no encoder has run."""
        s = self.settings
        loop = asyncio.get_running_loop()
        height, width = await loop.run_in_executor(self.executor, self.pipe.frame_size, image)
        # Off the loop: resizing a large start image takes long enough to stall every paced track.
        placeholder = await loop.run_in_executor(None, lambda: rgb_to_yuv420(resize_rgb(image, height, width)))
        session = Session(loop=loop, worker=self.worker, executor=self.executor, fps=s.fps,
                          capacity=s.buffer_frames, placeholder_yuv=placeholder, ice_servers=s.ice_servers,
                          policy=s.session_policy(), on_closed=self._forget)
        release()  # the session counts itself from here on
        self.sessions[session.id] = session
        if s.stamp:
            session.track.stamps = StampLog()
        return session

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
            await session.close()
            raise
        log.info("session %s started: %r", session.id, prompt)

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

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

    async def _answer(self, request: web.Request, body: dict[str, Any], offer: Offer) -> web.Response:
        if offer.session is None:
            role = self.access.role_to_create(request, body)
            release = self._reserve_session()  # before decoding: a full server spends nothing on the image
            try:
                image = self.default_image
                if offer.image is not None:
                    s = self.settings
                    image = await asyncio.get_running_loop().run_in_executor(
                        None, decode_start_image, offer.image, s.max_image_bytes, s.max_image_pixels)
                session = await self._create_session(image, release)
            finally:
                release()
        else:
            session = self.sessions.get(offer.session)
            if session is None or session.closed:
                return _error(404, f"no session {offer.session!r}; GET /api/sessions lists the live ones, "
                                   "or post without \"session\" to start a new one")
            role = self.access.role_to_join(request, body, session.view_key)
        try:
            answer = await session.add_viewer(offer.sdp, offer.type, role)
        except (ValueError, LimitExceeded):
            if offer.session is None:  # nobody can watch it: do not leave it up until the grace period ends
                await session.close()
            raise
        if offer.session is None:
            # Only now, with the offer answered: a malformed one must not cost an encoder run.
            await self._start_session(session, image, offer.prompt, offer.seed)
        reply = {"sdp": answer.sdp, "type": answer.type, "session": session.id, "role": role}
        if role == CONTROL:
            reply["view_key"] = session.view_key  # for the join link: ?session=<id>&key=<view_key>
        return web.json_response(reply)

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
                                  "max_image_pixels": s.max_image_pixels})


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


def load_pipeline(model: str) -> Any:
    """``FramePackPipeline.from_pretrained(model)``; a clear error if the pipeline module is missing."""
    try:
        from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
    except ImportError as exc:
        raise RuntimeError(f"cannot import framepack_rt.pipeline.framepack_pipeline ({exc}); reinstall framepack-rt") from None
    return FramePackPipeline.from_pretrained(model)


async def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8188,
                announce: Callable[[str], None] = print) -> bool:
    """Load the model, serve until SIGINT/SIGTERM, then shut down cleanly. False if stopped while loading."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(f"loading model {settings.model!r} ...")
    pipe = await _load_or_stop(settings.model, stop)
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


async def _load_or_stop(model: str, stop: asyncio.Event) -> Any | None:
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
