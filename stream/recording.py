"""Recording: each session's video kept on disk as it is generated, as H.264 segments with a bound.

The device worker hands every section's RGB frames to :meth:`Recording.add`; one encoder thread per server
("framepack-record") turns them into MP4 segment files of ``segment_seconds`` each (libx264 through PyAV, no
B-frames, each segment starting with a key frame) under a per-session temporary folder. When the kept video
would exceed ``max_seconds``, the oldest segments are deleted. :meth:`Recording.export` closes the open segment
(the next frame starts a new one) and remuxes every kept segment into one MP4 without re-encoding; it runs on
the same encoder thread, so segments are never written, dropped and read at the same time. The event loop
never encodes: it only awaits the export's future and streams the file.

Everything a session recorded is deleted when the session ends (:meth:`Recording.close`), and the server's
whole folder when the server stops (:meth:`Recorder.close`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # the CLI reads this module's defaults: it imports nothing heavy
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_SECONDS = 300.0  # 5 minutes of video per session (--record-max-seconds; 0 turns recording off)
SEGMENT_SECONDS = 2.0
MAX_PENDING_SECTIONS = 8  # sections waiting for the encoder; beyond this the device worker waits (memory bound)
# veryfast + zerolatency: no B-frames and no lookahead, so each frame's packet comes out as it goes in and
# segments join with plain timestamp offsets. x264 picks its thread count from the machine's cores.
ENCODER_OPTIONS = {"preset": "veryfast", "crf": "20", "tune": "zerolatency"}


class NothingRecorded(LookupError):
    """The session has no generated frame yet (or recording failed): nothing to download."""


@dataclass
class _Segment:
    path: Path
    frames: int = 0


class _SegmentWriter:
    """One open MP4 segment: an H.264 encoder and its container."""

    def __init__(self, path: Path, fps: float, height: int, width: int) -> None:
        import av

        self.segment = _Segment(path)
        self._container = av.open(str(path), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(ENCODER_OPTIONS)
        self._stream = stream

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.segment.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.segment.frames += 1

    def close(self) -> _Segment:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self.segment


class Recording:
    """One session's recording. :meth:`add` may be called from any thread; everything else about the segments
    happens on the recorder's encoder thread, in the order submitted."""

    def __init__(self, folder: Path, executor: ThreadPoolExecutor, fps: float, max_seconds: float,
                 segment_seconds: float = SEGMENT_SECONDS, max_pending: int = MAX_PENDING_SECTIONS) -> None:
        self.folder = folder
        self.fps = fps
        self.max_frames = max(1, round(max_seconds * fps))
        self.segment_frames = max(1, min(round(segment_seconds * fps), self.max_frames))
        self._executor = executor
        self._pending = threading.BoundedSemaphore(max_pending)
        self._segments: list[_Segment] = []  # closed segments, oldest first (encoder thread only)
        self._open: _SegmentWriter | None = None
        self._size: tuple[int, int] | None = None  # (H, W) encoded: the first frame's, cropped to even
        self._serial = 0
        self._closed = False
        self.error: str | None = None  # set if encoding failed: the recording stops, the session goes on
        self.frames_received = 0  # every frame handed to add() (for the stats)
        self.frames_dropped = 0  # frames of segments deleted by the bound

    # -- any thread ------------------------------------------------------------------------------------------
    def add(self, frames: np.ndarray) -> None:
        """Queue a section's frames (T, H, W, 3) uint8 for encoding. Waits while ``max_pending`` sections are
        queued already, so a slow encoder holds the generator back instead of filling memory."""
        if self._closed or self.error is not None or len(frames) == 0:
            return
        self._pending.acquire()
        try:
            self._executor.submit(self._encode, frames)
        except RuntimeError:  # the recorder is shutting down
            self._pending.release()
            return
        self.frames_received += len(frames)

    def export(self) -> "Future[tuple[BinaryIO, int, int]]":
        """Future of (an open file holding one MP4 of everything kept so far, its size, frames). The file is
        already unlinked: it goes away when closed. Raises NothingRecorded when there is no frame yet."""
        return self._executor.submit(self._export)

    def close(self) -> None:
        """Stop recording and delete the session's files (after what is queued; returns at once)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._executor.submit(self._discard)
        except RuntimeError:  # the recorder is shutting down: it deletes its whole folder itself
            pass

    @property
    def kept_frames(self) -> int:
        """Frames on disk now (closed and open segments); read from any thread for stats, may be a step old."""
        writer = self._open  # read once: the encoder thread may close it meanwhile
        open_frames = writer.segment.frames if writer is not None else 0
        return sum(s.frames for s in list(self._segments)) + open_frames

    def summary(self) -> dict[str, Any]:
        kept = self.kept_frames
        return {"enabled": True, "frames": kept, "seconds": round(kept / self.fps, 2),
                "max_seconds": round(self.max_frames / self.fps, 2), "dropped_frames": self.frames_dropped,
                "error": self.error}

    # -- encoder thread --------------------------------------------------------------------------------------
    def _encode(self, frames: np.ndarray) -> None:
        try:
            if self._closed or self.error is not None:
                return
            for rgb in frames:
                self._write(rgb)
        except Exception as exc:  # noqa: BLE001 -- a failing encoder ends the recording, never the session
            log.exception("recording in %s failed", self.folder)
            self.error = f"recording failed: {type(exc).__name__}: {exc}"
            self._discard()
        finally:
            self._pending.release()

    def _write(self, rgb: np.ndarray) -> None:
        import numpy as np

        if self._size is None:
            h, w = rgb.shape[:2]
            self._size = (h - h % 2, w - w % 2)  # yuv420p needs even sizes
        h, w = self._size
        if self._open is None:
            self._serial += 1
            self._open = _SegmentWriter(self.folder / f"segment-{self._serial:06d}.mp4", self.fps, h, w)
        self._open.write(np.ascontiguousarray(rgb[:h, :w]))
        if self._open.segment.frames >= self.segment_frames:
            self._close_open()

    def _close_open(self) -> None:
        if self._open is None:
            return
        writer, self._open = self._open, None
        segment = writer.close()
        if segment.frames:
            self._segments.append(segment)
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        """The bound: delete the oldest segments while more than ``max_frames`` are kept."""
        while len(self._segments) > 1 and sum(s.frames for s in self._segments) > self.max_frames:
            oldest = self._segments.pop(0)
            oldest.path.unlink(missing_ok=True)
            self.frames_dropped += oldest.frames

    def _export(self) -> tuple[BinaryIO, int, int]:
        if self.error is not None:
            raise NothingRecorded(self.error)
        self._close_open()  # the open segment's frames are part of "so far"; the next frame opens a new one
        if not self._segments:
            raise NothingRecorded("nothing generated yet: wait for the first section")
        self._serial += 1
        path = self.folder / f"export-{self._serial:06d}.mp4"
        frames = remux([s.path for s in self._segments], path, self.fps)
        handle = open(path, "rb")  # noqa: SIM115 -- handed to the caller, who closes it
        path.unlink()  # the open handle keeps the data until the download ends; nothing is left behind
        return handle, os.fstat(handle.fileno()).st_size, frames

    def _discard(self) -> None:
        self._closed = True
        if self._open is not None:
            writer, self._open = self._open, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001 -- being deleted anyway
                log.debug("closing a discarded segment failed", exc_info=True)
        self._segments.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def remux(segments: list[Path], out: Path, fps: float) -> int:
    """Join MP4 segments of one H.264 stream into ``out`` without re-encoding; returns the frames written.
    Each segment's timestamps are shifted by the frames before it, at ``fps``."""
    import av

    written = 0
    with av.open(str(out), mode="w", format="mp4") as output:
        target = None
        for path in segments:
            with av.open(str(path)) as source:
                stream = source.streams.video[0]
                if target is None:
                    target = output.add_stream_from_template(stream)
                start = written
                for packet in source.demux(stream):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    shift = round(start / fps / packet.time_base)
                    packet.pts += shift
                    packet.dts += shift
                    packet.stream = target
                    output.mux(packet)
                    written += 1
    return written


