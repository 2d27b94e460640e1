"""The server keeps serving whatever strangers send and whatever fails: floods of malformed requests and
messages, a generation that runs out of memory, viewers that vanish, sessions nobody watches, capacity
limits, and SIGTERM. The real tiny pipeline, in process (except the SIGTERM test: a `serve` subprocess).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest
import torch

from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.server import ServerSettings, StreamServer

STEPS = 2  # the tiny model then keeps up with 30 fps on a CPU


@pytest.fixture(scope="module")
def pipe(stream_pipe):
    return stream_pipe


async def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` every 0.1 s; returns the seconds it took, fails the test after ``timeout``."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - began


# -- floods -------------------------------------------------------------------------------------------------------

BAD_REQUESTS = [  # (method, path, request keywords, expected status)
    ("POST", "offer", dict(data=b"{nope", headers={"Content-Type": "application/json"}), 400),
    ("POST", "offer", dict(data=b"\xff\xfe\x00garbage", headers={"Content-Type": "application/json"}), 400),
    ("POST", "offer", dict(data=b"[" * 50_000, headers={"Content-Type": "application/json"}), 400),
    ("POST", "offer", dict(json={"sdp": "v=0\r\nthis is not sdp", "type": "offer"}), 400),
    ("POST", "offer", dict(json={"sdp": "v=0", "type": "offer", "session": "0123456789"}), 404),
    ("POST", "offer", dict(json={"sdp": "v=0", "type": "offer", "image": "data:image/png;base64,AAAA"}), 400),
    ("POST", "offer", dict(json={"sdp": "v=0", "type": "offer", "prompt": "x" * 5000}), 400),
    ("POST", "offer", dict(json={"type": "offer"}), 400),
    ("POST", "offer", dict(data=b"z" * (2 * 2**20), headers={"Content-Type": "application/json"}), 413),
    ("GET", "static/%2e%2e/server.py", {}, 404),
    ("GET", "api/sessions/does-not-exist", {}, 404),
    ("PUT", "api/health", {}, 405),
]
BAD_MESSAGES = [
    "not json", b"\xff\xfe\xfd", b"\x00" * 100, "[" * 3000, '{"type": "dance"}', '{"type": 7}', "[]", "null",
    '{"type": "ping", "t": NaN}', '{"type": "ping", "t": ' + "1" * 5000 + "}", '{"type": "prompt"}',
    '{"type": "prompt", "text": "\\ud800"}', '{"type": "prompt", "text": "a takeover attempt"}', '{"type": "stop"}',
]


def test_floods_of_bad_requests_and_messages_do_not_disturb_a_viewer(pipe, run_with_server):
    async def scenario(server, url):
        watcher, attacker = StreamClient(url), StreamClient(url)
        try:
            session_id = await watcher.connect(prompt="a lighthouse in fog")
            await watcher.wait_frames(30, timeout=20)
            await attacker.connect(session=session_id)  # joins: a viewer, it may not steer
            sections_before, frames_before = server.sessions[session_id].generation.sections, len(watcher.frames)
            began = time.monotonic()

            async def http_flood():
                statuses, limit = [], asyncio.Semaphore(6)
                async with aiohttp.ClientSession() as http:
                    async def one(i: int):
                        method, path, kwargs, want = BAD_REQUESTS[i % len(BAD_REQUESTS)]
                        async with limit, http.request(method, url + path, **kwargs) as resp:
                            body = await resp.json(content_type=None)
                            statuses.append((resp.status, want, "error" in body))
                    await asyncio.gather(*(one(i) for i in range(240)))
                    async with http.get(url + "api/health") as resp:
                        health = (resp.status, await resp.json())
                return statuses, health

            async def channel_flood():
                for i in range(300):  # as fast as the channel takes them: far over the rate limit
                    attacker.channel.send(BAD_MESSAGES[i % len(BAD_MESSAGES)])
                    if i % 50 == 0:
                        await asyncio.sleep(0)

            (statuses, health), _ = await asyncio.gather(http_flood(), channel_flood())
            await asyncio.sleep(1.0)
            flood_s = time.monotonic() - began
            await watcher.wait_frames(len(watcher.frames) + 30, timeout=10)
            session = server.sessions[session_id]
            return (statuses, health, flood_s, frames_before, len(watcher.frames), sections_before,
                    session.generation.sections, session.prompt, session.state, len(session.viewers),
                    len(server.sessions), attacker.messages)
        finally:
            await asyncio.gather(watcher.close(), attacker.close())

    (statuses, health, flood_s, frames_before, frames_after, sections_before, sections_after, prompt, state,
     viewers, sessions, replies) = run_with_server(pipe, scenario, max_image_bytes=2**20)
    print(f"\nflood: {len(statuses)} requests + 300 messages in {flood_s:.1f} s; watcher frames "
          f"{frames_before} -> {frames_after}, sections {sections_before} -> {sections_after}")
    assert len(statuses) == 240
    assert all(got == want and has_error for got, want, has_error in statuses), \
        [s for s in statuses if s[0] != s[1] or not s[2]][:5]
    assert health[0] == 200 and health[1]["status"] == "ok"
    assert frames_after - frames_before >= 30 * flood_s * 0.5  # the stream went on at (at least half) pace
    assert sections_after > sections_before  # and generation too
    assert prompt == "a lighthouse in fog" and state == "running"  # nothing the attacker sent took effect
    assert viewers == 2 and sessions == 1  # no half-made session or viewer was left behind
    errors = [m["message"] for m in replies if m.get("type") == "error"]
    limited = [e for e in errors if "too many control messages" in e]
    # The burst (40) is answered one by one, then one warning per second; the rest is dropped unanswered.
    assert 1 <= len(limited) <= flood_s + 2
    assert len(errors) <= 40 + 20 * (flood_s + 1) + len(limited)
    assert any("view-only" in e for e in errors) and any("not JSON" in e for e in errors)


# -- faults -------------------------------------------------------------------------------------------------------

class RunsOutOfMemory:
    """A pipeline stream that raises CUDA's out-of-memory error in its ``fail_at``-th section."""

    def __init__(self, stream, fail_at: int) -> None:
        self.stream, self.fail_at, self.count = stream, fail_at, 0

    def __next__(self):
        self.count += 1
        if self.count == self.fail_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return next(self.stream)

    def set_prompt(self, text: str) -> int:
        return self.stream.set_prompt(text)

    def stop(self) -> None:
        self.stream.stop()


