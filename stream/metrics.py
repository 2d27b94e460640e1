"""``GET /metrics``: the server in Prometheus' text format (prometheus_client), one registry per server.

Exported (all prefixed ``framepack_rt_``):

======================================  =========  ==========================================================
``sessions``                            gauge      sessions open (waiting for a viewer, generating, paused)
``viewers``                             gauge      viewers of all sessions (connected or connecting)
``http_connections``                    gauge      open HTTP connections
``frames_generated_total``              counter    frames the pipeline generated, all sessions
``frames_sent_total``                   counter    frames handed to viewers' encoders (one per viewer)
``section_seconds``                     histogram  the pipeline's time per section (sampling and decode)
``rejected_requests_total{reason}``     counter    requests and connections refused, by reason
``device_memory_bytes{device,kind}``    gauge      CUDA memory allocated / reserved by torch (CUDA only)
``process_*``                           (various)  the process: resident memory, CPU seconds, descriptors
======================================  =========  ==========================================================

The registry belongs to the server (no module-level global registry), so servers in one process (the tests)
never share counts. Counters are thread-safe: the generation thread counts frames and sections itself.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, exposition, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

PREFIX = "framepack_rt"
# Section times: a tiny model on a CPU takes tens of ms, the 13B on one GPU seconds, in low-VRAM mode more.
SECTION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# generate_latest() writes the classic text format, which every Prometheus reads as version 0.0.4.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)


def device_memory(device: str, torch: Any = None) -> dict[str, int]:
    """{"allocated": bytes, "reserved": bytes} for a CUDA device, {} otherwise. Reads torch only if it is
    already imported (a server always has it; this never imports or initialises CUDA itself)."""
    torch = torch if torch is not None else sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return {}
    cuda = torch.cuda
    return {"allocated": int(cuda.memory_allocated(device)), "reserved": int(cuda.memory_reserved(device))}


class _Live:
    """Gauges read at scrape time from the server's state (nothing to keep in step)."""

    def __init__(self, sessions: Callable[[], int], viewers: Callable[[], int], connections: Callable[[], int],
                 device: str) -> None:
        self.sessions, self.viewers, self.connections, self.device = sessions, viewers, connections, device

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_sessions", "Sessions open (waiting for a viewer, generating, paused)",
                                value=self.sessions())
        yield GaugeMetricFamily(f"{PREFIX}_viewers", "Viewers of all sessions, connected or connecting",
                                value=self.viewers())
        yield GaugeMetricFamily(f"{PREFIX}_http_connections", "Open HTTP connections", value=self.connections())
        memory = GaugeMetricFamily(f"{PREFIX}_device_memory_bytes", "Device memory held by torch (CUDA only)",
                                   labels=["device", "kind"])
        for kind, value in device_memory(self.device).items():
            memory.add_metric([self.device, kind], value)
        yield memory


class ServerMetrics:
    """The counters a server keeps, and its registry. ``sessions``/``viewers``/``connections`` are read at
    each scrape."""

    def __init__(self, sessions: Callable[[], int], viewers: Callable[[], int], connections: Callable[[], int],
                 device: str = "cpu") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.frames_generated = Counter(f"{PREFIX}_frames_generated", "Frames generated, all sessions",
                                        registry=self.registry)
        self.frames_sent = Counter(f"{PREFIX}_frames_sent", "Frames handed to viewers' encoders (one per viewer)",
                                   registry=self.registry)
        self.section_seconds = Histogram(f"{PREFIX}_section_seconds", "Pipeline time per section (sample + decode)",
                                         buckets=SECTION_BUCKETS, registry=self.registry)
        self.rejected = Counter(f"{PREFIX}_rejected_requests", "Requests and connections refused, by reason",
                                ["reason"], registry=self.registry)
        self.registry.register(_Live(sessions, viewers, connections, device))
        ProcessCollector(registry=self.registry)

    def section(self, frames: int, seconds: float) -> None:
        """One section generated (called on the generation thread)."""
        self.frames_generated.inc(frames)
        self.section_seconds.observe(seconds)

    def frame_sent(self) -> None:
        self.frames_sent.inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason.replace(" ", "_")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
