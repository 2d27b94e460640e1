"""Fixtures of the server tests: a synthetic pipeline (frames made in numpy, so the server is what is measured)
and browser-like offers made by aiortc."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Awaitable, Callable

import numpy as np
import pytest


class SyntheticStream:
    """6 flat frames a section, 50 ms a section: cheap, faster than playback, so gaps are the server's."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.k, self.stopped = prompt, 0, threading.Event()

    def __next__(self):
        if self.stopped.wait(0.05):
            raise StopIteration
        k, self.k = self.k, self.k + 1
        frames = np.full((6, 48, 64, 3), (k * 40) % 250, np.uint8)
        return SimpleNamespace(index=k, frames=frames, first_frame=6 * k, prompt=self.prompt, ms=1.0,
                               steps_run=1, steps_skipped=0, is_last=False)

    def set_prompt(self, text: str) -> int:
        self.prompt = text
        return self.k + 1

    def stop(self) -> None:
        self.stopped.set()


class SyntheticPipe:
    def __init__(self) -> None:
        self.streams = 0  # how many times the "encoders" ran

    def frame_size(self, image) -> tuple[int, int]:
        return 48, 64

    def stream(self, image, prompt, **kwargs) -> SyntheticStream:
        self.streams += 1
        return SyntheticStream(prompt)


@pytest.fixture
def synthetic_pipe() -> SyntheticPipe:
    return SyntheticPipe()


async def _browser_offer() -> str:
    """A browser-like offer (recvonly video + data channel) from aiortc, its own candidates removed."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        lines = pc.localDescription.sdp.split("\r\n")
        return "\r\n".join(line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates")))
    finally:
        await pc.close()


@pytest.fixture
def browser_offer() -> Callable[[], Awaitable[str]]:
    """``await browser_offer()``: an offer no one will ever complete (its peer connection is closed)."""
    return _browser_offer
