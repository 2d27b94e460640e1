"""The page as a user drives it, in headless Chromium (playwright): Restart and reload let go of the page's
previous session (no capacity error however quick), "Download MP4" gives a playable file of at least the frames
shown, and the start settings, the example prompt and the image check at pick time.

Fixtures meant for more tests of the page: ``page_server`` (one served page for the module: `framepack-rt
serve` in a subprocess with the tiny model), ``serve_page(*flags)`` (a server of a test's own, with more
flags), ``browser`` (one Chromium for the module) and ``new_page`` (a fresh page that collects page errors)
from tests/stream/conftest.py, and the helpers ``start_session`` and ``wait_frames``. The browser tests pass
functions, never expressions, to wait_for_function: the page's CSP allows no eval (see test_security_browser).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from framepack_rt.bench.browser import CHROMIUM

SERVE_ARGS = ("--model", "tiny", "--steps", "2")  # coloured noise, every code path, fast on two cores

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not found: apt-get install -y chromium")


# -- fixtures and helpers (reusable by other tests of the page; browser and new_page: tests/stream/conftest.py) --

@pytest.fixture(scope="module")
def page_server(launch_serve_module) -> str:
    """The URL of one served page with the default flags, shared by the module's tests (a server start costs
    10-40 s on two busy cores). Tests leave no session behind: new_page's pages let go of theirs at teardown."""
    proc, url, lines = launch_serve_module(*SERVE_ARGS)
    yield url
    launch_serve_module.stop(proc, lines)


@pytest.fixture
def serve_page(launch_serve):
    """serve_page(*flags) -> the URL of a server of its own with more flags (e.g. "--lora", "x.safetensors")."""
    servers = []

    def serve(*flags: str) -> str:
        proc, url, lines = launch_serve(*SERVE_ARGS, *flags)
        servers.append((proc, lines))
        return url

    yield serve
    for proc, lines in servers:
        launch_serve.stop(proc, lines)


def start_session(page, timeout_ms: int = 20_000) -> str:
    """Press Start (Restart) and wait until the page holds its new session; returns the session id."""
    before = page.evaluate("window.framepack.session")
    page.click("#start")
    page.wait_for_function("(old) => window.framepack.session && window.framepack.session !== old && "
                           "!document.querySelector('#start').disabled", arg=before, timeout=timeout_ms)
    return page.evaluate("window.framepack.session")


def wait_frames(page, count: int, timeout_ms: int = 20_000) -> int:
    """Wait until ``count`` more frames are decoded than now (getStats, polled by the page each second)."""
    before = page.evaluate("window.framepack.framesDecoded")
    page.wait_for_function("(n) => window.framepack.framesDecoded >= n", arg=before + count, timeout=timeout_ms)
    return page.evaluate("window.framepack.framesDecoded")


def wait_sections(page, count: int = 1, timeout_ms: int = 20_000) -> None:
    page.wait_for_function("(n) => document.querySelectorAll('#sections li').length >= n", arg=count,
                           timeout=timeout_ms)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def watch_errors(page) -> None:
    """Keep every text the #error box shows in window.errorsSeen (the next Start clears the box)."""
    page.evaluate("""() => {
      window.errorsSeen = [];
      const box = document.querySelector('#error');
      new MutationObserver(() => { if (box.textContent) window.errorsSeen.push(box.textContent); })
        .observe(box, { childList: true, characterData: true, subtree: true });
    }""")


# -- tests -----------------------------------------------------------------------------------------------------

def test_quick_restarts_never_lock_out_and_download_mp4_has_the_frames_shown(page_server, new_page, tmp_path):
    import av

    page = new_page(page_server)
    watch_errors(page)
    first = start_session(page)
    wait_frames(page, 1)
    wait_sections(page, 2)
    sessions = [first]
    for _ in range(6):  # each as soon as the button takes it: the server allows 2 sessions per address
        sessions.append(start_session(page))
    assert len(set(sessions)) == 7
    wait_frames(page, 30)  # the video plays after them
    wait_sections(page, 2)
    assert page.evaluate("window.errorsSeen") == []
    assert not page.is_visible("#error")
    listed = [s["id"] for s in get_json(page_server + "api/sessions")["sessions"]]
    assert sessions[-1] in listed and not set(sessions[:-1]) & set(listed)  # let go of, not left to the grace
    # The Sections list and the join link belong to the new session only.
    indices = page.evaluate("[...document.querySelectorAll('#sections .idx')].map(e => e.textContent)")
    assert len(indices) == len(set(indices)), indices
    page.click("#copy-link")
    assert f"session={sessions[-1]}" in page.text_content("#prompt-note")
    assert page.evaluate("document.querySelector('#status').textContent") == "live"

    # Download MP4: everything so far, at least every generated frame the viewer was shown.
    shown = get_json(f"{page_server}api/sessions/{sessions[-1]}")["frames_played"]
    size = page.evaluate("[document.querySelector('video').videoWidth, document.querySelector('video').videoHeight]")
    with page.expect_download(timeout=20_000) as info:
        page.click("#download")
    download = info.value
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    assert path.suffix == ".mp4" and download.failure() is None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert [stream.width, stream.height] == size and stream.average_rate == 30
    assert frames >= shown > 30, (frames, shown)

    # Reload lets go too: the page's session ends at once, not after the grace period.
    page.reload()
    def listed() -> list[str]:
        return [s["id"] for s in get_json(page_server + "api/sessions")["sessions"]]

    deadline = time.monotonic() + 5
    while sessions[-1] in listed() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions[-1] not in listed()
    assert not page.errors, page.errors


