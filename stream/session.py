"""A generation session (one generator, one paced track) and its viewers (one RTCPeerConnection each).

Everything here runs on the event loop except :class:`~framepack_rt.stream.generation.Generation`, which the
device worker drives; the worker talks back only through :meth:`Session.post` (``call_soon_threadsafe``).
Pipeline calls that may block (building the stream, which encodes the image and prompt; set_prompt; stop)
run on the server's single control thread, in order, never on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from framepack_rt.pipeline.media import PromptChange
from framepack_rt.stream import control
from framepack_rt.stream.buffer import BufferedFrame, FrameBuffer
from framepack_rt.stream.generation import DeviceWorker, Generation, VideoStreamLike
from framepack_rt.stream.ice import IcePolicy, policy_scope
from framepack_rt.stream.limits import LimitExceeded, SessionPolicy
from framepack_rt.stream.security import CONTROL, new_key
from framepack_rt.stream.metrics import ServerMetrics
from framepack_rt.stream.tracks import CountedTrack, SessionTrack
from framepack_rt.stream.viewers import SDP_ERRORS, Viewer

log = logging.getLogger(__name__)

ERROR_LINGER_S = 3.0  # a failed session stays up this long so that its viewers receive the error message
VIEW_ONLY = ("this is a view-only connection: it cannot change the prompt or pause/stop the session. Join "
             "with the server token (or start your own session) to control one")


@dataclass
class PendingPrompt:
    id: str | int | None
    text: str
    section: int  # where the pipeline said it applies from
    received: float  # time.monotonic()
    blended: bool = False  # a transition: its first frames carry a blend's label, so matched on the section


class Session:
    """One generator streamed to any number of viewers (up to ``policy.max_viewers``) through a relay of one
    paced track. With no viewers it stops generating and closes after ``policy.grace`` seconds.

    Its life: created (listed, shows the start image, nothing generated) -> a viewer's connection comes up
    (:meth:`wait_connected`) -> :meth:`start` builds the pipeline's stream (the encoders run) -> generating.
    If no viewer connects within ``policy.connect_timeout`` of its creation it closes, with no grace: an
    offer that never completes ICE holds a session slot for that long at most, and never runs an encoder.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop, worker: DeviceWorker, executor: Executor,
                 fps: float, capacity: int, placeholder_yuv, ice_servers: list[RTCIceServer] | None = None,
                 ice_policy: IcePolicy | None = None, policy: SessionPolicy | None = None,
                 on_closed: Callable[["Session"], None] | None = None, view_slots: int | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.id = new_session_id()
        self.view_key = new_key()  # the join link's key: watch this session, nothing more
        self.control_key = new_key()  # given to viewers with control: release it, download its video
        self.settings: dict[str, Any] = {}  # the start settings in use (seed, steps, cfg, window, bucket)
        self.created = time.time()
        self.loop, self.worker, self.executor = loop, worker, executor
        self.fps = fps
        self.policy = policy or SessionPolicy()
        # View-only viewers are let in while fewer than this many viewers watch: the last places stay for control.
        self.view_slots = self.policy.max_viewers if view_slots is None else view_slots
        self.state = "starting"
        self.prompt = ""
        self.viewers: dict[str, Viewer] = {}
        self.buffer = FrameBuffer(capacity, on_space=worker.wake)
        self.metrics = metrics
        self.generation = Generation(self.buffer, self.post, on_section=metrics.section if metrics else None)
        self.generation.watched = False  # until the first viewer arrives
        self.track = SessionTrack(self.buffer, fps, placeholder_yuv, on_frame=self._on_frame_played)
        self.relay = MediaRelay()
        self._ice_servers = list(ice_servers or [])
        self._ice_policy = ice_policy  # which addresses and ports viewers' connections use (stream/ice.py)
        self._pending: list[PendingPrompt] = []
        self.transition_sections = 0  # a prompt without "transition" blends in over this many (serve flag)
        self.blend: list[dict[str, Any]] = []  # the weighted prompts of the last section generated
        self.timeline: list[dict[str, Any]] = []  # the timeline in use: entries with the section each takes over
        self._on_closed = on_closed
        self._closed = False
        self._empty_since: float | None = time.monotonic()  # no viewers since then (None: has viewers)
        self._idle_since: float | None = None  # not generating since then (paused, stopped, ended)
        self._failed_at: float | None = None
        self._ticker: asyncio.Task | None = None
        self._since = time.monotonic()  # created
        self.close_reason = ""
        self._connected = asyncio.Event()  # a viewer's connection came up (at least once)
        self._closed_event = asyncio.Event()
        self._started = asyncio.Event()  # the stream is built (or the session closed): control can act

    def open(self) -> None:
        """Start the housekeeping (stats, dropping gone viewers, closing on the timeouts) from creation on."""
        if self._ticker is None and not self._closed:
            self._ticker = self.loop.create_task(self._tick())

    async def wait_connected(self) -> bool:
        """True once a viewer's connection is up; False if the session closed before any did."""
        waits = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._closed_event.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return self._connected.is_set() and not self._closed

    @property
    def age(self) -> float:
        """Seconds since the session was created."""
        return time.monotonic() - self._since

    @property
    def connected(self) -> bool:
        """A viewer's connection has come up at least once."""
        return self._connected.is_set()

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
        self._started.set()
        self.broadcast(control.state("running"))  # viewers greeted while "starting" learn that it runs now
        self.open()

    async def close(self, reason: str = "") -> None:
        """End generation and playback and hang up on every viewer (telling them ``reason``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        self._started.set()
        self.close_reason = reason or "closed"
        if reason:
            self.broadcast(control.state("closed", reason))
        self.generation.done = True
        self.worker.remove(self.generation)
        self.buffer.close()  # unblocks a worker waiting in put()
        stream = self.generation.stream
        if stream is not None:
            await self.loop.run_in_executor(self.executor, stream.stop)
        if self._ticker is not None and self._ticker is not asyncio.current_task():
            self._ticker.cancel()
        self.track.stop()
        viewers = list(self.viewers.values())
        self.viewers.clear()
        for viewer in viewers:
            viewer.settled()
        await asyncio.gather(*(v.close() for v in viewers))
        if self.state not in ("finished", "error"):
            self.state = "closed"
        if self._on_closed is not None:
            self._on_closed(self)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> str:
        """Returns once the session has closed: why it did."""
        await self._closed_event.wait()
        return self.close_reason

    # -- viewers ---------------------------------------------------------------------------------------------
    async def add_viewer(self, sdp: str, kind: str, role: str = CONTROL,
                         settled: Callable[[], None] | None = None) -> RTCSessionDescription:
        """Answer one viewer's offer: a relay proxy of the session track plus the control channel.

        ``settled`` is called once, when the viewer's connection comes up or the viewer goes (the server
        counts offers pending per client with it). Raises LimitExceeded when the session has ``max_viewers``
        already (view-only joiners: ``view_slots``), ValueError for an offer that cannot be answered (the
        half-made connection is closed again).
        """
        if len(self.viewers) >= self.policy.max_viewers:
            raise LimitExceeded(f"session {self.id} has its maximum of {self.policy.max_viewers} viewers; "
                                "try again when one leaves")
        if role != CONTROL and len(self.viewers) >= self.view_slots:
            raise LimitExceeded(f"session {self.id} has no place left for view-only viewers (its last "
                                f"{self.policy.max_viewers - self.view_slots} are kept for viewers with control); "
                                "try again when one leaves")
        with policy_scope(self._ice_policy):  # the ICE connections made in here follow the server's policy
            return await self._answer(sdp, kind, role, settled)

    async def _answer(self, sdp: str, kind: str, role: str,
                      settled: Callable[[], None] | None) -> RTCSessionDescription:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        viewer = Viewer(pc=pc, role=role, policy=self.policy)
        if settled is not None:
            viewer.settled = settled
        # Counted from now, not once answered: concurrent offers cannot overshoot max_viewers.
        self.viewers[viewer.id] = viewer
        self._viewers_changed()

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            if channel.label != "control" or viewer.channel is not None:
                return
            viewer.channel = channel
            channel.on("message", lambda raw: self._on_message(viewer, raw))
            if channel.readyState == "open":
                self._greet(viewer)
            else:
                channel.on("open", lambda: self._greet(viewer))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and viewer.connected_at is None:
                viewer.connected_at = time.time()
                viewer.settled()
                self._connected.set()
            elif pc.connectionState in ("failed", "closed"):
                await self.remove_viewer(viewer)

        # Unbuffered relay: each viewer gets the latest frame; a slow encoder skips instead of queueing.
        viewer.track = self.relay.subscribe(self.track, buffered=False)
        if self.metrics is not None:
            viewer.track = CountedTrack(viewer.track, self.metrics.frame_sent)
        viewer.sender = pc.addTrack(viewer.track)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
            # Send our video, receive nothing: media a viewer offers to send would be decoded into queues
            # nobody reads (memory without bound), so every other m-line is answered inactive.
            for transceiver in pc.getTransceivers():
                transceiver.direction = "sendonly" if transceiver.sender is viewer.sender else "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
        except SDP_ERRORS as exc:  # aiortc's reactions to a malformed SDP: logged, never sent to the client
            log.debug("session %s: offer not answerable: %s: %s", self.id, type(exc).__name__, exc)
            await self.remove_viewer(viewer)
            raise ValueError("could not answer the offer: it is not one a browser sends; send the browser's "
                             "pc.localDescription after ICE gathering completes") from None
        if self._closed or viewer.id not in self.viewers:  # the session ended meanwhile
            await viewer.close()
            raise ValueError("the session closed while answering; start a new session")
        return pc.localDescription

    async def remove_viewer(self, viewer: Viewer, reason: str = "") -> None:
        """Forget ``viewer`` and free what it held (its proxy track, its peer connection). Idempotent."""
        if self.viewers.pop(viewer.id, None) is None:
            return
        viewer.settled()
        if reason:
            log.info("session %s: dropping viewer %s, %s", self.id, viewer.id, reason)
        self._viewers_changed()
        await viewer.close()

    def _viewers_changed(self) -> None:
        """Generate only while someone watches; start the grace period when the last viewer leaves."""
        watched = bool(self.viewers)
        self._empty_since = None if watched else (self._empty_since or time.monotonic())
        if watched != self.generation.watched:
            self.generation.watched = watched
            self.worker.wake()

    def _greet(self, viewer: Viewer) -> None:
        viewer.send({"type": "hello", "session": self.id, "viewer": viewer.id, "fps": self.fps,
                     "state": self.state, "prompt": self.prompt, "role": viewer.role, "settings": self.settings})

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
            live = self.state in ("running", "paused")
            if live:
                self.state = message["state"]
            if message["state"] == "error":
                self._failed_at = time.monotonic()
            self.track.source_done = True
            if not live:  # stopped or closed already: a stopped stream's end is not "finished"
                return
        elif message["type"] == "section" and "blend" in message:
            self.blend = message["blend"]
        self.broadcast(message)

    def broadcast(self, message: dict[str, Any]) -> None:
        for viewer in list(self.viewers.values()):
            viewer.send(message)

    def _on_message(self, viewer: Viewer, raw: str | bytes) -> None:
        """Every message costs a token first: a flood is dropped before any parsing, with one error a second."""
        verdict = viewer.limiter.check()
        if verdict != "ok":
            if verdict == "warn":
                viewer.send(control.error(
                    f"too many control messages (at most {self.policy.message_rate:g} a second, "
                    f"{self.policy.message_burst} at once); the excess was dropped"))
            return
        try:
            msg = control.parse_client_message(raw, self.policy.max_prompt_chars)
        except control.ControlError as exc:
            viewer.send(control.error(str(exc)))
            return
        if isinstance(msg, control.PingMessage):
            viewer.send(control.pong(msg.t, time.time()))
            return
        if viewer.role != CONTROL:
            viewer.send(control.error(VIEW_ONLY))
            return
        self.loop.create_task(self._act(viewer, msg))

    async def _act(self, viewer: Viewer, msg: control.ClientMessage) -> None:
        if self.state == "starting":  # the encoders run once the first viewer is connected: act after them
            await self._started.wait()
        stream = self.generation.stream
        if stream is None or self.state not in ("running", "paused"):
            viewer.send(control.error(f"session {self.id} is {self.state}; start a new session to generate"))
            return
        if isinstance(msg, control.PromptMessage):
            await self._set_prompt(viewer, stream, msg)
        elif isinstance(msg, control.TimelineMessage):
            await self._set_timeline(viewer, stream, msg)
        elif isinstance(msg, control.LoraMessage):
            await self._set_lora(viewer, stream, msg)
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

    async def _set_prompt(self, viewer: Viewer, stream: VideoStreamLike, msg: control.PromptMessage) -> None:
        """A prompt (or weighted prompts), blended in over its transition (default: the server's)."""
        received = time.monotonic()
        transition = self.transition_sections if msg.transition is None else msg.transition
        if msg.prompts is None and transition == 0:
            call = functools.partial(stream.set_prompt, msg.text)
        else:
            value = msg.text if msg.prompts is None else list(msg.prompts)
            call = functools.partial(stream.set_prompt, value, transition_sections=transition)
        try:
            section = int(await self.loop.run_in_executor(self.executor, call))
        except (ValueError, RuntimeError) as exc:
            viewer.send(control.error(f"prompt not applied: {exc}"))
            return
        self.prompt = msg.text
        self._pending.append(PendingPrompt(msg.id, msg.text, section, received, blended=transition > 1))
        self.broadcast(control.ack(msg.id, section, msg.text, transition=transition or None,
                                   prompts=None if msg.prompts is None else list(msg.prompts)))

    async def _set_timeline(self, viewer: Viewer, stream: VideoStreamLike, msg: control.TimelineMessage) -> None:
        """A prompt timeline in video seconds from the session's start (an empty one drops the timeline)."""
        transition = self.transition_sections if msg.transition is None else msg.transition
        changes = [PromptChange(seconds, prompt) for seconds, prompt in msg.entries] or None
        call = functools.partial(stream.set_prompt_schedule, changes, transition_sections=transition)
        try:
            section, sections = await self.loop.run_in_executor(self.executor, call)
        except (ValueError, RuntimeError) as exc:
            viewer.send(control.error(f"timeline not applied: {exc}"))
            return
        entries = [(seconds, prompt, k) for (seconds, prompt), k in zip(msg.entries, sections)]
        message = control.timeline_ack(msg.id, int(section), entries, transition)
        self.timeline = message["timeline"]
        self.broadcast(message)

    async def _set_lora(self, viewer: Viewer, stream: VideoStreamLike, msg: control.LoraMessage) -> None:
        """This session's scale of one LoRA adapter, from the next section on (the pipeline checks it)."""
        call = functools.partial(stream.set_lora_scale, msg.name, msg.scale)
        try:
            section = int(await self.loop.run_in_executor(self.executor, call))
        except (ValueError, RuntimeError) as exc:
            viewer.send(control.error(f"LoRA scale not applied: {exc}"))
            return
        self.broadcast(control.lora_ack(msg.id, msg.name, msg.scale, section))

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
            if frame.section >= p.section and (p.blended or frame.prompt == p.text):
                del self._pending[: i + 1]
                self.broadcast(control.prompt_live(p.id, frame.section, (time.monotonic() - p.received) * 1000,
                                                   prompt=frame.prompt))
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
                "generating": self.generation.watched and self.state == "running",
                "frames_generated": self.generation.frames, "frames_played": self.track.stats.new,
                "settings": self.settings, "blend": self.blend, "timeline": self.timeline,
                "transition_sections": self.transition_sections}

    # -- housekeeping ----------------------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Once a second: stats to every viewer, drop vanished viewers, close the session when it is over."""
        while not self._closed:
            await asyncio.sleep(1.0)
            if self.viewers:
                self.broadcast(self.stats())
            await self._drop_gone_viewers()
            reason = self._why_close(time.monotonic())
            if reason:
                await self.close(reason)
                return

    async def _drop_gone_viewers(self) -> None:
        viewers = list(self.viewers.values())
        reasons = await asyncio.gather(*(v.check() for v in viewers))
        for viewer, reason in zip(viewers, reasons):
            if reason:
                await self.remove_viewer(viewer, reason)

    def _why_close(self, now: float) -> str:
        """Why the session should close now ("" while it should go on)."""
        p = self.policy
        if not self._connected.is_set():  # no viewer ever connected: no grace, nothing was generated
            if now - self._since > p.connect_timeout:
                return f"no viewer connected within {p.connect_timeout:g} s"
            return ""
        if self._failed_at is not None and now - self._failed_at > ERROR_LINGER_S:
            return "generation failed"
        if self._empty_since is not None and now - self._empty_since > p.grace:
            return f"no viewers for {p.grace:g} s"
        if self.state in ("starting", "running"):
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since > p.idle_timeout:
            return f"{self.state} with nothing generated for {p.idle_timeout:g} s"
        return ""


def new_session_id() -> str:
    """128 random bits, URL-safe: an id cannot be guessed (it is not a credential, but it names the session)."""
    return secrets.token_urlsafe(16)
