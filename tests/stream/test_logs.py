"""What `framepack-rt serve` writes to its log under a flood of bad requests: a few lines a second, no
traceback, never the token; and one line per session start and end."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess

import pytest

from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.logs import RejectionLog, safe_path

TOKEN = "log-token-5ecr3t-0123456789"


def test_rejection_log_is_rate_limited_and_counts_what_it_leaves_out(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    seen = []
    log = RejectionLog(logging.getLogger("test.rejections"), rate=2, burst=3, on_reject=seen.append,
                       clock=lambda: now[0])
    for _ in range(50):
        log.reject("bad request", "127.0.0.1", f"GET {safe_path('/x?token=' + TOKEN)} 400")
    now[0] = 1.0  # two more lines' worth
    log.reject("not found", "127.0.0.9", "GET /y 404")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and len(seen) == 51 and log.total == 51
    assert "47 more rejections not logged" in lines[-1]
    for _ in range(5):  # a burst with nothing after it: the server's once-a-second flush counts it
        log.reject("bad request", "127.0.0.1")
    log.flush()
    log.flush()  # nothing left out since: no line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and lines[-1] == "4 more rejections not logged"  # one token was left
    assert all(TOKEN not in line and "token" not in line for line in lines)
    assert safe_path("/a\nb\x1b[31m" + "x" * 200).startswith("/a\\nb\\x1b[31m") and len(safe_path("/" + "x" * 500)) < 90


async def _bad_requests(url: str, count: int) -> dict[str, int]:
    """``count`` bad requests of eight kinds, 8 at a time; returns how many of each were answered or cut."""
    host, port = url.split("//")[1].strip("/").split(":")
    kinds = [
        b"GET /?token=" + TOKEN.encode() + b"&x=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # line too long
        b"GET /nothing/here?token=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # 404
        b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"a",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",  # TLS to an HTTP port
        b"POST /offer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-" + TOKEN.encode() +
        b"\r\nContent-Type: application/json\r\nContent-Length: 31\r\nConnection: close\r\n\r\n" +
        b'{"sdp": "v=0", "type": "offer"}',  # a wrong token: 401
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",  # header too long
        b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\n{oops",  # bad JSON
        b"DELETE /api/health?key=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # 405
    ]
    outcome: dict[str, int] = {}
    limit = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        data = kinds[i % len(kinds)]
        async with limit:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(data)
                await writer.drain()
                if i % len(kinds) == 2:  # the aborted upload: hang up mid-body
                    writer.transport.abort()
                    outcome["aborted"] = outcome.get("aborted", 0) + 1
                    return
                status = (await asyncio.wait_for(reader.readline(), 10)).split(b" ")[1:2]
                key = status[0].decode() if status else "closed"
                outcome[key] = outcome.get(key, 0) + 1
            except (ConnectionError, asyncio.TimeoutError):
                outcome["reset"] = outcome.get("reset", 0) + 1
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return outcome


@pytest.mark.slow  # 17 s; CI trim
def test_a_thousand_bad_requests_leave_a_few_kb_of_log_and_no_token(launch_serve):
    env = {**os.environ, "FRAMEPACK_RT_TOKEN": TOKEN}
    proc, url, lines = launch_serve("--model", "tiny", "--steps", "1", "--grace", "1", env=env)
    try:
        start = len(lines)
        outcome = asyncio.run(_bad_requests(url, 1000))

        async def watch():
            client = StreamClient(url, token=TOKEN)
            try:
                session = await client.connect()
                await client.wait_frames(5, timeout=30)
            finally:
                await client.close()
            await asyncio.sleep(3)  # the grace period (1 s) and the next housekeeping tick
            return session

        session = asyncio.run(watch())
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = "".join(lines[start:])
    flood = "".join(line for line in lines[start:] if session not in line)
    print(f"\n1000 bad requests ({outcome}): {len(flood.encode())} bytes of log in {flood.count(chr(10))} lines")
    assert sum(outcome.values()) == 1000 and outcome.get("400", 0) >= 250 and outcome.get("401", 0) >= 100
    assert len(flood.encode()) < 6000  # a few KB, not 79 MB
    assert "Traceback" not in text and TOKEN not in text and "aaaaaaaa" not in text
    assert "more rejections not logged" in flood
    started = [line for line in lines if f"session {session} started" in line]
    ended = [line for line in lines if f"session {session} ended" in line]
    assert len(started) == 1 and len(ended) == 1 and "sections" in ended[0]
