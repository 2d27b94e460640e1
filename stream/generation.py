"""Generation off the event loop: one :class:`DeviceWorker` thread per device runs every session's sections.

The worker owns the device: sections of different sessions never run at the same time on it (a second
thread would only make both slower and double the memory). It round-robins over the sessions that are
*ready* (not paused, not finished, and with room in their bounded buffer for a whole section) and waits on a
condition when none is; buffers wake it when the track takes frames out. So a generator faster than playback
waits instead of filling memory, and a slow one is never waited on.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np

from framepack_rt.stream import control
from framepack_rt.stream.buffer import BufferedFrame, FrameBuffer, rgb_to_yuv420
from framepack_rt.stream.images import encode_jpeg_data_url, upscale_preview

log = logging.getLogger(__name__)

Post = Callable[[dict[str, Any]], None]  # thread-safe: hands a server message to the event loop


class VideoStreamLike(Protocol):
    """What :class:`Generation` needs from ``FramePackPipeline.stream(...)``."""

    def __next__(self) -> Any: ...
    def set_prompt(self, text: str) -> int: ...  # also (text | [(text, weight)], transition_sections=N)
    def set_prompt_schedule(self, schedule: Any, transition_sections: int = 0) -> tuple[int, list[int | None]]: ...
    def stop(self) -> None: ...


class FrameSink(Protocol):
    """Where a session's generated frames are kept besides the buffer (a Recording)."""

    def add(self, frames: np.ndarray) -> None: ...


class Generation:
    """One session's generator, driven section by section by a :class:`DeviceWorker` (worker thread).

    ``paused`` and ``done`` are plain attributes written on the event loop and read on the worker: a stale
    read costs at most one extra readiness check, and the worker is woken after every change.
    """

    PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress messages a second per session (plus first/last step)
    PREVIEW_INTERVAL_S = 0.25  # previews are JPEGs: a few a second are plenty

    def __init__(self, buffer: FrameBuffer, post: Post,
                 on_section: Callable[[int, float], None] | None = None) -> None:
        self.buffer = buffer
        self.post = post
        self.on_section = on_section  # (frames, pipeline seconds) per section, on this thread: the metrics
        self.recording: FrameSink | None = None  # keeps the video as generated (stream/recording.py)
        self.stream: VideoStreamLike | None = None  # attached once the pipeline has built it
        self.paused = False
        self.watched = True  # False while the session has no viewers: nobody to generate for
        self.done = False
        self.error: str | None = None
        self.sections = 0
        self.frames = 0
        self.last_section_ms = 0.0  # the pipeline's own sample + decode time of the last section
        self.gen_fps = 0.0  # frames per second of wall time spent generating (EMA over sections)
        self.section_frames = 1  # the most frames a section has handed over: the room one needs in the buffer
        self.sampling = False  # a section of this session is open in the batching worker (stream/batching.py)
        self._holds = 0  # actions on this session running or queued, on any thread (worker, decode)
        self._holds_lock = threading.Lock()
        self._last_progress = 0.0
        self._last_preview = 0.0

    def attach(self, stream: VideoStreamLike) -> None:
        self.stream = stream
        # Room for the largest section from the start: the first is shorter than the rest (25 then 36 frames
        # at window 9), and a handover that waits for buffer room would hold up the worker's other sessions.
        self.section_frames = max(self.section_frames, int(getattr(stream, "max_section_frames", 1)))

    def ready(self) -> bool:
        """Worth a section now: running, and the buffer has room for a whole one (so put() will not wait)."""
        if self.stream is None or self.paused or not self.watched or self.done or self.buffer.closed:
            return False
        return self.buffer.free >= min(self.section_frames, self.buffer.capacity)

    # -- worker thread ---------------------------------------------------------------------------------------
    def run_section(self) -> None:
        """Generate one section and push its frames (worker thread). Never raises: failures end the session."""
        assert self.stream is not None
        stream = self.stream
        self.guarded(lambda: self._run_section(stream))

    def guarded(self, action: Callable[[], None]) -> None:
        """Run ``action`` (worker thread: generate or hand over a section). Never raises: StopIteration ends the
        session as finished, any other failure with an error to its viewers."""
        self.hold()
        try:
            action()
        except StopIteration:
            self._finish("finished", "the video reached its end")
        except Exception as exc:  # noqa: BLE001 -- a failing model must end this session, never the worker
            log.exception("generation failed")
            self.error = failure_message(exc)
            self.post(control.error(self.error))
            self._finish("error", self.error)
        finally:
            self.release()

    @property
    def busy(self) -> bool:
        """A section of this session is being generated or handed over right now (on any thread)."""
        return self.sampling or self._holds > 0

    def hold(self) -> None:
        """Count an action on this session as in progress until :meth:`release` (the batching worker holds a
        sampled section from the end of its sampling until its decode thread has handed it over)."""
        with self._holds_lock:
            self._holds += 1

    def release(self) -> None:
        with self._holds_lock:
            self._holds -= 1

    def _run_section(self, stream: VideoStreamLike) -> None:
        began = time.monotonic()
        self.push_section(next(stream), began)

    def push_section(self, section: Any, began: float) -> None:
        """Hand a generated section (its generation began at monotonic ``began``) to the buffer and viewers."""
        frames = np.asarray(section.frames)
        count = len(frames)
        if self.recording is not None:  # every generated frame, also those a closing buffer drops
            self.recording.add(frames)
        for i, rgb in enumerate(frames):
            item = BufferedFrame(rgb_to_yuv420(rgb), section.first_frame + i, section.index, time.monotonic(),
                                 section.prompt)
            if not self.buffer.put(item):  # closed: the session is going away
                return
        elapsed = max(time.monotonic() - began, 1e-6)
        rate = count / elapsed
        self.gen_fps = rate if self.sections == 0 else 0.7 * self.gen_fps + 0.3 * rate
        self.sections += 1
        self.frames += count
        self.section_frames = max(self.section_frames, count)
        self.last_section_ms = float(section.ms)
        if self.on_section is not None:
            self.on_section(count, self.last_section_ms / 1000)
        self.post(control.section(section.index, section.prompt, section.first_frame,
                                  section.first_frame + count - 1, section.ms, section.steps_run,
                                  section.steps_skipped, bool(section.is_last),
                                  blend=getattr(section, "blend", None)))
        if section.is_last:
            self._finish("finished", "the video reached its end")

    def on_step(self, progress: Any) -> None:
        """The pipeline's per-step callback (worker thread): throttled progress and preview messages.

        The pipeline counts steps from 0; messages carry steps *completed* (1..steps), what a bar shows.
        Never raises: an exception here would abort the section inside the sampler.
        """
        try:
            self._report_step(progress)
        except (ValueError, TypeError, OSError) as exc:  # a malformed preview: lose it, keep generating
            log.warning("step report failed: %s", exc)

    def _report_step(self, progress: Any) -> None:
        now = time.monotonic()
        done, steps = progress.step + 1, progress.steps
        last = done >= steps
        if done == 1 or last or now - self._last_progress >= self.PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.post(control.progress(progress.section, done, steps))
        preview = getattr(progress, "preview", None)
        if preview is not None and (last or now - self._last_preview >= self.PREVIEW_INTERVAL_S):
            self._last_preview = now
            rgb = upscale_preview(np.asarray(preview, dtype=np.uint8))  # smooth, not 8x8 blocks on the page
            self.post(control.preview(progress.section, done, steps, encode_jpeg_data_url(rgb),
                                      rgb.shape[1], rgb.shape[0]))

    def _finish(self, state: str, detail: str) -> None:
        self.done = True
        self.post(control.state(state, detail))


