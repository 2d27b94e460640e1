"""The paced video track a session plays out, and its 90 kHz clock.

Slow-generation policy: **hold the last frame and report buffering.** The track ticks at exactly ``fps``
whatever the generator does. On each tick it takes the next generated frame from the bounded
:class:`~framepack_rt.stream.buffer.FrameBuffer`; when the buffer is empty (generation slower than playback)
it sends the last frame again, counts it as held, and reports ``buffering`` until new frames arrive. So:

* the delay from generating a frame to sending it never exceeds ``capacity / fps`` (the buffer is bounded and
  frames are never queued anywhere else: viewers get the relay's latest frame, not a queue);
* the stream never stops or slows: the browser's jitter buffer sees a steady 90 kHz timeline, and a slow
  generator shows up as a freeze of the last frame, honestly reported in the stats, not as slow motion;
* the played fps (new frames per second) is measured and reported next to the generation fps.

Adapting the playback rate instead would hide the shortfall as slow motion and makes the delay depend on a
rate estimate; holding keeps motion at its true speed and makes the shortfall visible and measurable.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from framepack_rt.stream.buffer import BufferedFrame, FrameBuffer
from framepack_rt.stream.stamp import StampLog, stamp_yuv

VIDEO_CLOCK_RATE = 90_000  # RTP video clock (RFC 3551)
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class FrameClock:
    """Paces ticks at ``fps`` and returns each tick's pts on the 90 kHz clock.

    pts follow wall time: if the event loop stalls for more than two frame periods, the clock skips the
    missed ticks (pts jump) instead of sending a burst of late frames that would sit in the receiver's
    jitter buffer as extra delay.
    """

    def __init__(self, fps: float, now: Callable[[], float] = time.monotonic) -> None:
        if not 0 < fps <= 120:
            raise ValueError(f"fps must be in (0, 120], got {fps}")
        self.fps = fps
        self._now = now
        self._start: float | None = None
        self._n = 0
        self.skipped = 0

    @property
    def ticks(self) -> int:
        """Tick number of the last tick (0-based); -1 before the first."""
        return -1 if self._start is None else self._n

    def pts(self, n: int) -> int:
        return round(n * VIDEO_CLOCK_RATE / self.fps)

    async def tick(self) -> int:
        if self._start is None:
            self._start = self._now()
            self._n = 0
            return 0
        self._n += 1
        delay = self._start + self._n / self.fps - self._now()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > 2 / self.fps:
            behind = int((self._now() - self._start) * self.fps)
            self.skipped += behind - self._n
            self._n = behind
        return self.pts(self._n)


@dataclass
class PlaybackStats:
    """What the track has sent: the numbers behind the stats line."""

    sent: int = 0  # ticks, i.e. frames handed to the encoders (new + held)
    new: int = 0  # generated frames played
    held: int = 0  # ticks that repeated the last frame because the buffer was empty (or paused)
    stalls: int = 0  # times playback ran dry while generation was still going
    buffering: bool = False  # the buffer is empty right now and the generator is still running
    frame: int = -1  # index (in the video) of the last generated frame played
    section: int = -1  # its section


class SessionTrack(MediaStreamTrack):
    """A video track that plays a session's frame buffer at ``fps``, holding the last frame when it runs dry.

    One per session; viewers get relay proxies of it (aiortc MediaRelay, unbuffered: a slow viewer skips
    frames rather than queueing them). Control attributes are set on the event loop by the session:
    ``paused`` (hold the current frame, leave the buffer alone) and ``source_done`` (generation ended, so
    an empty buffer is the end of the video, not buffering).
    """

    kind = "video"

    def __init__(self, buffer: FrameBuffer, fps: float, placeholder: np.ndarray,
                 on_frame: Callable[[BufferedFrame], None] | None = None) -> None:
        """placeholder: the I420 frame sent until the first generated one arrives (the start image)."""
        super().__init__()
        self.buffer = buffer
        self.clock = FrameClock(fps)
        self.paused = False
        self.source_done = False
        self.stats = PlaybackStats()
        self._last = placeholder
        self._on_frame = on_frame
        self._recent_new: deque[float] = deque()  # monotonic times of new frames over the last 2 s
        # Opt-in (ServerSettings.stamp): frame numbers stamped into the pixels, send times logged here.
        self.stamps: StampLog | None = None

    @property
    def play_fps(self) -> float:
        """New (generated) frames played per second over the last two seconds."""
        self._trim(time.monotonic())
        return len(self._recent_new) / 2.0

    def _trim(self, now: float) -> None:
        while self._recent_new and now - self._recent_new[0] > 2.0:
            self._recent_new.popleft()

    def next_frame(self) -> np.ndarray:
        """The I420 frame for this tick (a new one from the buffer or the held last one); updates stats."""
        item = None if self.paused else self.buffer.get_nowait()
        stats = self.stats
        stats.sent += 1
        if item is None:
            stats.held += 1
            starved = not self.paused and not self.source_done
            if starved and not stats.buffering and stats.new > 0:
                stats.stalls += 1
            stats.buffering = starved
            return self._last
        stats.new += 1
        stats.buffering = False
        stats.frame, stats.section = item.index, item.section
        now = time.monotonic()
        self._recent_new.append(now)
        self._trim(now)
        yuv = item.yuv
        if self.stamps is not None:  # glass-to-glass benchmarks: the number in the pixels, and when it left
            yuv = stamp_yuv(yuv, item.index)
            self.stamps.record(item.index, item.section, item.generated_at, now)
        self._last = yuv
        if self._on_frame is not None:
            self._on_frame(item)
        return yuv

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self.clock.tick()
        if self.readyState != "live":  # stopped while waiting for the tick
            raise MediaStreamError
        # A fresh VideoFrame per tick: relay proxies may still hold the previous one with its own pts.
        frame = av.VideoFrame.from_ndarray(self.next_frame(), format="yuv420p")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        return frame


class CountedTrack(MediaStreamTrack):
    """One viewer's view of the session's relay: counts each frame that viewer's encoder takes (the metrics'
    frames sent). Stopping it stops the relay proxy underneath, which detaches it from the relay."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, on_frame: Callable[[], None]) -> None:
        super().__init__()
        self._source = source
        self._on_frame = on_frame

    async def recv(self) -> av.VideoFrame:
        frame = await self._source.recv()
        self._on_frame()
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.stop()
