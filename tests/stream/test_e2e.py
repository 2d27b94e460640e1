"""End to end over real WebRTC on loopback: the real tiny FramePack pipeline, the server in-process on a free
port, and the Python aiortc client as the viewer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.images import default_scene

STEPS = 2  # few steps: the tiny model then generates well above 30 fps on a CPU


@pytest.fixture(scope="module")
def pipe(stream_pipe):
    return stream_pipe


def test_frames_arrive_and_a_prompt_change_applies(pipe, run_with_server):
    async def scenario(server, url):
        client = StreamClient(url, keep_frames=True)
        try:
            session = await client.connect(prompt="a calm lake", seed=3)
            first = await client.wait_for("section", timeout=15)
            # Until the first section the track shows the start image; then 30+ generated frames.
            await client.wait_frames(len(client.frames) + 30, timeout=15)
            played = server.sessions[session].track.stats.new
            ack = await client.send_prompt("a storm over the lake", id="p1")
            later = await client.wait_for(
                lambda m: m.get("type") == "section" and m["prompt"] == "a storm over the lake", timeout=15)
            live = await client.wait_for("prompt_live", timeout=10)
            rtt = await client.ping()
            progress = await client.wait_for("progress", timeout=5)
            stats = await client.wait_for("stats", timeout=5)
            return played, first, ack, later, live, rtt, progress, stats, client
        finally:
            await client.close()

    played, first, ack, later, live, rtt, progress, stats, client = run_with_server(pipe, scenario)
    assert played >= 25  # generated frames, as the server's track counts them (the rest may still be in flight)
    assert first["prompt"] == "a calm lake" and first["steps_run"] + first["steps_skipped"] == STEPS
    assert ack == {"type": "ack", "id": "p1", "section": ack["section"], "prompt": "a storm over the lake"}
    assert later["index"] >= ack["section"]
    # prompt_live: the first frame generated with the new prompt reached the track, with its latency.
    assert live["id"] == "p1" and live["section"] == later["index"] and live["latency_ms"] > 0
    assert 0 < rtt < 1000
    assert progress["steps"] == STEPS and 1 <= progress["step"] <= STEPS
    assert {"gen_fps", "play_fps", "buffer", "buffering", "section_ms"} <= stats.keys()
    frames = client.frames_array()
    height, width = pipe.frame_size(default_scene())
    assert frames.shape[1:] == (height, width, 3) and len(frames) >= 30
    arrivals = client.arrival_times()
    assert np.all(np.diff(arrivals) >= 0)
    # Frames are paced: 30 fps means about 33 ms apart on average (jitter aside).
    span = arrivals[-1] - arrivals[-30]
    assert 0.6 < span < 1.6, span
    assert frames.std() > 1.0  # real video, not a flat placeholder


def test_second_viewer_joins_the_same_session(pipe, run_with_server):
    async def scenario(server, url):
        first, second = StreamClient(url), StreamClient(url)
        try:
            session = await first.connect()
            await first.wait_frames(10, timeout=15)
            joined = await second.connect(session=session)
            section = await second.wait_for("section", timeout=15)  # broadcast to every viewer
            await second.wait_frames(len(second.frames) + 30, timeout=15)  # generated frames, after it
            listing = await second.get_json("/api/sessions")
            health = await second.get_json("/api/health")
            return session, joined, section, listing, health
        finally:
            await asyncio.gather(first.close(), second.close())

    session, joined, section, listing, health = run_with_server(pipe, scenario)
    assert joined == session
    assert len(listing["sessions"]) == 1
    entry = listing["sessions"][0]
    assert entry["id"] == session and entry["viewers"] == 2 and entry["state"] == "running"
    assert entry["sections_done"] >= 1 and entry["prompt"]
    assert health["status"] == "ok" and health["viewers"] == 2 and health["sessions"] == 1


def test_invalid_messages_pause_resume_and_stop(pipe, run_with_server):
    async def scenario(server, url):
        client = StreamClient(url)
        try:
            await client.connect()
            await client.wait_frames(5, timeout=15)
            client.send("this is not json")
            bad = await client.wait_for("error", timeout=5)
            before = len(client.frames)
            await client.wait_frames(before + 15, timeout=5)  # the stream goes on after an invalid message

            client.pause()
            await client.wait_for(lambda m: m.get("type") == "state" and m["state"] == "paused", timeout=5)
            generation = server.sessions[client.session].generation
            while generation.busy:  # the section in flight when the pause came still finishes
                await asyncio.sleep(0.05)
            done = generation.sections
            await asyncio.sleep(1.0)
            paused_sections = generation.sections - done + generation.busy
            frames_while_paused = len(client.frames)
            await asyncio.sleep(0.3)
            frames_while_paused = len(client.frames) - frames_while_paused

            client.resume()
            since = len(client.messages)
            await client.wait_for("section", timeout=10, since=since)
            client.stop()
            stopped = await client.wait_for(lambda m: m.get("type") == "state" and m["state"] == "stopped", 5)
            client.send({"type": "prompt", "text": "too late"})
            late = await client.wait_for(lambda m: m.get("type") == "error" and "stopped" in m["message"], 5)
            return bad, paused_sections, frames_while_paused, stopped, late
        finally:
            await client.close()

    bad, paused_sections, frames_while_paused, stopped, late = run_with_server(pipe, scenario)
    assert "not JSON" in bad["message"]
    assert paused_sections == 0
    assert frames_while_paused >= 5  # paused = frozen picture, but the track keeps its pace
    assert stopped["state"] == "stopped"
    assert "start a new session" in late["message"]


def test_signaling_errors_are_explained(pipe, run_with_server):
    async def scenario(server, url):
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.post(url + "offer", data="{oops") as r1:
                bad_json = (r1.status, await r1.json())
            async with http.post(url + "offer", json={"sdp": "v=0", "type": "offer", "session": "nope"}) as r2:
                unknown = (r2.status, await r2.json())
            async with http.post(url + "offer", json={"sdp": "v=0", "type": "offer", "image": "x"}) as r3:
                bad_image = (r3.status, await r3.json())
            async with http.get(url) as r4:
                page = (r4.status, await r4.text())
        return bad_json, unknown, bad_image, page

    began = time.monotonic()
    bad_json, unknown, bad_image, page = run_with_server(pipe, scenario)
    assert bad_json[0] == 400 and "JSON" in bad_json[1]["error"]
    assert unknown[0] == 404 and "/api/sessions" in unknown[1]["error"]
    assert bad_image[0] == 400 and "data URL" in bad_image[1]["error"]
    assert page[0] == 200 and 'id="prompt"' in page[1]
    assert time.monotonic() - began < 10
