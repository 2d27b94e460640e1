"""The HTTP side of ``framepack-rt serve``: the page, signaling (``POST /offer``) and the JSON API.

Routes::

    GET  /                   the browser page (stream/static/index.html)
    GET  /static/...         its JS and CSS
    POST /offer              {sdp, type, session?, prompt?, image? (data URL), seed?} -> {sdp, type, session}
    GET  /api/sessions       [{id, prompt, sections_done, viewers, state, ...}]
    GET  /api/sessions/{id}  one session with its current stats
    GET  /api/health         liveness, model, counts
    GET  /api/config         defaults the page shows (prompt, fps, steps)
    GET  /api/default-image  the built-in start image (PNG)

Without ``session`` an offer starts a new generation session (from the image and prompt sent, or the built-in
scene and prompt); with it, the offer joins that session as one more viewer of the same generator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from framepack_rt.stream import DEFAULT_MODEL, control
from framepack_rt.stream.buffer import rgb_to_yuv420
from framepack_rt.stream.generation import DeviceWorker
from framepack_rt.stream.ice import ensure_host_candidates
from framepack_rt.stream.images import DEFAULT_PROMPT, decode_data_url, default_scene, png_bytes, resize_rgb
from framepack_rt.stream.session import Session

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_REQUEST_BYTES = 20 * 1024 * 1024  # an offer with a start image as a data URL


@dataclass
class ServerSettings:
    """How sessions generate and play. ``steps``/``teacache`` None: the pipeline's defaults."""

    model: str = DEFAULT_MODEL
    fps: float = 30.0
    window: int = 9
    steps: int | None = None
    teacache: float | None = None
    mode: str = "f1"  # live streams go forward; "inverted" builds fixed-length clips end-first
    buffer_seconds: float = 2.0  # bounded buffer: at most this much generated video waits to be played
    idle_timeout: float = 60.0  # a session with no viewers for this long is closed
    ice_servers: list[str] = field(default_factory=list)  # e.g. ["stun:stun.l.google.com:19302"]
    default_prompt: str = DEFAULT_PROMPT

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
        self.app = self._build_app()
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._default_png: bytes | None = None

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_get("/", self._index)
        app.router.add_static("/static", STATIC_DIR)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/api/sessions", self._list_sessions)
        app.router.add_get("/api/sessions/{id}", self._get_session)
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
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.worker.close)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- sessions --------------------------------------------------------------------------------------------
    async def new_session(self, image=None, prompt: str | None = None, seed: int = 0) -> Session:
        """Start generating from ``image`` (HxWx3 uint8; None: the built-in scene) and ``prompt``."""
        s = self.settings
        image = default_scene() if image is None else image
        prompt = prompt or s.default_prompt
        loop = asyncio.get_running_loop()
        height, width = await loop.run_in_executor(self.executor, self.pipe.frame_size, image)
        placeholder = rgb_to_yuv420(resize_rgb(image, height, width))
        session = Session(loop=loop, worker=self.worker, executor=self.executor, fps=s.fps,
                          capacity=s.buffer_frames, placeholder_yuv=placeholder, ice_servers=s.ice_servers,
                          idle_timeout=s.idle_timeout, on_closed=self._forget)
        self.sessions[session.id] = session

        def build(on_step: Callable[[Any], None]):
            return self.pipe.stream(image, prompt, seed=seed, steps=s.steps, window=s.window, mode=s.mode,
                                    teacache=s.teacache, on_step=on_step)

        try:
            await session.start(build, prompt)
        except Exception:  # noqa: BLE001 -- whatever failed, do not leave a half-started session listed
            await session.close()
            raise
        log.info("session %s started: %r", session.id, prompt)
        return session

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    # -- handlers --------------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "POST /offer takes JSON: {\"sdp\": ..., \"type\": \"offer\"}")
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            return _error(400, "POST /offer needs {\"sdp\": <the offer's SDP>, \"type\": \"offer\"}")
        session_id = body.get("session")
        try:
            if session_id:
                session = self.sessions.get(str(session_id))
                if session is None or session.closed:
                    return _error(404, f"no session {session_id!r}; GET /api/sessions lists the live ones, "
                                       "or post without \"session\" to start a new one")
            else:
                image, prompt, seed = _session_params(body)
                session = await self.new_session(image, prompt, seed)
            answer = await session.add_viewer(body["sdp"], body["type"])
        except ValueError as exc:
            return _error(400, str(exc))
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": session.id})

    async def _list_sessions(self, request: web.Request) -> web.Response:
        return web.json_response({"sessions": [s.summary() for s in self.sessions.values()]})

    async def _get_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, f"no session {request.match_info['id']!r}; GET /api/sessions lists them")
        return web.json_response({**session.summary(), "stats": session.stats()})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok" if self.worker.alive else "worker stopped", "model": self.settings.model,
            "device": self.device, "sessions": len(self.sessions),
            "viewers": sum(len(s.viewers) for s in self.sessions.values()),
        })

    async def _config(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({"model": s.model, "fps": s.fps, "window": s.window, "steps": s.steps,
                                  "teacache": s.teacache, "default_prompt": s.default_prompt,
                                  "buffer_frames": s.buffer_frames})


    async def _default_image(self, request: web.Request) -> web.Response:
        if self._default_png is None:
            self._default_png = png_bytes(default_scene())
        return web.Response(body=self._default_png, content_type="image/png",
                            headers={"Cache-Control": "max-age=3600"})


def _session_params(body: dict[str, Any]) -> tuple[Any, str | None, int]:
    """The optional start image, prompt and seed of a new-session offer; ValueError says what is wrong."""
    image = decode_data_url(body["image"]) if body.get("image") else None
    prompt = body.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError("\"prompt\" must be a string")
        prompt = prompt.strip()
        if len(prompt) > control.MAX_PROMPT_CHARS:
            raise ValueError(f"prompt too long ({len(prompt)} characters, at most {control.MAX_PROMPT_CHARS})")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError("\"seed\" must be a non-negative integer")
    return image, prompt or None, seed


def _device_name(pipe: Any) -> str:
    """The device the pipeline generates on (its worker thread is named after it)."""
    device = getattr(pipe, "device", None) or getattr(getattr(pipe, "parts", None), "device", None)
    return str(device or "cpu")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def load_pipeline(model: str) -> Any:
    """``FramePackPipeline.from_pretrained(model)``; a clear error if the pipeline module is missing."""
    try:
        from framepack_rt.pipeline import FramePackPipeline
    except ImportError as exc:
        raise RuntimeError(f"cannot import framepack_rt.pipeline ({exc}); reinstall framepack-rt") from None
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
            loop.call_soon_threadsafe(lambda: result.done() or result.set_exception(exc))
        else:
            loop.call_soon_threadsafe(lambda: result.done() or result.set_result(pipe))

    threading.Thread(target=load, name="framepack-load", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({result, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return result.result() if result.done() else None