def test_start_settings_example_prompt_and_a_bad_file_at_pick_time(page_server, new_page, tmp_path, artifacts):
    page = new_page(page_server)
    config = get_json(page_server + "api/config")
    assert page.input_value("#prompt") == config["default_prompt"]  # a value, not a placeholder: Enter works

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    page.set_input_files("#image", str(bad))
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('could not be decoded')",
                           timeout=5_000)
    assert page.input_value("#image") == ""  # rejected at pick: Start uses the built-in scene instead
    # The error sits under the video, above the prompt: in view without scrolling.
    box, video = page.locator("#error").bounding_box(), page.locator("#video-frame").bounding_box()
    assert box["y"] >= video["y"] + video["height"] - 1 and box["y"] + box["height"] <= 900

    page.fill("#set-seed", "7")
    page.fill("#set-steps", "1")
    page.fill("#set-window", "5")
    page.select_option("#set-bucket", "64x80")
    start_session(page)
    page.wait_for_function("() => document.querySelector('#settings-in-use').textContent.includes('seed 7')",
                           timeout=10_000)
    shown = page.text_content("#settings-in-use")
    assert "seed 7 · 1 steps" in shown and "window 5" in shown and "80 × 64" in shown, shown
    wait_frames(page, 10)
    assert page.evaluate("[document.querySelector('video').videoWidth, document.querySelector('video').videoHeight]") \
        == [80, 64]
    sid = page.evaluate("window.framepack.session")
    settings = get_json(f"{page_server}api/sessions/{sid}")["settings"]
    assert settings == {"seed": 7, "steps": 1, "cfg": settings["cfg"], "window": 5, "bucket": [64, 80],
                        "frame": [64, 80]}
    assert "shown at" not in shown  # frames of the bucket's size: one size on the page
    page.screenshot(path=str(artifacts / "page_settings.png"))
    assert not page.errors, page.errors


def test_a_transition_and_a_timeline_typed_on_the_page_reach_the_session(serve_page, new_page):
    """Issue 21 items 2 and 3 on the page: the transition field (its default from --transition-sections),
    weighted prompts typed as "a:0.7 | b:0.3", and a timeline with Apply; acks, section messages and
    /api/sessions/ID show what the session applied."""
    url = serve_page("--transition-sections", "1")
    page = new_page(url)
    assert page.input_value("#transition") == "1"
    sid = start_session(page)
    wait_sections(page, 1)

    def ack(predicate: str):
        page.wait_for_function(f"() => window.framepack.messages.some(m => m.type === 'ack' && {predicate})",
                               timeout=30_000)
        return page.evaluate(f"window.framepack.messages.find(m => m.type === 'ack' && {predicate})")

    page.fill("#timeline", "0:a calm lake;2:a storm over the lake")
    page.click("#timeline-apply")
    timeline = ack("Array.isArray(m.timeline)")
    assert [e["prompt"] for e in timeline["timeline"]] == ["a calm lake", "a storm over the lake"]
    assert timeline["transition"] == 1 and "timeline from section" in page.text_content("#prompt-note")

    page.fill("#transition", "3")
    page.fill("#prompt", "a sunny lake:0.7 | a foggy lake:0.3")
    page.press("#prompt", "Enter")
    blended = ack("m.transition === 3")
    assert blended["prompts"] == [{"text": "a sunny lake", "weight": 0.7}, {"text": "a foggy lake", "weight": 0.3}]
    assert "blended in over 3 sections" in page.text_content("#prompt-note")
    page.wait_for_function("() => window.framepack.messages.some(m => m.type === 'section' && m.blend && "
                           "m.blend.some(b => b.text === 'a sunny lake'))", timeout=60_000)
    session = get_json(f"{url}api/sessions/{sid}")
    assert session["timeline"] == timeline["timeline"] and session["transition_sections"] == 1
    assert not page.errors, page.errors


def test_a_lora_slider_sets_the_sessions_scale_and_is_acknowledged(serve_page, new_page, tmp_path):
    """`serve --lora FILE:0.5` (a kohya-layout file written here): the page shows the adapter's slider at 0.5;
    moving it sends a "lora" message, and the server's lora_ack (the section it applies from) reaches the page."""
    import torch
    from safetensors.torch import save_file

    dim = 32  # the tiny preset's inner_dim: a rank-2 adapter on block 0's q and k projections
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in ("to_q", "to_k"):
        key = f"lora_unet_transformer_blocks_0_attn_{name}"
        state[f"{key}.lora_down.weight"] = torch.randn(2, dim, generator=g)
        state[f"{key}.lora_up.weight"] = torch.randn(dim, 2, generator=g)
        state[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(state, str(tmp_path / "style.safetensors"))
    url = serve_page("--lora", f"{tmp_path / 'style.safetensors'}:0.5")
    assert get_json(url + "api/config")["loras"] == [
        {"name": "style", "scale": 0.5, "format": "kohya", "layers": 2, "fused": False}]

    page = new_page(url)
    assert page.is_visible("#lora-card") and page.input_value("input[data-lora='style']") == "0.5"
    start_session(page)
    wait_sections(page, 1)
    page.evaluate("""() => {
      const slider = document.querySelector("input[data-lora='style']");
      slider.value = "1.25";
      slider.dispatchEvent(new Event("input"));
      slider.dispatchEvent(new Event("change"));
    }""")
    page.wait_for_function("() => window.framepack.messages.some((m) => m.type === 'lora_ack')", timeout=10_000)
    ack = page.evaluate("window.framepack.messages.find((m) => m.type === 'lora_ack')")
    assert ack["name"] == "style" and ack["scale"] == 1.25 and ack["section"] >= 1
    assert f"LoRA style at 1.25 from section {ack['section']}" in page.text_content("#prompt-note")
    assert page.text_content("#loras b") == "1.25"
    assert not page.is_visible("#error") and not page.errors, page.errors
