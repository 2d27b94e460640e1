"""A generation session (one generator, one paced track) and its viewers (one RTCPeerConnection each).

Everything here runs on the event loop except :class:`~framepack_rt.stream.generation.Generation`, which the
device worker drives; the worker talks back only through :meth:`Session.post` (``call_soon_threadsafe``).
Pipeline calls that may block (building the stream, which encodes the image and prompt; set_prompt; stop)
run on the server's single control thread, in order, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from framepack_rt.stream import control
from framepack_rt.stream.buffer import BufferedFrame, FrameBuffer
from framepack_rt.stream.generation import DeviceWorker, Generation, VideoStreamLike
from framepack_rt.stream.tracks import SessionTrack

log = logging.getLogger(__name__)

# Messages a congested viewer may miss (the next one supersedes them); acks, sections and errors always go.
DROPPABLE = frozenset({"progress", "preview", "stats"})
MAX_CHANNEL_BACKLOG = 256 * 1024  # bytes queued on a data channel before droppable messages are skipped


@dataclass
class Viewer:
    """One browser or client watching a session."""

    id: str
    pc: RTCPeerConnection
    channel: Any = None  # the "control" RTCDataChannel once the client opens it
    joined: float = field(default_factory=time.time)

    def send(self, message: dict[str, Any]) -> bool:
        """Send if the control channel is open; skip droppable messages while the channel is backed up."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        if message.get("type") in DROPPABLE and channel.bufferedAmount > MAX_CHANNEL_BACKLOG:
            return False
        channel.send(control.encode(message))
        return True


@dataclass
class PendingPrompt:
    id: str | int | None
    text: str
    section: int  # where the pipeline said it applies from
    received: float  # time.monotonic()