class FailingPipe:
    """The real pipeline, except that streams started with ``doomed`` as their prompt run out of memory."""

    def __init__(self, pipe, doomed: str, fail_at: int = 3) -> None:
        self.pipe, self.doomed, self.fail_at = pipe, doomed, fail_at

    def frame_size(self, image):
        return self.pipe.frame_size(image)

    def bucket(self, image):
        return self.pipe.bucket(image)

    def stream(self, image, prompt, **kwargs):
        stream = self.pipe.stream(image, prompt, **kwargs)
        return RunsOutOfMemory(stream, self.fail_at) if prompt == self.doomed else stream


def test_out_of_memory_ends_one_session_and_the_others_go_on(pipe):
    async def scenario(server, url):
        doomed, healthy = StreamClient(url), StreamClient(url)
        try:
            doomed_id = await doomed.connect(prompt="doomed")
            healthy_id = await healthy.connect(prompt="a meadow")
            error = await doomed.wait_for("error", timeout=30)
            failed_state = await doomed.wait_for(lambda m: m.get("type") == "state" and m["state"] == "error", 5)
            frames_at_failure = len(healthy.frames)
            sections_at_failure = server.sessions[healthy_id].generation.sections
            await wait_until(lambda: doomed_id not in server.sessions, 10, "the failed session closes")
            await wait_until(lambda: doomed.pc.connectionState == "closed", 10, "its viewer is hung up on")
            await healthy.wait_frames(frames_at_failure + 45, timeout=15)
            await wait_until(lambda: server.sessions[healthy_id].generation.sections >= sections_at_failure + 2,
                             20, "the other session keeps generating")
            async with aiohttp.ClientSession() as http, http.get(url + "api/health") as resp:
                health = await resp.json()
            return error, failed_state, health, server.sessions[healthy_id].state, server.worker.alive
        finally:
            await asyncio.gather(doomed.close(), healthy.close())

    async def main():
        server = StreamServer(FailingPipe(pipe, "doomed"), ServerSettings(steps=STEPS))
        url = await server.start("127.0.0.1", 0)
        try:
            return await asyncio.wait_for(scenario(server, url), 90)
        finally:
            await server.stop()

    error, failed_state, health, healthy_state, worker_alive = asyncio.run(main())
    assert "ran out of memory" in error["message"] and "--max-sessions" in error["message"]
    assert failed_state["state"] == "error"
    assert health["status"] == "ok" and health["sessions"] == 1 and worker_alive and healthy_state == "running"


VANISHING_VIEWER = """
import asyncio, sys
from framepack_rt.stream.client import StreamClient

async def main():
    client = StreamClient(sys.argv[1])
    print(await client.connect(prompt="a viewer about to vanish"), flush=True)
    await client.wait_frames(10, timeout=30)
    print("watching", flush=True)
    await asyncio.sleep(120)  # until killed: no goodbye, no close

asyncio.run(main())
"""


