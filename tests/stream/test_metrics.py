"""GET /metrics: Prometheus' text format, behind the token, counting what a live session did."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.metrics import device_memory

TOKEN = "metrics-token-0123456789"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_a_live_session_and_need_the_token(run_with_server, synthetic_pipe):
    async def scenario(server, url):
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "metrics") as resp:
                stranger = resp.status
        client = StreamClient(url, token=TOKEN)
        try:
            await client.connect()
            await client.wait_frames(30, timeout=20)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                async with http.get(url + "metrics") as resp:
                    return stranger, resp.status, resp.headers["Content-Type"], await resp.text(), len(client.frames)
        finally:
            await client.close()

    stranger, status, content_type, text, received = run_with_server(synthetic_pipe, scenario, token=TOKEN)
    got = samples(text)
    assert stranger == 401 and status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert got[("framepack_rt_sessions", ())] == 1 and got[("framepack_rt_viewers", ())] == 1
    assert got[("framepack_rt_http_connections", ())] >= 1
    assert got[("framepack_rt_frames_generated_total", ())] >= 30
    sent, generated = got[("framepack_rt_frames_sent_total", ())], got[("framepack_rt_frames_generated_total", ())]
    assert received <= sent <= generated + 2
    assert got[("framepack_rt_section_seconds_count", ())] >= 5  # 6 frames a section
    assert got[("framepack_rt_rejected_requests_total", (("reason", "unauthorized"),))] == 1
    assert got[("process_resident_memory_bytes", ())] > 0
    # A second server in the same process counts from zero: its registry is its own.
    fresh = run_with_server(synthetic_pipe, lambda server, url: _scrape(url))
    assert samples(fresh)[("framepack_rt_frames_generated_total", ())] == 0


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "metrics") as resp:
        return await resp.text()


def test_device_memory_reads_cuda_only_through_an_imported_torch():
    cuda = SimpleNamespace(is_available=lambda: True, memory_allocated=lambda d: 3 * 2**30,
                           memory_reserved=lambda d: 4 * 2**30)
    fake_torch = SimpleNamespace(cuda=cuda)
    assert device_memory("cuda:0", fake_torch) == {"allocated": 3 * 2**30, "reserved": 4 * 2**30}
    assert device_memory("cpu", fake_torch) == {}
    no_gpu = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    assert device_memory("cuda", no_gpu) == {}
