"""Slots that strangers could hold without watching: offers that never connect, one address taking every
session or piling up offers, view keys filling a session. All on loopback, with the synthetic pipeline."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from framepack_rt.stream.client import StreamClient

TOKEN = "slots-token-0123456789"


async def post_offer(url: str, body: dict, source: str = "127.0.0.1", token: str | None = None) -> tuple[int, dict]:
    """POST /offer from the loopback address ``source`` (127.0.0.0/8 is all loopback: each is one 'client')."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async with http.post(url + "offer", json=body) as resp:
            return resp.status, await resp.json()


def test_offers_that_never_connect_free_their_slots_and_run_no_encoder(run_with_server, synthetic_pipe,
                                                                        browser_offer):
    async def scenario(server, url):
        sources = [f"127.0.0.{10 + i}" for i in range(4)]  # four clients, one session each: every slot
        answers = [await post_offer(url, {"sdp": await browser_offer(), "type": "offer"}, source)
                   for source in sources]
        posted = time.monotonic()
        full = await post_offer(url, {"sdp": await browser_offer(), "type": "offer"}, "127.0.0.20")
        held = len(server.sessions)
        while server.sessions and time.monotonic() - posted < 10:
            await asyncio.sleep(0.05)
        freed_after = time.monotonic() - posted
        viewer = StreamClient(url)  # and a real viewer gets a slot at once, and its session generates
        try:
            await viewer.connect()
            await viewer.wait_frames(5, timeout=15)
        finally:
            await viewer.close()
        return answers, full, held, freed_after, server._pending.held, server._client_sessions.held

    connect_timeout = 2.0
    answers, full, held, freed_after, pending, owned = run_with_server(
        synthetic_pipe, scenario, connect_timeout=connect_timeout, max_sessions=4)
    print(f"\nfour offers that never connect: slots freed {freed_after:.2f} s after posting "
          f"(connect timeout {connect_timeout:g} s)")
    assert [status for status, _ in answers] == [200] * 4 and held == 4
    assert full[0] == 429 and "maximum of 4 sessions" in full[1]["error"]
    # Closed at the connect timeout (checked once a second), with no grace period on top.
    assert connect_timeout <= freed_after < connect_timeout + 1.5
    assert synthetic_pipe.streams == 1  # only the real viewer's session ran its encoders
    assert pending == {} and owned == {}  # every per-client place was given back


def test_per_client_limits(run_with_server, synthetic_pipe, browser_offer):
    async def scenario(server, url):
        sessions = [await post_offer(url, {"sdp": await browser_offer(), "type": "offer"}) for _ in range(3)]
        other = await post_offer(url, {"sdp": await browser_offer(), "type": "offer"}, "127.0.0.2")
        session_id = sessions[0][1]["session"]
        joins = [await post_offer(url, {"sdp": await browser_offer(), "type": "offer", "session": session_id},
                                  "127.0.0.3") for _ in range(4)]
        return sessions, other, joins

    sessions, other, joins = run_with_server(synthetic_pipe, scenario, max_sessions=8, max_sessions_per_client=2,
                                             max_pending_per_client=3, max_viewers=8)
    assert [s for s, _ in sessions] == [200, 200, 429] and "2 sessions" in sessions[2][1]["error"]
    assert other[0] == 200  # another address is not held back by the first one
    assert [s for s, _ in joins] == [200, 200, 200, 429] and "not up yet" in joins[3][1]["error"]


def test_view_keys_cannot_fill_a_session_and_unknown_ids_look_like_wrong_keys(run_with_server, synthetic_pipe,
                                                                             browser_offer):
    async def scenario(server, url):
        owner = await post_offer(url, {"sdp": await browser_offer(), "type": "offer"}, token=TOKEN)
        session_id, key = owner[1]["session"], owner[1]["view_key"]
        views = [await post_offer(url, {"sdp": await browser_offer(), "type": "offer", "session": session_id,
                                        "key": key}, f"127.0.0.{30 + i}") for i in range(4)]
        control = await post_offer(url, {"sdp": await browser_offer(), "type": "offer", "session": session_id},
                                   token=TOKEN)
        probes = [await post_offer(url, {"sdp": "v=0", "type": "offer", "session": sid, "key": k})
                  for sid, k in ((session_id, "wrong-key"), ("no-such-session-id", "wrong-key"),
                                 ("no-such-session-id", key))]
        unknown_with_token = await post_offer(url, {"sdp": "v=0", "type": "offer", "session": "nope"}, token=TOKEN)
        return owner, views, control, probes, unknown_with_token, len(session_id)

    owner, views, control, probes, unknown_with_token, id_chars = run_with_server(
        synthetic_pipe, scenario, token=TOKEN, max_viewers=4, control_slots=1)
    assert owner[0] == 200 and id_chars >= 16  # 128 random bits, base64url
    # 4 places, 1 kept for control: the owner holds one, key holders get two, the third is refused.
    assert [s for s, _ in views] == [200, 200, 429, 429] and "view-only" in views[2][1]["error"]
    assert control[0] == 200  # a token holder still gets the kept place
    assert [s for s, _ in probes] == [401, 401, 401]
    assert len({body["error"] for _, body in probes}) == 1  # one answer: nothing tells which ids exist
    assert unknown_with_token[0] == 404  # the operator, with the token, is told plainly


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(run_with_server, synthetic_pipe, browser_offer):
    async def scenario(server, url):
        async def post(source: str, forwarded: str) -> int:
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.post(url + "offer", json={"sdp": await browser_offer(), "type": "offer"},
                                     headers={"X-Forwarded-For": forwarded}) as resp:
                    return resp.status

        # The proxy (127.0.0.1) appends the real client's address last; what the client wrote before it is its own.
        via_proxy = [await post("127.0.0.1", f"198.51.100.{i}, 203.0.113.5") for i in range(2)]
        other = await post("127.0.0.1", "203.0.113.6")
        spoofed = [await post("127.0.0.2", f"203.0.113.{50 + i}") for i in range(2)]  # not a proxy: ignored
        return via_proxy, other, spoofed, dict(server._client_sessions.held)

    via_proxy, other, spoofed, held = run_with_server(synthetic_pipe, scenario, max_sessions=8,
                                                      max_sessions_per_client=1, trusted_proxies=("127.0.0.1",))
    assert via_proxy == [200, 429] and other == 200 and spoofed == [200, 429]
    assert held == {"203.0.113.5": 1, "203.0.113.6": 1, "127.0.0.2": 1}
