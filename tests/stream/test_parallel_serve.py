"""``framepack-rt serve --sequence-parallel 2`` on the CPU (gloo, the tiny model): rank 0 serves, the other
worker follows its transformer calls. A viewer receives frames through it; then the follower is killed, the
session ends with an error sent to its viewer, and the server exits with the error, no worker left behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from framepack_rt.stream.client import StreamClient

START_TIMEOUT = 240  # two processes import torch and load the model; about 60 s on a loaded 2-core machine
FRAMES_TIMEOUT = 120
ERROR_WITHIN_S = 30  # the kill noticed (a failed collective or the keepalive) and the viewer told
EXIT_WITHIN_S = 60  # the server stops 3 s after the world broke; the launcher then collects the workers


def worker_pids(lines: list[str], timeout: float) -> dict[int, int]:
    """{rank: pid} from the lines each worker prints once loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(lines)
        pids = {0: m.group(1) for m in re.finditer(r"rank 0 \(pid (\d+)\) serves", text)}
        pids.update({int(m.group(1)): m.group(2) for m in re.finditer(r"worker (\d+) of 2 \(pid (\d+)\) follows", text)})
        if len(pids) == 2:
            return {rank: int(pid) for rank, pid in pids.items()}
        time.sleep(0.2)
    pytest.fail("the workers did not report their pids:\n" + "".join(lines))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker states from /proc (Linux)")
@pytest.mark.slow  # 30 s; CI trim: the worker launch runs by default in test_parallel_cli
def test_serve_on_two_workers_streams_and_a_dead_worker_ends_the_session_with_an_error(launch_serve):
    proc, url, lines = launch_serve("--model", "tiny", "--device", "cpu", "--sequence-parallel", "2", "--steps", "4",
                                    "--parallel-timeout", "20", "--record-max-seconds", "0", timeout=START_TIMEOUT)
    pids = worker_pids(lines, 60)
    try:
        async def watch_then_kill() -> tuple[int, dict, float]:
            client = StreamClient(url)
            try:
                await client.connect()
                frames = await client.wait_frames(45, timeout=FRAMES_TIMEOUT)
                # Two sections generated through both workers (frames alone may be the held placeholder).
                await client.wait_for(lambda m: m.get("type") == "section" and m["index"] >= 1, timeout=FRAMES_TIMEOUT)
                # Kill the follower while a section samples (a progress message: a step has just run).
                await client.wait_for("progress", timeout=30, since=len(client.messages))
                os.kill(pids[1], signal.SIGKILL)
                killed = time.monotonic()
                error = await client.wait_for(lambda m: m.get("type") == "error", timeout=ERROR_WITHIN_S)
                return frames, error, time.monotonic() - killed
            finally:
                await client.close()

        frames, error, error_after = asyncio.run(watch_then_kill())
        code = proc.wait(timeout=EXIT_WITHIN_S)
        output = "".join(lines)
        print(f"\n{frames} frames through 2 workers; the viewer got the error {error_after:.2f} s after the kill; "
              f"exit code {code}\nthe viewer's error: {error['message']}\nthe command's last lines:\n"
              + "".join(lines[-4:]))
        assert frames >= 45
        assert "generation failed" in error["message"] and "worker" in error["message"], error
        assert error_after < ERROR_WITHIN_S
        assert code == 1, output[-3000:]
        assert "worker 1 of 2 died" in output, output[-3000:]
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids.values()), f"workers left running: {pids}"
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
