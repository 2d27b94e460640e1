"""HTTP connections from hostile clients: idle ones by the hundred, headers and bodies trickled in, keep-alive
held open, a process with 256 descriptors. Every client is a loopback address (127.0.0.0/8 is all loopback
on Linux, so 127.0.0.2 and 127.0.0.10 are different 'clients' of a server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest


async def open_idle(url: str, source: str, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = url.split("//")[1].strip("/").split(":")
    return [await asyncio.open_connection(host, int(port), local_addr=(source, 0)) for _ in range(count)]


async def probe(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], wait: float = 0.05) -> tuple[bool, bytes]:
    """(still open, what the server sent): open if it has neither answered nor closed within ``wait``."""
    try:
        first = await asyncio.wait_for(conn[0].read(1), wait)
    except asyncio.TimeoutError:
        return True, b""
    except ConnectionError:
        return False, b""
    return False, first + await answer_of(conn, 1.0)


async def answer_of(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], timeout: float = 5.0) -> bytes:
    try:
        return await asyncio.wait_for(conn[0].read(), timeout)
    except ConnectionError:
        return b""


async def timed_health(url: str, source: str) -> tuple[int, float]:
    began = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as http:
        async with http.get(url + "api/health") as resp:
            await resp.read()
            return resp.status, time.monotonic() - began


def close_all(conns) -> None:
    for _, writer in conns:
        writer.close()


def test_connection_caps_hold_and_health_stays_fast(run_with_server, synthetic_pipe):
    async def scenario(server, url):
        one = await open_idle(url, "127.0.0.1", 25)  # one address: 10 kept, 15 refused at once
        await asyncio.sleep(0.2)
        probes = [await probe(c) for c in one]
        kept = [is_open for is_open, _ in probes]
        refused = [answer for is_open, answer in probes if not is_open]
        health_one = await timed_health(url, "127.0.0.2")
        many = []
        for i in range(6):  # six addresses x 10: twice the total cap of 30
            many += await open_idle(url, f"127.0.0.{10 + i}", 10)
        await asyncio.sleep(0.2)
        open_now = server.connections.total
        health_many = await timed_health(url, "127.0.0.3")  # takes the place of the oldest idle connection
        close_all(one + many)
        return kept.count(True), refused, health_one, open_now, health_many

    kept, refused, health_one, open_now, health_many = run_with_server(
        synthetic_pipe, scenario, max_connections=30, max_connections_per_client=10, header_timeout=30)
    print(f"\nconnection caps: one address kept {kept} of 25; /api/health {health_one[1] * 1000:.1f} ms beside "
          f"it, {health_many[1] * 1000:.1f} ms with the total cap full ({open_now} open)")
    assert kept == 10 and len(refused) == 15
    assert all(r.startswith(b"HTTP/1.1 503") and b"too many connections" in r for r in refused)
    assert health_one[0] == 200 and health_one[1] < 0.5
    assert open_now <= 30
    assert health_many[0] == 200 and health_many[1] < 0.5


def test_slow_headers_slow_bodies_and_idle_keepalive_are_cut_off(run_with_server, synthetic_pipe):
    async def scenario(server, url):
        began = time.monotonic()
        silent = (await open_idle(url, "127.0.0.1", 1))[0]  # connects, sends nothing
        silent_answer = await answer_of(silent)
        silent_s = time.monotonic() - began

        trickle = (await open_idle(url, "127.0.0.1", 1))[0]  # one header byte every 0.2 s
        began = time.monotonic()
        request = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        closed_s = None
        for byte in request:
            try:
                trickle[1].write(bytes([byte]))
                await trickle[1].drain()
            except ConnectionError:
                break
            if trickle[0].at_eof() or trickle[1].is_closing():
                break
            try:
                if await asyncio.wait_for(trickle[0].read(1), 0.2) != b"" or trickle[0].at_eof():
                    break
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                break
        closed_s = time.monotonic() - began

        upload = (await open_idle(url, "127.0.0.1", 1))[0]  # headers at once, then the body stops
        upload[1].write(b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100000\r\n\r\n{\"sdp\": \"")
        began = time.monotonic()
        upload_answer = await answer_of(upload)
        upload_s = time.monotonic() - began

        kept = (await open_idle(url, "127.0.0.1", 1))[0]  # a complete request, then an idle keep-alive
        kept[1].write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        began = time.monotonic()
        kept_answer = await answer_of(kept)
        kept_s = time.monotonic() - began
        health = await timed_health(url, "127.0.0.2")
        return silent_answer, silent_s, closed_s, upload_answer, upload_s, kept_answer, kept_s, health, \
            server.connections.total

    (silent_answer, silent_s, trickle_s, upload_answer, upload_s, kept_answer, kept_s, health,
     left) = run_with_server(synthetic_pipe, scenario, header_timeout=1.0, body_timeout=1.5, keepalive_timeout=1.5)
    print(f"\nsilent connection closed after {silent_s:.2f} s, trickled headers after {trickle_s:.2f} s, stalled "
          f"upload after {upload_s:.2f} s, idle keep-alive after {kept_s:.2f} s")
    assert silent_answer.startswith(b"HTTP/1.1 408") and 0.9 < silent_s < 2.0
    assert 0.9 < trickle_s < 2.5
    assert 1.4 < upload_s < 3.0 and b"HTTP/1.1 200" not in upload_answer
    assert kept_answer.startswith(b"HTTP/1.1 200") and 1.4 < kept_s < 3.0
    assert health[0] == 200 and left <= 1  # at most the health check's own connection (closing) is left


@pytest.mark.slow  # 13 s; CI trim
def test_descriptor_limit_of_256_and_250_idle_connections(tmp_path):
    """The attack that took the server down: a 256-descriptor process, 250 idle connections from several
    addresses. The connection cap fits itself under the limit and /api/health still answers at once."""
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
              "from framepack_rt.commands.cli import main\n"
              "sys.exit(main(['serve', '--model', 'tiny', '--port', '0', '--max-connections-per-client', '40']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url, lines = None, []
        began = time.monotonic()
        while url is None and time.monotonic() - began < 120:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "open http://" in line:
                url = line.split("open ")[1].split()[0]
        assert url, "".join(lines)

        async def attack():
            conns = []
            for i in range(7):  # 7 addresses x 36 = 252 idle connections
                conns += await open_idle(url, f"127.0.0.{20 + i}", 36)
            await asyncio.sleep(0.3)
            results = [await timed_health(url, "127.0.0.2") for _ in range(3)]
            close_all(conns)
            return results

        results = asyncio.run(attack())
        assert proc.poll() is None, "".join(lines)
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    print(f"\n256 descriptors, 252 idle connections: /api/health "
          + ", ".join(f"{status} in {s * 1000:.0f} ms" for status, s in results))
    assert all(status == 200 and seconds < 1.0 for status, seconds in results)
    assert "lowered to 128" in "".join(lines) + out
