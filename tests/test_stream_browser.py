"""The page in real headless Chromium: `framepack-rt serve` as a subprocess (real tiny pipeline), driven with
playwright. Decodes frames, takes a prompt from #prompt, and leaves a screenshot in test-artifacts/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Flags that work as root in a sandbox; --disable-features=WebRtcHideLocalIpsWithMdns avoids ~1 s of
# failed mDNS look-ups; loopback candidates matter where lo is the only interface.
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--allow-loopback-in-peer-connection",
]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not found: apt-get install -y chromium")


@pytest.fixture
def server_url(launch_serve):
    """`framepack-rt serve --port 0 --steps 2` in a subprocess; yields the URL it prints; ends it by pid."""
    proc, url, lines = launch_serve("--steps", "2", timeout=60)
    yield url
    os.kill(proc.pid, signal.SIGTERM)  # the clean-shutdown path Ctrl-C takes too
    try:
        code = proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("server did not stop within 15 s of SIGTERM:\n" + "".join(lines))
    assert code == 0, "".join(lines)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_page_decodes_frames_and_sends_prompts(server_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server_url)
            page.click("#start")
            # Until the first section the track repeats the start image; count generated frames after it.
            page.wait_for_selector("#sections li", timeout=20_000)
            # framesDecoded comes from getStats() (inbound-rtp), polled by the page once a second.
            page.wait_for_function("window.framepack.framesDecoded > 0", timeout=5_000)
            before = page.evaluate("window.framepack.framesDecoded")
            page.wait_for_function(f"window.framepack.framesDecoded >= {before + 30}", timeout=10_000)
            assert page.evaluate("window.framepack.framesPainted") > 0  # requestVideoFrameCallback saw frames

            prompt = "a storm rolls over the lake"
            page.fill("#prompt", prompt)
            page.press("#prompt", "Enter")
            deadline = time.monotonic() + 10
            sessions = []
            while time.monotonic() < deadline:
                sessions = get_json(server_url + "api/sessions")["sessions"]
                if sessions and sessions[0]["prompt"] == prompt:
                    break
                time.sleep(0.2)
            assert sessions and sessions[0]["prompt"] == prompt, sessions
            page.wait_for_function("document.querySelector('#prompt-note').textContent.includes('applies from')",
                                   timeout=5_000)
            # Let a section with the new prompt reach the list, the preview and the stats line.
            page.wait_for_function(
                f"[...document.querySelectorAll('#sections .prompt-text')].some(e => e.textContent === {prompt!r})",
                timeout=10_000)
            page.wait_for_function("document.querySelector('#st-rtt').textContent.includes('ms')", timeout=5_000)
            page.screenshot(path=str(ARTIFACTS / "stream_browser.png"))
            assert page.evaluate("window.framepack.framesDecoded") >= before + 30
            assert not errors, errors
        finally:
            browser.close()