class Recorder:
    """The server's recordings: one temporary folder, one encoder thread, one :class:`Recording` a session."""

    def __init__(self, fps: float, max_seconds: float = DEFAULT_MAX_SECONDS,
                 segment_seconds: float = SEGMENT_SECONDS, root: str | Path | None = None) -> None:
        if max_seconds <= 0:
            raise ValueError(f"--record-max-seconds {max_seconds:g}: must be positive (0 turns recording off, "
                             "and then no Recorder is made)")
        self.fps, self.max_seconds, self.segment_seconds = fps, max_seconds, segment_seconds
        self._parent = root
        self.root: Path | None = None  # made with the first recording: a server that records nothing leaves none
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framepack-record")

    def open(self, session_id: str) -> Recording:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="framepack-rt-recordings-", dir=self._parent))
        folder = self.root / session_id
        folder.mkdir()
        return Recording(folder, self._executor, self.fps, self.max_seconds, self.segment_seconds)

    def close(self) -> None:
        """Finish what is queued, then delete every recording (blocks: call it off the event loop)."""
        self._executor.shutdown(wait=True)  # queued jobs of closed sessions return at once
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _rate(fps: float) -> Any:
    """The encoder's frame rate as a fraction (30 -> 30, 29.97 -> 2997/100)."""
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