def test_a_viewer_that_vanishes_frees_everything_and_generation_stops(pipe, run_with_server):
    async def scenario(server, url):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", VANISHING_VIEWER, url,
                                                    stdout=asyncio.subprocess.PIPE)
        try:
            session_id = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip() == "watching"
            session = server.sessions[session_id]
            viewer = next(iter(session.viewers.values()))
            proc.kill()  # SIGKILL: the peer connection ends without DTLS close or SCTP abort
            await proc.wait()
            killed = time.monotonic()
            await wait_until(lambda: not session.viewers, 15, "the vanished viewer is dropped")
            dropped_after = time.monotonic() - killed
            await wait_until(lambda: not session.generation.busy, 10, "the section in flight finishes")
            sections = session.generation.sections
            await asyncio.sleep(1.5)
            idle_sections = session.generation.sections - sections
            await wait_until(lambda: session_id not in server.sessions, 10, "the session closes after the grace")
            return (dropped_after, viewer.pc.connectionState, viewer.track.readyState, session.generation.watched,
                    idle_sections, server.peer_connections)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    dropped_after, pc_state, track_state, watched, idle_sections, pcs = run_with_server(
        pipe, scenario, viewer_timeout=3, grace=3)
    print(f"\nvanished viewer dropped {dropped_after:.1f} s after SIGKILL (viewer timeout 3 s)")
    assert dropped_after < 3 + 3  # the timeout, plus one check interval and RTCP report spacing
    assert pc_state == "closed" and track_state == "ended" and not watched and pcs == 0
    assert idle_sections == 0  # with nobody watching, the worker pulls no more sections


def test_unwatched_and_idle_sessions_are_closed(pipe, run_with_server):
    async def scenario(server, url):
        leaver, pauser = StreamClient(url), StreamClient(url)
        try:
            left_id = await leaver.connect(prompt="nobody will watch this")
            await leaver.wait_frames(5, timeout=20)
            await leaver.close()  # a polite goodbye: the viewer goes at once
            left = server.sessions[left_id]
            await wait_until(lambda: not left.viewers, 5, "the viewer that left is removed")
            assert not left.generation.watched
            gone_after = await wait_until(lambda: left_id not in server.sessions, 10, "closed after the grace")

            paused_id = await pauser.connect(prompt="paused forever")
            await pauser.wait_for(lambda m: m.get("type") == "state" and m["state"] == "running" or
                                  m.get("type") == "hello", 10)
            pauser.pause()
            await pauser.wait_for(lambda m: m.get("type") == "state" and m["state"] == "paused", 5)
            idle_after = await wait_until(lambda: paused_id not in server.sessions, 10, "an idle session closes")
            closed = await pauser.wait_for(lambda m: m.get("type") == "state" and m["state"] == "closed", 5)
            return gone_after, idle_after, closed
        finally:
            await asyncio.gather(leaver.close(), pauser.close())

    gone_after, idle_after, closed = run_with_server(pipe, scenario, grace=2, idle_timeout=2)
    assert 1.5 < gone_after < 5 and 1.5 < idle_after < 5
    assert "nothing generated for 2 s" in closed["detail"]


def test_capacity_limits_answer_429_with_retry_after(pipe, run_with_server):
    async def scenario(server, url):
        clients = [StreamClient(url) for _ in range(3)]
        try:
            session_id = await clients[0].connect()
            await clients[1].connect(session=session_id)  # the second and last viewer allowed
            async with aiohttp.ClientSession() as http:
                pc_offer = {"sdp": clients[0].pc.localDescription.sdp, "type": "offer"}
                async with http.post(url + "offer", json={**pc_offer, "session": session_id}) as resp:
                    full_session = (resp.status, await resp.json(), resp.headers.get("Retry-After"))
                async with http.post(url + "offer", json=pc_offer) as resp:  # a second session: over the limit
                    full_server = (resp.status, await resp.json(), resp.headers.get("Retry-After"))
            await clients[1].close()
            await wait_until(lambda: len(server.sessions[session_id].viewers) == 1, 5, "a place frees up")
            await clients[2].connect(session=session_id)  # and is taken again
            return full_session, full_server, len(server.sessions[session_id].viewers)
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    full_session, full_server, viewers = run_with_server(pipe, scenario, max_sessions=1, max_viewers=2)
    assert full_session[0] == 429 and "maximum of 2 viewers" in full_session[1]["error"] and full_session[2]
    assert full_server[0] == 429 and "maximum of 1 sessions" in full_server[1]["error"] and full_server[2]
    assert viewers == 2


# -- shutdown -----------------------------------------------------------------------------------------------------

def test_sigterm_closes_connections_and_exits_cleanly(launch_serve):
    proc, url, lines = launch_serve("--steps", "1")
    # The launch fixture kills the process at teardown if the test fails before it exits.
    async def watch_then_terminate():
        client = StreamClient(url)
        try:
            await client.connect()
            await client.wait_frames(10, timeout=30)
            os.kill(proc.pid, signal.SIGTERM)
            sent = time.monotonic()
            await wait_until(lambda: client.pc.connectionState in ("closed", "failed"), 10,
                             "the server hangs up on its viewer")
            return time.monotonic() - sent, sent
        finally:
            await client.close()

    hung_up_after, sent = asyncio.run(watch_then_terminate())
    code = proc.wait(timeout=max(0.1, 5 - (time.monotonic() - sent)))
    exited_after = time.monotonic() - sent
    print(f"\nSIGTERM: viewer hung up on after {hung_up_after:.2f} s, process exited after {exited_after:.2f} s")
    assert code == 0, "".join(lines)
    assert exited_after < 5 and "stopping" in "".join(lines)
