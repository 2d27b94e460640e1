"""A page lets go of its session (DELETE /api/sessions/ID with the control key or the token), so Restart and
reload free the place at once; the state labels viewers get are right (a stopped stream never says finished,
a started one says running)."""

from __future__ import annotations

import asyncio

import aiohttp

from framepack_rt.stream.client import StreamClient

TOKEN = "release-token-0123456789"


async def _delete(url: str, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=headers or {}) as http, http.delete(url) as resp:
        return resp.status, await resp.json()


def test_delete_needs_the_control_key_and_frees_the_place_at_once(synthetic_pipe, run_with_server):
    async def scenario(server, url):
        async with StreamClient(url) as owner, StreamClient(url) as viewer:
            sid = await owner.connect()
            await viewer.connect(session=sid)
            await owner.wait_frames(5)
            session = server.sessions[sid]
            base = f"{url}api/sessions/{sid}"
            refused = [(await _delete(base))[0], (await _delete(f"{base}?key={session.view_key}"))[0],
                       (await _delete(f"{base}?key=not-the-key"))[0]]
            unknown = (await _delete(f"{url}api/sessions/nope?key=x"))[0]
            status, body = await _delete(f"{base}?key={session.control_key}")
            closed = await viewer.wait_for(lambda m: m.get("type") == "state" and m["state"] == "closed", 5)
            gone = sid not in server.sessions
            # --max-sessions-per-client 1: the address's one place is free again, no grace period to wait out.
            async with StreamClient(url) as again:
                second = await again.connect()
            return refused, unknown, status, body, closed, gone, second

    refused, unknown, status, body, closed, gone, second = run_with_server(
        synthetic_pipe, scenario, max_sessions_per_client=1, grace=30)
    assert refused == [401, 401, 401] and unknown == 404
    assert status == 200 and gone and second
    assert "ended by the viewer who controls it" in closed["detail"]


def test_with_a_token_strangers_get_401_for_any_session(synthetic_pipe, run_with_server):
    async def scenario(server, url):
        async with StreamClient(url, token=TOKEN) as owner:
            sid = await owner.connect()
            base = f"{url}api/sessions/"
            stranger = [(await _delete(base + sid))[0], (await _delete(base + "nope"))[0]]
            with_token = (await _delete(base + "nope", {"Authorization": f"Bearer {TOKEN}"}))[0]
            by_token = (await _delete(base + sid, {"Authorization": f"Bearer {TOKEN}"}))[0]
            return stranger, with_token, by_token, sid in server.sessions

    stranger, with_token, by_token, still_there = run_with_server(synthetic_pipe, scenario, token=TOKEN)
    assert stranger == [401, 401] and with_token == 404 and by_token == 200 and not still_there


def test_states_running_then_stopped_never_finished(synthetic_pipe, run_with_server):
    def running(m):  # greeted while the encoders run, or after: either way "running" reaches the viewer
        return m.get("type") in ("hello", "state") and m["state"] == "running"

    async def scenario(server, url):
        async with StreamClient(url) as client:
            await client.connect()
            await client.wait_for(running, 10)
            await client.wait_frames(10)
            client.stop()
            await client.wait_for(lambda m: m.get("type") == "state" and m["state"] == "stopped", 5)
            await asyncio.sleep(1.0)  # the stream's end reaches the worker meanwhile
            return [m["state"] for m in client.messages if m.get("type") in ("hello", "state")]

    states = run_with_server(synthetic_pipe, scenario)
    assert states in (["running", "stopped"], ["starting", "running", "stopped"]), states


def test_a_long_poll_answers_when_the_session_ends(synthetic_pipe, run_with_server):
    """GET /api/sessions/ID/end: "running" when the wait runs out, "closed" with the reason once it ends (a
    cluster replica follows its sessions with it); 404 for no such session."""
    async def scenario(server, url):
        async with StreamClient(url) as owner, aiohttp.ClientSession() as http:
            sid = await owner.connect()
            base = f"{url}api/sessions/{sid}/end"
            async with http.get(f"{base}?wait=0.2") as resp:
                running = await resp.json()
            waiting = asyncio.ensure_future(http.get(f"{base}?wait=30"))
            await asyncio.sleep(0.3)
            await _delete(f"{url}api/sessions/{sid}?key={server.sessions[sid].control_key}")
            async with await asyncio.wait_for(waiting, 10) as resp:
                ended = await resp.json()
            async with http.get(f"{url}api/sessions/nope/end") as resp:
                unknown = resp.status
            return running, ended, unknown

    running, ended, unknown = run_with_server(synthetic_pipe, scenario)
    assert running["state"] == "running"
    assert ended["state"] == "closed" and "ended by the viewer" in ended["reason"]
    assert unknown == 404
