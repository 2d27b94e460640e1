"""One viewer of a session: its peer connection, role, message budget, and the checks that find it gone.

A viewer can vanish without a goodbye (a killed browser, a dropped network): then nothing closes its peer
connection for about 30 s (ICE consent freshness). Receivers send RTCP receiver reports about once a second
for as long as they are alive, so :meth:`Viewer.check` drops a viewer whose reports stopped well before
that; and one whose connection never came up, or whose control channel stopped draining.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from aiortc import RTCPeerConnection
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError

from framepack_rt.stream import control
from framepack_rt.stream.limits import RateLimiter, SessionPolicy

log = logging.getLogger(__name__)

# Messages a congested viewer may miss (the next one supersedes them); acks, sections and errors always go.
DROPPABLE = frozenset({"progress", "preview", "stats"})
MAX_CHANNEL_BACKLOG = 256 * 1024  # bytes queued on a data channel before droppable messages are skipped
STALLED_BACKLOG = 4 * MAX_CHANNEL_BACKLOG  # a viewer this far behind is not reading: it is dropped
# What aiortc raised when fed malformed offers (found by fuzzing its SDP handling; it is not uniform), and
# what closing a half-negotiated connection can raise. Any of them means "this offer cannot be answered".
SDP_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, AssertionError, RuntimeError,
              InternalError, InvalidAccessError, InvalidStateError, OperationError)


@dataclass
class Viewer:
    """One browser or client watching a session. ``role`` is "control" or "view" (see security.py)."""

    pc: RTCPeerConnection
    role: str
    policy: SessionPolicy
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    channel: Any = None  # the "control" RTCDataChannel once the client opens it
    sender: Any = None  # the RTCRtpSender of the video: its stats carry the viewer's receiver reports
    track: Any = None  # the relay proxy this viewer is sent
    joined: float = field(default_factory=time.time)
    since: float = field(default_factory=time.monotonic)  # joined, on the monotonic clock
    connected_at: float | None = None  # time.time() when the connection came up
    stalled: bool = False  # the control channel stopped draining
    settled: Callable[[], None] = field(default=lambda: None, repr=False)  # called when connected or gone
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.policy.message_rate, self.policy.message_burst)

    def send(self, message: dict[str, Any]) -> bool:
        """Send if the control channel is open; skip droppable messages while the channel is backed up."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        backlog = channel.bufferedAmount
        if backlog > STALLED_BACKLOG:
            self.stalled = True  # the session's next check drops this viewer
            return False
        if message.get("type") in DROPPABLE and backlog > MAX_CHANNEL_BACKLOG:
            return False
        channel.send(control.encode(message))
        return True

    async def check(self) -> str | None:
        """Why this viewer should be dropped now, or None if it is fine."""
        if self.stalled:
            return "its control channel stopped draining"
        if self.connected_at is None:
            if time.monotonic() - self.since > self.policy.connect_timeout:
                return f"its connection did not come up within {self.policy.connect_timeout:g} s"
            return None
        last = max(self.connected_at, await self._last_report())
        if time.time() - last > self.policy.viewer_timeout:
            return f"no receiver report for {self.policy.viewer_timeout:g} s (it vanished)"
        return None

    async def _last_report(self) -> float:
        """time.time() of the latest RTCP receiver report for our video, 0 if none arrived yet."""
        if self.sender is None:
            return 0.0
        try:
            report = await self.sender.getStats()
        except AttributeError:  # the sender's transport is gone (closing) or was never negotiated
            return 0.0
        stamps = [s.timestamp.timestamp() for s in report.values() if s.type == "remote-inbound-rtp"]
        return max(stamps, default=0.0)

    async def close(self) -> None:
        """Stop this viewer's proxy track and its peer connection; never raises."""
        if self.track is not None:
            self.track.stop()  # detaches it from the relay at once, whatever the connection does
        try:
            await self.pc.close()
        except SDP_ERRORS as exc:  # aiortc trips over its own half-negotiated state on close
            log.debug("closing viewer %s: %s", self.id, exc)
