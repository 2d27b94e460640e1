"""Offers built to hurt: hundreds of media sections, a thousand candidates, candidates that name broadcast,
multicast, link-local, metadata and mDNS addresses. All on loopback: nothing is ever sent outside 127.0.0.0/8
(the server refuses candidates naming other addresses, and the tests check that it never probed one).
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import aioice.ice
import numpy as np
import pytest

from framepack_rt.stream.candidates import (
    MAX_CANDIDATES, MAX_MEDIA_SECTIONS, CandidatePolicy, check_offer)
from framepack_rt.stream.client import StreamClient


def with_candidates(sdp: str, candidates: list[tuple[str, int]]) -> str:
    """``sdp`` with these (host, port) UDP host candidates at the end of its first media section."""
    lines = [f"a=candidate:{i} 1 udp {2130706431 - i} {host} {port} typ host"
             for i, (host, port) in enumerate(candidates)]
    first = sdp.index("\r\nm=", sdp.index("\r\nm=") + 1) if sdp.count("\r\nm=") > 1 else len(sdp.rstrip())
    return sdp[:first] + "\r\n" + "\r\n".join(lines) + sdp[first:]


def many_sections(sdp: str, total: int) -> str:
    """``sdp`` with ``total`` media sections: its data channel's and small video sections, as an attacker
    would write them (500 fit in the 64 KB an SDP may have)."""
    video = "".join(f"m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:v{i}\r\na=recvonly\r\n"
                    f"a=rtpmap:96 VP8/90000\r\n" for i in range(total - 1))
    return sdp[:sdp.index("m=video")] + video + sdp[sdp.index("m=application"):]


# -- the check itself, as text ------------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback, mdns, refused", [
    ("127.0.0.1", True, False, None), ("127.0.0.1", False, False, "loopback"), ("::1", False, False, "loopback"),
    ("192.0.2.2", True, False, "not loopback"), ("192.0.2.2", False, False, None),
    ("2001:db8::5", False, False, None), ("0.0.0.0", False, False, "unspecified"),
    ("0.1.2.3", False, False, "unspecified"), ("::", False, False, "unspecified"),
    ("255.255.255.255", False, False, "broadcast or reserved"), ("240.0.0.1", False, False, "broadcast or reserved"),
    ("224.0.0.251", False, False, "multicast"), ("ff02::1", False, False, "multicast"),
    ("169.254.169.254", False, False, "link-local"), ("fe80::1", False, False, "link-local"),
    ("::ffff:169.254.169.254", False, False, "link-local"), ("::ffff:127.0.0.1", False, False, "loopback"),
    ("4f1c1b6e-0a8f-4a51-8a6e-3d3b1c2e9f00.local", False, False, "mdns"),
    ("4f1c1b6e-0a8f-4a51-8a6e-3d3b1c2e9f00.local", False, True, None),
    ("metadata.google.internal", False, True, "not an address"), ("evil.example.com", False, True, "not an address"),
])
def test_candidate_policy(host, loopback, mdns, refused):
    assert CandidatePolicy(loopback=loopback, allow_mdns=mdns).refuse(host) == refused


def test_offer_check_counts_sections_and_filters_candidates(browser_offer):
    sdp = asyncio.run(browser_offer())
    with pytest.raises(ValueError, match="500 media sections"):
        check_offer(many_sections(sdp, 500), CandidatePolicy())
    assert check_offer(many_sections(sdp, MAX_MEDIA_SECTIONS), CandidatePolicy()).kept == 0
    with pytest.raises(ValueError, match="1000 ICE candidates"):
        check_offer(with_candidates(sdp, [("127.0.0.1", 10000 + i) for i in range(1000)]), CandidatePolicy())
    hostile = [("0.0.0.0", 9), ("255.255.255.255", 9), ("224.0.0.1", 9), ("169.254.169.254", 80),
               ("abc.local", 9), ("192.0.2.2", 9), ("127.0.0.1", 5000), ("127.0.0.1", 5000)]
    checked = check_offer(with_candidates(sdp, hostile + [("127.0.0.1", 6000 + i) for i in range(30)]),
                          CandidatePolicy(loopback=True))
    assert checked.kept == MAX_CANDIDATES
    kept = [line for line in checked.sdp.split("\r\n") if line.startswith("a=candidate:")]
    assert len(kept) == MAX_CANDIDATES + 1  # the duplicate of 127.0.0.1:5000 stays (the same target)
    assert all(" 127.0.0.1 " in line for line in kept)
    assert checked.dropped["over the candidate limit"] == 30 + 1 - MAX_CANDIDATES
    for bad in ("a=candidate:1 1 udp 1 127.0.0.1 notaport typ host", "a=candidate:1 1 udp"):
        with pytest.raises(ValueError, match="malformed a=candidate"):
            check_offer(sdp + bad + "\r\n", CandidatePolicy())


def test_checking_an_offer_is_cheap(browser_offer):
    sdp = asyncio.run(browser_offer())
    worst = with_candidates(many_sections(sdp, 4), [("127.0.0.1", 7000 + i) for i in range(64)])
    began = time.perf_counter()
    for _ in range(100):
        check_offer(worst, CandidatePolicy())
    per_offer_ms = (time.perf_counter() - began) * 10
    print(f"\ncheck_offer: {per_offer_ms:.3f} ms per offer (3 video sections, 64 candidates)")
    assert per_offer_ms < 5


# -- over HTTP, against a running server ---------------------------------------------------------------------

class LoopLag:
    """The longest the event loop went without running a 1 ms sleep: how long something blocked it."""

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []  # (when, gap) on time.monotonic()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            self.gaps.append((now, now - last))
            last = now

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def worst(self, since: float, until: float) -> float:
        return max((g for t, g in self.gaps if since <= t <= until), default=0.0)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def test_500_media_sections_are_refused_at_once_and_viewers_keep_playing(run_with_server, synthetic_pipe,
                                                                         browser_offer):
    async def scenario(server, url):
        watcher = StreamClient(url)
        lag = LoopLag()
        try:
            await watcher.connect()
            await watcher.wait_frames(20, timeout=20)
            sdp = many_sections(await browser_offer(), 500)
            lag.start()
            await asyncio.sleep(0.5)
            answers = []
            began = time.monotonic()
            async with aiohttp.ClientSession() as http:
                for _ in range(5):
                    sent = time.monotonic()
                    async with http.post(url + "offer", json={"sdp": sdp, "type": "offer"}) as resp:
                        answers.append((resp.status, (await resp.json())["error"], time.monotonic() - sent))
            ended = time.monotonic()
            await asyncio.sleep(0.5)
            # A legitimate offer, for comparison: the loop time one answered offer costs.
            sdp_ok = await browser_offer()
            legit_began = time.monotonic()
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "offer", json={"sdp": sdp_ok, "type": "offer",
                                                          "session": watcher.session}) as resp:
                    legit = resp.status
            legit_ended = time.monotonic()
            await asyncio.sleep(0.3)
            arrivals = [f.mono for f in watcher.frames if began - 0.3 <= f.mono <= ended + 0.5]
            gap = max(np.diff(arrivals)) if len(arrivals) > 1 else float("inf")
            return (answers, gap, len(arrivals), lag.worst(began, ended), legit,
                    lag.worst(legit_began, legit_ended), len(server.sessions))
        finally:
            await lag.stop()
            await watcher.close()

    answers, gap, frames, lag_attack, legit, lag_legit, sessions = run_with_server(synthetic_pipe, scenario)
    print(f"\n500 media sections: answered in {max(a[2] for a in answers) * 1000:.1f} ms at most; viewer's longest "
          f"frame gap {gap * 1000:.0f} ms over {frames} frames; loop blocked {lag_attack * 1000:.1f} ms at most; "
          f"one legitimate offer blocked the loop {lag_legit * 1000:.1f} ms at most")
    assert all(status == 400 and "500 media sections" in error for status, error, _ in answers)
    assert all(seconds < 0.050 for _, _, seconds in answers)
    assert gap < 0.150 and frames >= 10
    assert legit == 200 and sessions == 1


def test_hostile_candidates_are_never_probed(run_with_server, monkeypatch, synthetic_pipe, browser_offer):
    """1000 candidates: refused outright. 60 loopback targets plus hostile ones: at most 16 are probed, and
    nothing outside loopback, nothing resolved by mDNS."""
    sent: list[tuple[str, int]] = []
    original = aioice.ice.StunProtocol.send_stun
    monkeypatch.setattr(aioice.ice.StunProtocol, "send_stun",
                        lambda self, message, addr: (sent.append(tuple(addr[:2])), original(self, message, addr)))
    mdns_lookups = []

    async def no_mdns(subscriber):
        mdns_lookups.append(subscriber)
        raise AssertionError("mDNS must not be used")

    monkeypatch.setattr(aioice.ice, "get_or_create_mdns_protocol", no_mdns)
    sockets = []
    for _ in range(60):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        sockets.append(s)
    targets = [("127.0.0.1", s.getsockname()[1]) for s in sockets]
    hostile = [("0.0.0.0", 3478), ("255.255.255.255", 3478), ("224.0.0.251", 5353), ("169.254.169.254", 80),
               ("fe80::1", 3478), ("4f1c1b6e-0a8f-4a51-8a6e-3d3b1c2e9f00.local", 3478), ("192.0.2.2", 3478),
               ("10.0.0.1", 3478)]

    async def scenario(server, url):
        sdp = await browser_offer()
        async with aiohttp.ClientSession() as http:
            flood = with_candidates(sdp, [("127.0.0.1", 20000 + i) for i in range(1000)])
            async with http.post(url + "offer", json={"sdp": flood, "type": "offer"}) as resp:
                refused = (resp.status, (await resp.json())["error"])
            await asyncio.sleep(0.5)
            sent_after_flood = len(sent)
            mixed = with_candidates(sdp, hostile + targets[:56])  # 64 lines: the most an offer may carry
            async with http.post(url + "offer", json={"sdp": mixed, "type": "offer"}) as resp:
                accepted = resp.status
        await asyncio.sleep(2.5)  # aioice paces checks every 20 ms: all of them go out well within this
        hit = set()
        for s in sockets:
            try:
                while True:
                    s.recvfrom(2048)
                    hit.add(s.getsockname()[1])
            except BlockingIOError:
                pass
        return refused, sent_after_flood, accepted, hit

    try:
        refused, sent_after_flood, accepted, hit = run_with_server(synthetic_pipe, scenario, connect_timeout=5)
    finally:
        for s in sockets:
            s.close()
    destinations = set(sent)
    print(f"\ncandidates: 1000 -> {refused[0]}; mixed offer probed {len(destinations)} targets, "
          f"{len(hit)} of our sockets received checks")
    assert refused[0] == 400 and "1000 ICE candidates" in refused[1] and sent_after_flood == 0
    assert accepted == 200
    assert 0 < len(destinations) <= MAX_CANDIDATES and len(hit) <= MAX_CANDIDATES
    assert all(host == "127.0.0.1" for host, _ in destinations), destinations
    assert destinations <= set(targets) and not mdns_lookups
