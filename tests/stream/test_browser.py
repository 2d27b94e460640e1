"""The page in real headless Chromium: `framepack-rt serve` as a subprocess (the default model), driven with
playwright. Decodes frames, takes a prompt from #prompt, and leaves a screenshot in test-artifacts/."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from framepack_rt.bench.browser import CHROMIUM

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not found: apt-get install -y chromium")


@pytest.fixture
def server_url(launch_serve):
    """`framepack-rt serve --port 0 --steps 2` in a subprocess; yields the URL it prints; ends it by pid."""
    yield from serve(launch_serve, "--steps", "2")


@pytest.fixture
def demo_server_url(launch_serve):
    """The same with the default model and its default steps, as a user starts it."""
    yield from serve(launch_serve)


def serve(launch_serve, *args: str):
    proc, url, lines = launch_serve(*args, timeout=60)
    yield url
    launch_serve.stop(proc, lines)  # SIGTERM, the clean-shutdown path Ctrl-C takes too: exit 0 within 15 s


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_page_decodes_frames_and_sends_prompts(server_url, new_page, artifacts):
    page = new_page(server_url)
    page.click("#start")
    # Until the first section the track repeats the start image; count generated frames after it.
    page.wait_for_selector("#sections li", timeout=20_000)
    # framesDecoded comes from getStats() (inbound-rtp), polled by the page once a second.
    page.wait_for_function("() => window.framepack.framesDecoded > 0", timeout=5_000)
    before = page.evaluate("window.framepack.framesDecoded")
    page.wait_for_function(f"() => window.framepack.framesDecoded >= {before + 30}", timeout=10_000)
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
    page.wait_for_function("() => document.querySelector('#prompt-note').textContent.includes('applies from')",
                           timeout=5_000)
    # Let a section with the new prompt reach the list, the preview and the stats line.
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#sections .prompt-text')].some(e => e.textContent === {prompt!r})",
        timeout=10_000)
    page.wait_for_function("() => document.querySelector('#st-rtt').textContent.includes('ms')", timeout=5_000)
    # Issue 19: the video and the latent preview are scaled smoothly, the preview sent upscaled (not 8x8 blocks).
    page.wait_for_function("() => document.getElementById('preview').naturalWidth >= 128", timeout=5_000)
    assert page.evaluate("getComputedStyle(document.getElementById('video')).imageRendering") == "auto"
    assert page.evaluate("getComputedStyle(document.getElementById('preview')).imageRendering") == "auto"
    page.screenshot(path=str(artifacts / "stream_browser.png"))
    assert page.evaluate("window.framepack.framesDecoded") >= before + 30
    assert not page.errors, page.errors


# The red ball's centroid x in the frame the <video> shows now, as a fraction of the width (None: no red).
# Colour weights as the evaluation's (framepack_rt.demo.evaluate.colour_weights): 1 at the world's red,
# falling to 0 at RGB distance `tol`, so codec-softened edges still count for what red they hold.
RED_X = """([r, g, b, tol]) => {
  const v = document.getElementById('video');
  if (!v.videoWidth) return null;
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(v, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, mass = 0;
  for (let i = 0; i < d.length; i += 4) {
    const w = Math.max(0, 1 - Math.hypot(d[i] - r, d[i + 1] - g, d[i + 2] - b) / tol);
    sum += w * ((i / 4) % c.width); mass += w;
  }
  return mass >= 4 ? sum / mass / c.width : null;
}"""


def sample_red_x(page, seconds: float) -> list[float]:
    """The red centroid of the playing video, every 50 ms for ``seconds`` (frames without red left out)."""
    from framepack_rt.demo.evaluate import COLOUR_TOLERANCE, RED

    xs, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        x = page.evaluate(RED_X, [*RED, COLOUR_TOLERANCE])
        if x is not None:
            xs.append(x)
        time.sleep(0.05)
    return xs


def test_the_demo_ball_follows_a_typed_prompt(demo_server_url, new_page, artifacts):
    """The default (trained demo) model opens with the red ball and 'a red ball moves right': the ball in the
    decoded video goes right; after 'a red ball moves left' is typed, it comes back left."""
    server_url = demo_server_url
    assert get_json(server_url + "api/config")["default_prompt"] == "a red ball moves right"
    page = new_page(server_url)
    page.click("#start")
    page.wait_for_function("() => window.framepack.framesDecoded > 0", timeout=20_000)
    # The start image plays until the first section: the encoders run once the connection is up.
    page.wait_for_function("() => document.querySelectorAll('#sections li').length > 0", timeout=30_000)
    right = sample_red_x(page, 3.0)  # the first sections (the ball moves 0.3 widths a second)
    assert len(right) > 20 and max(right) - right[0] >= 0.1, right
    # The 96 px bucket's latents, drawn as 192 px frames by the demo's fast decoder: the page says both
    assert "96 × 96 · shown at 192 × 192" in page.text_content("#settings-in-use")
    assert page.evaluate("document.querySelector('video').videoWidth") == 192

    page.fill("#prompt", "a red ball moves left")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.querySelector('#prompt-note').textContent.includes('applies from')",
                           timeout=5_000)
    # The new prompt is generated from the next section and plays after what is already buffered.
    left = sample_red_x(page, 8.0)
    assert left, "the red ball left the video"
    peak = max(right[-1], max(left[: len(left) // 4 + 1]))
    assert peak - min(left) >= 0.1, (right[-5:], left)
    page.screenshot(path=str(artifacts / "stream_browser_demo.png"))
