"""framepack-rt on Ray Serve (stream/cluster.py): a local Ray instance on loopback, the tiny model, 2 replicas.

Two sessions land on different replicas and both stream to aiortc viewers; then one replica's process is
killed: its viewer hears from the ingress that the session is lost, the other session goes on, and a new
session starts. Ray's own servers stay on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set in tests/conftest.py
before any test imports ray) and send no usage statistics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

ray = pytest.importorskip("ray", reason="needs ray[serve]: pip install 'framepack-rt[cluster]'")
serve = pytest.importorskip("ray.serve")

from framepack_rt.stream.client import StreamClient  # noqa: E402
from framepack_rt.stream.cluster import APP_NAME, ClusterSettings, build  # noqa: E402
from framepack_rt.stream.server import ServerSettings  # noqa: E402

FRAMES_TIMEOUT = 120  # two replicas generating on 2 shared cores
LOST_WITHIN_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # A short grace: the first test's sessions end soon after its viewers leave.
        settings = ServerSettings(model="tiny", device="cpu", steps=2, batching=False, grace=1.0,
                                  max_sessions_per_client=3)
        cluster = ClusterSettings(replicas=2, cpus_per_replica=0, media_host="127.0.0.1")
        serve.run(build(settings, cluster), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        ray.shutdown()  # ends every Ray process it started (replicas, controller, proxy)


def run(coro: Any, timeout: float = 300) -> Any:
    """On a thread of its own: the browser test's playwright keeps an event loop in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, asyncio.wait_for(coro, timeout)).result()


async def generated(client: StreamClient, since: int = 0) -> None:
    """A section generated for ``client``'s session (after message ``since``), and frames received."""
    await client.wait_for(lambda m: m.get("type") == "section", timeout=FRAMES_TIMEOUT, since=since)
    await client.wait_frames(len(client.frames) + 5, timeout=FRAMES_TIMEOUT)


async def sessions(url: str) -> dict[str, dict]:
    return {s["id"]: s for s in (await StreamClient(url).get_json("/api/sessions"))["sessions"]}


def test_two_sessions_land_on_two_replicas_and_both_stream(cluster_url):
    async def scenario() -> None:
        first, second = StreamClient(cluster_url), StreamClient(cluster_url)
        try:
            await first.connect(prompt="a red ball moves right")
            await second.connect(prompt="a red ball moves left")
            await asyncio.gather(*(generated(c) for c in (first, second)))
            listed = await sessions(cluster_url)
            assert {first.session, second.session} <= set(listed)
            assert listed[first.session]["replica"]["id"] != listed[second.session]["replica"]["id"]
            assert all(s["replica"]["node"] == "127.0.0.1" for s in listed.values())
            # Media comes from the replica itself: its answer's candidates are its loopback ones only.
            candidates = [line.split()[4] for line in first.pc.remoteDescription.sdp.splitlines()
                          if line.startswith("a=candidate:")]
            assert candidates and set(candidates) == {"127.0.0.1"}, candidates
            health = await first.get_json("/api/health")
            assert health["sessions"] == 2 and len(health["cluster"]["sessions_by_replica"]) == 2
            # A join and a session's own routes reach the replica holding it (on any other: 404).
            joiner = StreamClient(cluster_url)
            try:
                assert await joiner.connect(session=second.session) == second.session
                await joiner.wait_frames(5, timeout=FRAMES_TIMEOUT)
            finally:
                await joiner.close()
            for client in (first, second):
                assert (await client.get_json(f"/api/sessions/{client.session}"))["id"] == client.session
            async with aiohttp.ClientSession() as http:
                async with http.get(cluster_url + "metrics") as resp:
                    metrics = await resp.text()
                # The recording, from the session's replica through the ingress, streamed.
                video = f"{cluster_url}api/sessions/{first.session}/video.mp4?key={first.control_key}"
                async with http.get(video) as resp:
                    assert resp.status == 200 and resp.headers["Content-Type"] == "video/mp4"
                    mp4 = await resp.read()
                assert mp4[4:8] == b"ftyp" and len(mp4) == int(resp.headers["Content-Length"])
            assert 'framepack_cluster_sessions{replica="' in metrics and "framepack_rt_sessions{replica=" in metrics
        finally:
            await asyncio.gather(first.close(), second.close())

    run(scenario())


def test_a_killed_replica_ends_only_its_sessions_and_new_sessions_start(cluster_url):
    async def scenario() -> None:
        doomed, survivor, newcomer = StreamClient(cluster_url), StreamClient(cluster_url), StreamClient(cluster_url)
        deadline = time.monotonic() + 30
        while await sessions(cluster_url) and time.monotonic() < deadline:  # the last test's, ending (grace)
            await asyncio.sleep(0.5)
        assert not await sessions(cluster_url), "the previous test's sessions did not end"
        try:
            await doomed.connect()
            await survivor.connect()
            await asyncio.gather(*(generated(c) for c in (doomed, survivor)))
            listed = await sessions(cluster_url)
            victim = listed[doomed.session]["replica"]
            assert listed[survivor.session]["replica"]["id"] != victim["id"]
            os.kill(victim["pid"], signal.SIGKILL)
            killed = time.monotonic()
            end = await doomed.wait_end(timeout=LOST_WITHIN_S)
            assert end["state"] == "lost" and "replica" in end["reason"], end
            print(f"the viewer heard its session was lost {time.monotonic() - killed:.2f} s after the kill")
            # The other session goes on, and a new one starts (on the survivor, or the restarted replica).
            await generated(survivor, since=len(survivor.messages))
            await newcomer.connect()
            await generated(newcomer)
            listed = await sessions(cluster_url)
            assert doomed.session not in listed and {survivor.session, newcomer.session} <= set(listed)
            health = await survivor.get_json("/api/health")
            assert health["cluster"]["sessions_lost"] >= 1
        finally:
            await asyncio.gather(doomed.close(), survivor.close(), newcomer.close())

    run(scenario())


