"""The bounded, thread-safe frame handoff between a generation worker thread and the event loop.

The worker thread ``put``s frames and blocks while the buffer is full; the paced track ``get_nowait``s one
frame per tick on the event loop and never blocks (the lock is held for a deque operation only). A fixed
capacity bounds both memory and the delay between generating a frame and showing it: at most
``capacity / fps`` seconds. aiortc's own player uses an unbounded queue and its delay grows without limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import av
import numpy as np


@dataclass(frozen=True)
class BufferedFrame:
    """One video frame ready for the encoder.

    yuv: (H * 3 // 2, W) uint8, planar I420 as ``av.VideoFrame.from_ndarray(yuv, format="yuv420p")`` takes it;
    converted on the worker thread so the event loop only wraps it. index: frame number in the video;
    section: the section it belongs to; generated_at: time.monotonic() when it entered the buffer; prompt:
    the prompt it was generated with.
    """

    yuv: np.ndarray
    index: int
    section: int
    generated_at: float
    prompt: str = ""


def rgb_to_yuv420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H' * 3 // 2, W') I420, H' and W' rounded down to even (4:2:0 needs even sizes)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[0] & ~1, rgb.shape[1] & ~1
    if h == 0 or w == 0:
        raise ValueError(f"frame {rgb.shape[:2]} is too small to encode (need at least 2x2)")
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
    return frame.reformat(format="yuv420p").to_ndarray()


def yuv420_to_rgb(yuv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_yuv420` (for previews and tests)."""
    return av.VideoFrame.from_ndarray(yuv, format="yuv420p").to_ndarray(format="rgb24")


class FrameBuffer:
    """A bounded FIFO of :class:`BufferedFrame`: blocking ``put`` for the worker, non-blocking get for the loop.

    ``on_space`` is called (from the getter's thread) after a frame is taken out, so that a scheduler that
    waits for room elsewhere can be woken; it must be cheap and must not block.
    """

    def __init__(self, capacity: int, on_space: Callable[[], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1 frame, got {capacity}")
        self.capacity = capacity
        self._on_space = on_space
        self._frames: deque[BufferedFrame] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.total_in = 0
        self.total_out = 0
        self.max_depth = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    @property
    def free(self) -> int:
        with self._cond:
            return self.capacity - len(self._frames)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: BufferedFrame, timeout: float | None = None) -> bool:
        """Append, waiting while full. False if the buffer was closed (or ``timeout`` ran out) meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._frames) >= self.capacity and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                return False
            self._frames.append(frame)
            self.total_in += 1
            self.max_depth = max(self.max_depth, len(self._frames))
            return True

    def get_nowait(self) -> BufferedFrame | None:
        """The oldest frame, or None when empty. Never blocks beyond a deque operation."""
        with self._cond:
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self.total_out += 1
            self._cond.notify_all()
        if self._on_space is not None:
            self._on_space()
        return frame

    def close(self) -> None:
        """Wake and refuse every waiting and future ``put`` (the session is ending)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._on_space is not None:
            self._on_space()
