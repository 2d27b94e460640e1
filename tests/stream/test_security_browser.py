"""The token and join links in the real page (headless Chromium, playwright): `framepack-rt serve` with
FRAMEPACK_RT_TOKEN set, opened as /?token=...; the token leaves the address bar, the copied join link holds a
view key (not the token) and opens a view-only page; the server prints the token nowhere.

The page's CSP allows no eval. playwright's evaluate() runs through the DevTools protocol, which a page's CSP
does not govern; wait_for_function() given an *expression* polls it with eval inside the page, which the CSP
refuses, but given a *function* ("() => ...") it does not. So the browser tests pass functions, and the page
needs no 'unsafe-eval' and no test hook (checked: no CSP violation is reported)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from framepack_rt.bench.browser import CHROMIUM

TOKEN = "page-token-7f3a9c2e41"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not found: apt-get install -y chromium")


@pytest.fixture
def served(launch_serve):
    """`framepack-rt serve` with a token from the environment; yields (url, output lines); ends it by pid."""
    proc, url, lines = launch_serve("--steps", "1", env={**os.environ, "FRAMEPACK_RT_TOKEN": TOKEN})
    try:
        yield url, lines
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_page_takes_the_token_and_shares_view_only_links(served, browser):
    url, lines = served
    # Without the token the page says what to do, and Start fails with the server's 401 message.
    stranger = browser.new_page()
    stranger.goto(url)
    stranger.wait_for_function("() => document.querySelector('#error').textContent.includes('needs a token')",
                               timeout=10_000)
    stranger.click("#start")
    stranger.wait_for_function("() => document.querySelector('#error').textContent.includes('could not start')",
                               timeout=15_000)

    owner = browser.new_page()
    violations = []  # the CSP has no 'unsafe-eval': neither the page nor playwright's waits may need it
    owner.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page_response = owner.goto(f"{url}?token={TOKEN}")
    csp = page_response.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-eval" not in csp
    assert TOKEN not in owner.url  # moved out of the address bar (and so out of shared links)
    owner.click("#start")
    owner.wait_for_function("() => window.framepack.role === 'control'", timeout=20_000)
    owner.wait_for_function("() => window.framepack.framesDecoded > 0", timeout=20_000)
    owner.click("#copy-link")
    link = re.search(r"join link: (\S+)", owner.text_content("#prompt-note")).group(1)
    assert "key=" in link and TOKEN not in link

    viewer = browser.new_page()
    viewer.goto(link)
    viewer.click("#start")
    viewer.wait_for_function("() => window.framepack.role === 'view'", timeout=20_000)
    viewer.wait_for_function("() => window.framepack.framesDecoded > 0", timeout=20_000)
    assert viewer.is_disabled("#prompt") and viewer.is_disabled("#pause") and viewer.is_disabled("#stop")
    assert "view only" in viewer.text_content("#session-label")
    assert not violations, violations
    for page in (stranger, owner, viewer):
        page.close()
    assert TOKEN not in "".join(lines)  # the server printed (and logged) the token nowhere
