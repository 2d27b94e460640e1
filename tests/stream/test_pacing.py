"""Pacing and buffering: the 90 kHz clock, the bounded frame buffer, the device worker, and the policy for a
generator slower than playback (hold the last frame, report buffering, never build up delay).

These drive the server pieces with a test-local source that implements the pipeline's VideoStream interface
(timed sections of synthetic frames); the end-to-end tests use the real tiny pipeline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from framepack_rt.stream.buffer import BufferedFrame, FrameBuffer, rgb_to_yuv420, yuv420_to_rgb
from framepack_rt.stream.generation import DeviceWorker, Generation
from framepack_rt.stream.tracks import VIDEO_CLOCK_RATE, FrameClock, SessionTrack

H, W = 32, 48


@dataclass
class FakeSection:
    index: int
    frames: np.ndarray
    prompt: str
    ms: float
    ms_per_step: float
    steps_run: int
    steps_skipped: int
    is_last: bool
    first_frame: int


class TimedSource:
    """VideoStream stand-in: each section takes ``seconds`` and yields ``frames`` frames numbered in pixels."""

    def __init__(self, frames: int, seconds: float, sections: int | None = None) -> None:
        self.frames, self.seconds, self.sections = frames, seconds, sections
        self.sections_done = 0
        self.prompt = "p"
        self._stopped = threading.Event()

    def __next__(self) -> FakeSection:
        if self._stopped.is_set() or (self.sections is not None and self.sections_done >= self.sections):
            raise StopIteration
        time.sleep(self.seconds)
        k = self.sections_done
        first = k * self.frames
        frames = np.zeros((self.frames, H, W, 3), np.uint8)
        # Frame number as a gray level (8 per step): luma survives the I420 round trip, chroma would not.
        frames[:] = ((first + np.arange(self.frames)) * 8 % 240)[:, None, None, None]
        self.sections_done += 1
        last = self.sections is not None and self.sections_done == self.sections
        return FakeSection(k, frames, self.prompt, self.seconds * 1000, 1.0, 1, 0, last, first)

    def set_prompt(self, text: str) -> int:
        self.prompt = text
        return self.sections_done + 1

    def pause(self) -> None: ...
    def resume(self) -> None: ...

    def stop(self) -> None:
        self._stopped.set()


def _frame(i: int) -> BufferedFrame:
    return BufferedFrame(np.zeros((6, 4), np.uint8), i, 0, time.monotonic())


# -- clock ------------------------------------------------------------------------------------------------------

def test_clock_pts_step_exactly_on_the_90khz_clock():
    clock = FrameClock(30)
    assert [clock.pts(n) for n in range(4)] == [0, 3000, 6000, 9000]
    odd = FrameClock(7)  # 90000 / 7 is not an integer: rounding must stay monotonic and never drift
    pts = [odd.pts(n) for n in range(1000)]
    assert all(b > a for a, b in zip(pts, pts[1:]))
    assert pts[-1] == round(999 * VIDEO_CLOCK_RATE / 7)


def test_clock_paces_at_fps():
    async def run() -> tuple[list[int], float]:
        clock = FrameClock(50)
        began = time.monotonic()
        pts = [await clock.tick() for _ in range(26)]
        return pts, time.monotonic() - began

    pts, elapsed = asyncio.run(run())
    assert pts == [n * 1800 for n in range(26)]
    assert 0.45 <= elapsed < 0.7  # 25 periods of 20 ms


def test_clock_skips_ticks_after_a_stall_instead_of_bursting():
    now = [100.0]
    clock = FrameClock(10, now=lambda: now[0])

    async def run() -> list[int]:
        out = [await clock.tick()]
        now[0] += 1.0  # the loop was blocked for 10 frame periods
        out.append(await clock.tick())
        return out

    pts = asyncio.run(run())
    assert pts[1] == 10 * 9000  # jumped to wall time, not 1 * 9000 followed by a burst of 9 late frames
    assert clock.skipped == 9


def test_clock_rejects_bad_fps():
    with pytest.raises(ValueError, match="fps"):
        FrameClock(0)


# -- buffer -----------------------------------------------------------------------------------------------------

def test_buffer_is_bounded_and_put_waits_for_room():
    woken = []
    buf = FrameBuffer(3, on_space=lambda: woken.append(1))
    for i in range(3):
        assert buf.put(_frame(i))
    assert buf.free == 0
    assert not buf.put(_frame(3), timeout=0.05)  # full: a put waits, it never grows the buffer
    done = threading.Event()

    def producer() -> None:
        buf.put(_frame(3))
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    time.sleep(0.05)
    assert not done.is_set() and len(buf) == 3
    assert buf.get_nowait().index == 0
    assert done.wait(1.0)
    assert [buf.get_nowait().index for _ in range(3)] == [1, 2, 3]
    assert buf.get_nowait() is None
    assert buf.max_depth == 3 and woken


def test_buffer_close_releases_a_waiting_producer():
    buf = FrameBuffer(1)
    buf.put(_frame(0))
    result = []
    t = threading.Thread(target=lambda: result.append(buf.put(_frame(1))))
    t.start()
    time.sleep(0.05)
    buf.close()
    t.join(1.0)
    assert result == [False] and not t.is_alive()


def test_yuv_round_trip_and_odd_sizes():
    rgb = np.zeros((17, 23, 3), np.uint8)
    rgb[..., 1] = 200
    yuv = rgb_to_yuv420(rgb)
    assert yuv.shape == (16 * 3 // 2, 22)  # cropped to even
    back = yuv420_to_rgb(yuv)
    assert np.abs(back.astype(int) - rgb[:16, :22].astype(int)).max() <= 4
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_yuv420(rgb.astype(np.float32))


# -- policy: worker + buffer + paced track ----------------------------------------------------------------------

async def _play(source: TimedSource, fps: float, capacity: int, seconds: float):
    """Run a source through a worker into a paced track for ``seconds``; returns what the track sent."""
    worker = DeviceWorker("test")
    buffer = FrameBuffer(capacity, on_space=worker.wake)
    messages: list[dict] = []
    gen = Generation(buffer, messages.append)  # list.append is thread-safe: fine as the post callback
    placeholder = rgb_to_yuv420(np.full((H, W, 3), 255, np.uint8))
    delays: list[float] = []
    track = SessionTrack(buffer, fps, placeholder, on_frame=lambda f: delays.append(time.monotonic() - f.generated_at))
    gen.attach(source)
    worker.add(gen)
    sent = []
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds:
            frame = await track.recv()
            gray = int(frame.to_ndarray(format="rgb24")[..., 1].mean())
            sent.append((time.monotonic(), frame.pts, -1 if gray > 245 else round(gray / 8)))
            if track.stats.buffering:
                messages.append({"type": "_buffering_seen"})
    finally:
        source.stop()
        buffer.close()
        worker.close(5)
        track.stop()
    return sent, track, gen, buffer, delays, messages


def test_slow_generation_holds_the_last_frame_and_keeps_time():
    # 4 frames every 0.4 s = 10 fps of generation against 30 fps playback.
    source = TimedSource(frames=4, seconds=0.4)
    sent, track, gen, buffer, delays, messages = asyncio.run(_play(source, fps=30, capacity=30, seconds=2.0))
    times = np.array([t for t, _, _ in sent])
    pts = np.array([p for _, p, _ in sent])
    # The track keeps delivering at 30 fps: exact 3000-tick pts steps, real spacing ~33 ms.
    assert np.all(np.diff(pts) == 3000)
    assert 50 <= len(sent) <= 62
    assert np.median(np.diff(times)) == pytest.approx(1 / 30, abs=0.004)
    # Generation is the bottleneck: most ticks repeat the last frame, and that is reported.
    stats = track.stats
    assert stats.held > stats.new > 0
    assert stats.stalls >= 2 and any(m["type"] == "_buffering_seen" for m in messages)
    # No delay builds up: a generated frame is played within a tick or so of entering the buffer.
    assert max(delays) < 0.25
    # New frames are played in order, none skipped or repeated as "new".
    played = [v for _, _, v in sent if v >= 0]
    firsts = list(dict.fromkeys(played))
    assert firsts == sorted(firsts) and firsts[:4] == [0, 1, 2, 3]
    assert any(m["type"] == "section" for m in messages)


def test_fast_generation_waits_for_room_and_never_grows_the_buffer():
    # 12-frame sections generated instantly: unchecked, this would be thousands of frames a second.
    source = TimedSource(frames=12, seconds=0.0)
    sent, track, gen, buffer, delays, _ = asyncio.run(_play(source, fps=30, capacity=24, seconds=1.5))
    assert buffer.max_depth <= 24
    # The worker only ran as far ahead as the buffer allows.
    assert gen.frames <= track.stats.new + 24 + 12
    assert track.stats.held <= 2  # (the first tick may come before the first section)
    # Delay is bounded by the buffer: capacity / fps = 0.8 s.
    assert max(delays) <= 24 / 30 + 0.1
    played = [v for _, _, v in sent if v >= 0]
    assert played[:24] == list(range(24))  # every frame, in order, each once


def test_paused_track_holds_and_leaves_the_buffer_alone():
    buffer = FrameBuffer(4)
    for i in range(2):
        buffer.put(BufferedFrame(rgb_to_yuv420(np.full((H, W, 3), i, np.uint8)), i, 0, time.monotonic()))
    track = SessionTrack(buffer, 30, rgb_to_yuv420(np.full((H, W, 3), 255, np.uint8)))
    track.paused = True
    track.next_frame()
    assert len(buffer) == 2 and track.stats.held == 1 and not track.stats.buffering
    track.paused = False
    track.next_frame()
    assert len(buffer) == 1 and track.stats.frame == 0


def test_end_of_video_is_not_buffering():
    source = TimedSource(frames=3, seconds=0.0, sections=2)
    sent, track, gen, buffer, delays, messages = asyncio.run(_play(source, fps=30, capacity=8, seconds=0.6))
    assert gen.done and gen.frames == 6 and track.stats.new == 6
    assert {"type": "state", "state": "finished", "detail": "the video reached its end"} in messages


def test_worker_round_robins_between_sessions():
    worker = DeviceWorker("test")
    runs: list[str] = []

    class Recorder(Generation):
        def run_section(self) -> None:
            runs.append(self.name)
            time.sleep(0.01)

    a, b = Recorder(FrameBuffer(10), lambda m: None), Recorder(FrameBuffer(10), lambda m: None)
    a.name, b.name = "a", "b"
    a.attach(TimedSource(1, 0)), b.attach(TimedSource(1, 0))
    worker.add(a)
    worker.add(b)
    time.sleep(0.2)
    worker.close(2)
    assert len(runs) > 6
    assert all(x != y for x, y in zip(runs[1:], runs[2:]))  # once both are in, they alternate