def test_the_page_tells_its_viewer_when_the_replica_died(cluster_url, new_page):
    """The page in Chromium (skipped without it: the browser fixture): its session's replica is killed, and the
    ingress's answer shows as its error."""
    import json
    import urllib.request

    page = new_page(cluster_url)
    page.click("#start")
    page.wait_for_function("() => window.framepack.session && window.framepack.framesDecoded >= 5",
                           timeout=FRAMES_TIMEOUT * 1000)
    session = page.evaluate("() => window.framepack.session")
    with urllib.request.urlopen(cluster_url + "api/sessions", timeout=30) as resp:
        listed = {s["id"]: s for s in json.load(resp)["sessions"]}
    os.kill(listed[session]["replica"]["pid"], signal.SIGKILL)
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('session lost')",
                           timeout=LOST_WITHIN_S * 1000)
    assert "replica" in page.text_content("#error") and page.text_content("#status") == "error"
    assert not page.errors

@pytest.mark.slow
def test_serve_cluster_command_deploys_and_stops_on_ctrl_c(launch_serve):
    """``framepack-rt serve --cluster ray``: a local Ray instance, the page and the API, then Ctrl-C takes it
    all down (the Ray processes it started included)."""
    import urllib.request

    mark = f"framepack-cli-test-{os.getpid()}-{time.time_ns()}"  # inherited by every Ray process it starts

    def started_by_the_command() -> list[int]:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark.encode() in environ.read_bytes():
                    found.append(int(environ.parent.name))
            except OSError:  # gone, or not ours to read
                pass
        return found

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FRAMEPACK_TEST_MARK": mark}
    proc, url, lines = launch_serve("--cluster", "ray", "--replicas", "2", "--model", "tiny", "--device", "cpu",
                                    "--cpus-per-replica", "0", env=env, timeout=240)
    with urllib.request.urlopen(url + "api/health", timeout=30) as resp:
        assert resp.status == 200 and b'"cluster"' in resp.read()
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert b"<html" in resp.read()
    assert len(started_by_the_command()) >= 4  # the command, Ray's servers, the replicas: found by the mark
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, "".join(lines)
    deadline = time.monotonic() + 30
    while (left := started_by_the_command()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes the command started are still running: {left}"


@pytest.mark.slow
def test_a_replica_of_two_sequence_parallel_workers_streams(cluster_url):
    """One replica whose stream runs on two worker processes (gloo): the application is redeployed so."""
    settings = ServerSettings(model="tiny", device="cpu", steps=2, record_max_seconds=0, grace=1.0)
    cluster = ClusterSettings(replicas=1, cpus_per_replica=0, media_host="127.0.0.1", sequence_parallel=2,
                              parallel_timeout=60)
    serve.run(build(settings, cluster), name=APP_NAME, route_prefix="/")

    async def scenario() -> None:
        viewer = StreamClient(cluster_url)
        try:
            await viewer.connect()
            await generated(viewer)
            listed = await sessions(cluster_url)
            assert listed[viewer.session]["replica"]["node"] == "127.0.0.1"
        finally:
            await viewer.close()

    run(scenario())


@pytest.mark.slow
def test_sessions_scale_the_replicas_up(cluster_url):
    """Autoscaling on sessions per replica: from 1 replica, target 1 session each, two sessions make Serve add a
    second replica (the application is redeployed so)."""
    settings = ServerSettings(model="tiny", device="cpu", steps=2, record_max_seconds=0, grace=1.0)
    cluster = ClusterSettings(replicas=1, min_replicas=1, max_replicas=2, target_sessions=1, upscale_delay_s=1,
                              cpus_per_replica=0, media_host="127.0.0.1")
    serve.run(build(settings, cluster), name=APP_NAME, route_prefix="/")

    def running_replicas() -> int:
        status = serve.status().applications[APP_NAME].deployments["generation"]
        return status.replica_states.get("RUNNING", 0)

    async def scenario() -> int:
        first, second = StreamClient(cluster_url), StreamClient(cluster_url)
        try:
            assert running_replicas() == 1
            await first.connect()
            await second.connect()
            deadline = time.monotonic() + 120
            while running_replicas() < 2 and time.monotonic() < deadline:
                await asyncio.sleep(1)
            return running_replicas()
        finally:
            await asyncio.gather(first.close(), second.close())

    assert run(scenario()) == 2