class Session:
    """One generator streamed to any number of viewers through a relay of one paced track."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, worker: DeviceWorker, executor: Executor,
                 fps: float, capacity: int, placeholder_yuv, ice_servers: list[str] | None = None,
                 idle_timeout: float = 60.0, on_closed: Callable[["Session"], None] | None = None) -> None:
        self.id = uuid.uuid4().hex[:10]
        self.created = time.time()
        self.loop, self.worker, self.executor = loop, worker, executor
        self.fps = fps
        self.state = "starting"
        self.prompt = ""
        self.viewers: dict[str, Viewer] = {}
        self.buffer = FrameBuffer(capacity, on_space=worker.wake)
        self.generation = Generation(self.buffer, self.post)
        self.track = SessionTrack(self.buffer, fps, placeholder_yuv, on_frame=self._on_frame_played)
        self.relay = MediaRelay()
        self._ice_servers = ice_servers or []
        self.idle_timeout = idle_timeout
        self._pending: list[PendingPrompt] = []
        self._on_closed = on_closed
        self._closed = False
        self._last_viewer_left = time.monotonic()
        self._ticker: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, build_stream: Callable[[Callable[[Any], None]], VideoStreamLike], prompt: str) -> None:
        """Build the pipeline's stream on the control thread (encoders run there) and hand it to the worker."""
        self.prompt = prompt
        stream = await self.loop.run_in_executor(self.executor, build_stream, self.generation.on_step)
        if self._closed:  # closed while the stream was being built
            await self.loop.run_in_executor(self.executor, stream.stop)
            return
        self.generation.attach(stream)
        self.worker.add(self.generation)
        self.state = "running"
        self._ticker = self.loop.create_task(self._tick())

    async def close(self) -> None:
        """End generation and playback and hang up on every viewer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.generation.done = True
        self.worker.remove(self.generation)
        self.buffer.close()  # unblocks a worker waiting in put()
        stream = self.generation.stream
        if stream is not None:
            await self.loop.run_in_executor(self.executor, stream.stop)
        if self._ticker is not None:
            self._ticker.cancel()
        self.track.stop()
        await asyncio.gather(*(v.pc.close() for v in list(self.viewers.values())), return_exceptions=True)
        self.viewers.clear()
        if self.state not in ("finished", "error"):
            self.state = "closed"
        if self._on_closed is not None:
            self._on_closed(self)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- viewers ---------------------------------------------------------------------------------------------
    async def add_viewer(self, sdp: str, kind: str) -> RTCSessionDescription:
        """Answer one viewer's offer: a relay proxy of the session track plus the control channel."""
        config = RTCConfiguration(iceServers=[RTCIceServer(url) for url in self._ice_servers])
        pc = RTCPeerConnection(config)
        viewer = Viewer(id=uuid.uuid4().hex[:8], pc=pc)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            if channel.label != "control":
                return
            viewer.channel = channel
            channel.on("message", lambda raw: self._on_message(viewer, raw))
            if channel.readyState == "open":
                self._greet(viewer)
            else:
                channel.on("open", lambda: self._greet(viewer))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.remove_viewer(viewer)

        # Unbuffered relay: each viewer gets the latest frame; a slow encoder skips instead of queueing.
        pc.addTrack(self.relay.subscribe(self.track, buffered=False))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, AttributeError, TypeError) as exc:  # aiortc's reactions to a malformed SDP
            await pc.close()
            raise ValueError(f"could not answer the offer ({exc}); send the browser's "
                             "pc.localDescription after ICE gathering completes") from None
        self.viewers[viewer.id] = viewer
        return pc.localDescription

    async def remove_viewer(self, viewer: Viewer) -> None:
        if self.viewers.pop(viewer.id, None) is None:
            return
        self._last_viewer_left = time.monotonic()
        await viewer.pc.close()

    def _greet(self, viewer: Viewer) -> None:
        viewer.send({"type": "hello", "session": self.id, "viewer": viewer.id, "fps": self.fps,
                     "state": self.state, "prompt": self.prompt})

    # -- messages --------------------------------------------------------------------------------------------
    def post(self, message: dict[str, Any]) -> None:
        """Thread-safe: broadcast ``message`` from the worker thread (dropped if the loop is gone)."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self._from_worker, message)
        except RuntimeError:  # the loop closed between the check and the call: shutting down
            pass

    def _from_worker(self, message: dict[str, Any]) -> None:
        if message["type"] == "state":
            if self.state in ("running", "paused"):
                self.state = message["state"]
            self.track.source_done = True
        self.broadcast(message)

    def broadcast(self, message: dict[str, Any]) -> None:
        for viewer in list(self.viewers.values()):
            viewer.send(message)

    def _on_message(self, viewer: Viewer, raw: str | bytes) -> None:
        try:
            msg = control.parse_client_message(raw)
        except control.ControlError as exc:
            viewer.send(control.error(str(exc)))
            return
        if isinstance(msg, control.PingMessage):
            viewer.send(control.pong(msg.t, time.time()))
            return
        self.loop.create_task(self._act(viewer, msg))

    async def _act(self, viewer: Viewer, msg: control.ClientMessage) -> None:
        stream = self.generation.stream
        if stream is None or self.state not in ("running", "paused"):
            viewer.send(control.error(f"session {self.id} is {self.state}; start a new session to generate"))
            return
        if isinstance(msg, control.PromptMessage):
            received = time.monotonic()
            try:
                section = await self.loop.run_in_executor(self.executor, stream.set_prompt, msg.text)
            except (ValueError, RuntimeError) as exc:
                viewer.send(control.error(f"prompt not applied: {exc}"))
                return
            self.prompt = msg.text
            self._pending.append(PendingPrompt(msg.id, msg.text, int(section), received))
            self.broadcast(control.ack(msg.id, int(section), msg.text))
        elif isinstance(msg, control.PauseMessage):
            self._set_paused(True)
        elif isinstance(msg, control.ResumeMessage):
            self._set_paused(False)
        elif isinstance(msg, control.StopMessage):
            self.generation.done = True
            self.track.paused = False  # let what is buffered play out, then hold the last frame
            self.track.source_done = True
            self.state = "stopped"
            await self.loop.run_in_executor(self.executor, stream.stop)
            self.broadcast(control.state("stopped", f"stopped by viewer {viewer.id}"))

    def _set_paused(self, paused: bool) -> None:
        # The track freezes at once and the worker skips the session (the section in flight finishes).
        # VideoStream.pause() is deliberately not used: it blocks inside __next__, which would hold the
        # device thread that every session shares.
        self.generation.paused = self.track.paused = paused
        self.state = "paused" if paused else "running"
        self.worker.wake()
        self.broadcast(control.state(self.state))

    def _on_frame_played(self, frame: BufferedFrame) -> None:
        """Called by the track (event loop) for each new frame: reports when a new prompt reaches the screen.

        Matched on the frame's own prompt, not only the acked section index, so the report is right even if
        a prompt lands later than announced; prompts replaced before they ever showed are dropped with it.
        """
        for i in range(len(self._pending) - 1, -1, -1):
            p = self._pending[i]
            if frame.section >= p.section and frame.prompt == p.text:
                del self._pending[: i + 1]
                self.broadcast(control.prompt_live(p.id, frame.section, (time.monotonic() - p.received) * 1000))
                return

    # -- stats -----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        play, gen = self.track.stats, self.generation
        depth = len(self.buffer)
        return {
            "type": "stats", "state": self.state, "fps": self.fps,
            "gen_fps": round(gen.gen_fps, 2), "play_fps": round(self.track.play_fps, 2),
            "buffer": depth, "capacity": self.buffer.capacity, "buffer_ms": round(depth / self.fps * 1000),
            "buffering": play.buffering, "stalls": play.stalls, "held": play.held, "sent": play.sent,
            "played": play.new, "generated": gen.frames, "sections": gen.sections,
            "section_ms": round(gen.last_section_ms, 1), "playing": [play.section, play.frame],
            "viewers": len(self.viewers), "server_time": time.time(),
        }

    def summary(self) -> dict[str, Any]:
        """The /api/sessions entry."""
        return {"id": self.id, "prompt": self.prompt, "sections_done": self.generation.sections,
                "viewers": len(self.viewers), "state": self.state, "created": self.created,
                "frames_generated": self.generation.frames, "frames_played": self.track.stats.new}

    async def _tick(self) -> None:
        """Once a second: stats to every viewer; close the session after ``idle_timeout`` s without viewers."""
        while not self._closed:
            await asyncio.sleep(1.0)
            if self.viewers:
                self.broadcast(self.stats())
            elif time.monotonic() - self._last_viewer_left > self.idle_timeout:
                log.info("session %s: no viewers for %.0f s, closing", self.id, self.idle_timeout)
                self.loop.create_task(self.close())
                return
