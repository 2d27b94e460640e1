"""Fixtures of the server tests: a synthetic pipeline (frames made in numpy, so the server is what is measured),
browser-like offers made by aiortc, and the page in headless Chromium (``browser``, ``new_page``, ``artifacts``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
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

    def bucket(self, image) -> tuple[int, int]:
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


# -- the page in headless Chromium (test_browser.py, test_page_browser.py) ------------------------------------
# Debian's /usr/bin/chromium through playwright's Python package, with the flags framepack-rt bench --browser
# uses (framepack_rt/bench/browser.py: one list for the benchmark and the tests).

@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's tests (each test opens its own pages); without Debian's Chromium
    the tests that use it skip with the command that installs it."""
    from framepack_rt.bench.browser import CHROMIUM, FLAGS

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def new_page(browser):
    """new_page(url) -> a page at ``url`` in a fresh context (downloads allowed), once /api/config is in (the
    example prompt fills #prompt); page.errors lists uncaught page errors. Contexts close at teardown, their
    pages first leaving for about:blank (pagehide: a page lets go of its session, as a reload does)."""
    contexts = []

    def make(url: str):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.goto(url)
        page.wait_for_function("() => window.framepack && document.querySelector('#prompt').value !== ''",
                               timeout=10_000)
        return page

    yield make
    for context in contexts:
        for page in context.pages:
            page.goto("about:blank")
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/ at the repository root, where the browser tests leave screenshots."""
    folder = Path(__file__).resolve().parents[2] / "test-artifacts"
    folder.mkdir(exist_ok=True)
    return folder