def failure_message(exc: Exception) -> str:
    """What the viewers of a session that failed are told; frees cached device memory after an OOM."""
    torch = sys.modules.get("torch")  # only a loaded torch can have raised its own errors
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what this session's section held is garbage now: let the others have it
        return ("generation failed: the device ran out of memory, so this session has ended. Start a new "
                "session (a smaller start image helps); if it keeps happening, the server runs too many "
                "sessions at once (--max-sessions)")
    return f"generation failed: {type(exc).__name__}: {exc}; this session has ended, start a new one"


class WorkerThread:
    """What session.py and server.py call on a device's generation thread: the sessions it serves (add,
    remove), a nudge when one may have become ready (wake), and a clean stop (close). Subclasses run
    ``_run`` on the thread: :class:`DeviceWorker` round-robin, stream/batching.py's BatchingWorker step by step."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._cond = threading.Condition()
        self._jobs: list[Generation] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"framepack-generate-{device}", daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def add(self, job: Generation) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()

    def remove(self, job: Generation) -> None:
        """The session is going away: the worker leaves it at its next look."""
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
            self._cond.notify_all()

    def wake(self) -> None:
        """Something changed (frames taken, resumed, stream attached): look for ready work again."""
        with self._cond:
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop after the section (or step) in progress. True if the thread ended within ``timeout``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class DeviceWorker(WorkerThread):
    """The generation thread of one device, shared round-robin by every session on that device."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self._turn = 0
        self._thread.start()

    def _next_job(self) -> Generation | None:
        n = len(self._jobs)
        for i in range(n):
            job = self._jobs[(self._turn + i) % n]
            if job.ready():
                self._turn = (self._turn + i + 1) % n
                return job
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed and (job := self._next_job()) is None:
                    # The timeout is a safety net only: every state change calls wake().
                    self._cond.wait(0.5)
                if self._closed:
                    return
            job.run_section()  # outside the lock: sections take long, wake() must not wait for them
