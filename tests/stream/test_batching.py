"""The batching device worker (stream/batching.py) with the real tiny pipeline: fairness, batched decode equal to
solo, join/leave, the serve flags, and two WebRTC sessions served with batching on."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from framepack_rt.commands.cli import build_parser
from framepack_rt.pipeline.batching import StreamBatch
from framepack_rt.stream import options
from framepack_rt.stream.batching import BatchingWorker
from framepack_rt.stream.buffer import FrameBuffer
from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.generation import DeviceWorker, Generation
from framepack_rt.stream.images import default_scene
from framepack_rt.stream.server import ServerSettings, StreamServer

STEPS = 2


@pytest.fixture(scope="module")
def pipe(stream_pipe):
    return stream_pipe


def test_batched_streams_equal_solo_streams(pipe):
    """Three streams (other seeds, prompts and step counts; one joins a round later) stepped together and
    decoded in one VAE batch give the frames each gives alone (uint8: at most 1 level of rounding)."""
    specs = [("a red ball", 1, 2), ("a blue square moves", 2, 3), ("green", 3, 2)]
    solo = []
    for prompt, seed, steps in specs:
        stream = pipe.stream(default_scene(), prompt, seed=seed, steps=steps, decode_overlap=False)
        solo.append([next(stream).frames for _ in range(2)])
    streams = [pipe.stream(default_scene(), p, seed=s, steps=n, decode_overlap=False) for p, s, n in specs]
    batch = StreamBatch(max_batch=8)
    got: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for tick in range(20):
        for i, stream in enumerate(streams):
            if (i < 2 or tick > 0) and len(got[i]) < 2:
                batch.join(stream)
        for stream, outcome in batch.step():
            assert not isinstance(outcome, BaseException), outcome
            got[streams.index(stream)].append(outcome.frames)
        if all(len(v) == 2 for v in got.values()):
            break
    for i in range(3):
        for expect, frames in zip(solo[i], got[i], strict=True):
            assert expect.shape == frames.shape
            assert np.abs(expect.astype(int) - frames.astype(int)).max() <= 1, i


def _drain(buffers: list[FrameBuffer], stop: threading.Event) -> None:
    while not stop.is_set():
        for b in buffers:
            while b.get_nowait() is not None:
                pass
        time.sleep(0.005)


def _run_sessions(worker, pipe, n: int, sections: int, timeout: float) -> list[list[tuple[float, int]]]:
    """n sessions on ``worker`` until each has ``sections`` sections; per session (arrival time, frames) each."""
    jobs, buffers, arrivals = [], [], [[] for _ in range(n)]
    for i in range(n):
        buffer = FrameBuffer(400, on_space=worker.wake)
        job = Generation(buffer, lambda m: None,
                         on_section=lambda count, _s, mine=arrivals[i]: mine.append((time.monotonic(), count)))
        job.attach(pipe.stream(default_scene(), f"prompt {i}", seed=i, steps=STEPS, decode_overlap=False))
        jobs.append(job)
        buffers.append(buffer)
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(buffers, stop), daemon=True)
    drainer.start()
    try:
        for job in jobs:
            worker.add(job)
        deadline = time.monotonic() + timeout
        while min(len(a) for a in arrivals) < sections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(job.error for job in jobs), [job.error for job in jobs]
    finally:
        for job in jobs:
            worker.remove(job)
            job.buffer.close()
        worker.close(10)
        stop.set()
        drainer.join(5)
    return arrivals


def test_four_sessions_are_served_fairly(pipe):
    """4 sessions at equal settings: each one's generated frames/s (after its first section) within 15% of the
    others'. Frames a second, not totals: sessions that joined a round apart are a section apart at any moment."""
    worker = BatchingWorker("cpu", max_batch=8)
    arrivals = _run_sessions(worker, pipe, 4, sections=3, timeout=150)
    assert min(len(a) for a in arrivals) >= 3, [len(a) for a in arrivals]
    rates = [sum(n for _, n in a[1:3]) / (a[2][0] - a[0][0]) for a in arrivals]
    assert max(rates) <= 1.15 * min(rates), rates
    assert worker.rounds > 0


def test_worker_leaves_a_removed_session_and_round_robin_stays(pipe):
    """A session removed mid-section leaves the batch (its section abandoned, nothing in flight); the other goes
    on. --batching off keeps the round-robin DeviceWorker."""
    worker = BatchingWorker("cpu")
    a, b = (Generation(FrameBuffer(400, on_space=worker.wake), lambda m: None) for _ in range(2))
    a.attach(pipe.stream(default_scene(), "a", seed=1, steps=8, decode_overlap=False))
    b.attach(pipe.stream(default_scene(), "b", seed=2, steps=8, decode_overlap=False))
    worker.add(a)
    worker.add(b)
    try:
        deadline = time.monotonic() + 20
        while worker.rounds < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.remove(a)
        rounds = worker.rounds
        while worker.rounds < rounds + 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not a.busy
        assert a.stream.set_prompt("next") == a.stream.sections_done  # a's section is no longer in flight
        while b.frames == 0 and time.monotonic() < deadline:  # b's frames come from the decode thread
            time.sleep(0.01)
        assert b.frames > 0
    finally:
        for job in (a, b):
            job.buffer.close()
        assert worker.close(10)
    server = StreamServer(pipe, ServerSettings(batching=False))
    assert isinstance(server.worker, DeviceWorker)
    server.worker.close(5)
    server.executor.shutdown()


def test_serve_flags():
    parser = build_parser()
    args = parser.parse_args(["serve", "--batching", "off", "--max-batch", "3"])
    kwargs = options.settings_kwargs(args)
    assert kwargs["batching"] is False and kwargs["max_batch"] == 3
    settings = ServerSettings(**kwargs)
    assert settings.batching is False and settings.max_batch == 3
    assert ServerSettings().batching is True  # on by default
    assert "batching" not in options.settings_kwargs(parser.parse_args(["serve"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-batch", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--batching", "maybe"])


def test_two_sessions_stream_with_batching_on(pipe, run_with_server):
    """Two viewers start two sessions on one server with batching on: both get frames and sections."""

    async def scenario(server, url):
        assert isinstance(server.worker, BatchingWorker)
        first, second = StreamClient(url), StreamClient(url)
        try:
            a = await first.connect(prompt="a red ball", seed=1)
            b = await second.connect(prompt="a blue ball", seed=2)
            await asyncio.gather(first.wait_frames(30, timeout=30), second.wait_frames(30, timeout=30))
            sections = await asyncio.gather(first.wait_for("section", timeout=15),
                                            second.wait_for("section", timeout=15))
            return a, b, sections, server.worker.rounds
        finally:
            await asyncio.gather(first.close(), second.close())

    a, b, sections, rounds = run_with_server(pipe, scenario, timeout=90, batching=True)
    assert a != b
    assert all(s["type"] == "section" for s in sections)
    assert rounds > 0
