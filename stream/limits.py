"""Limits that keep one server usable by many strangers: per-session policy, capacity errors, a rate limiter.

Status-code rule (the HTTP side maps these exceptions; see :mod:`.server`):

* :class:`TooLarge` (a :class:`ValueError`) -> **413**: too many bytes (a body, a start image);
* any other ``ValueError`` -> **400**: the request itself is malformed or out of range;
* :class:`LimitExceeded` -> **429** with ``Retry-After``: the request is fine but the server is at one of its
  configured capacities (sessions, viewers per session); retrying later can succeed.

5xx is reserved for faults of the server itself, so a client never sees one for anything it sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable


MAX_SESSIONS = 4  # sessions generating at once share one device: each more slows all of them
MAX_IMAGE_BYTES = 12 * 2**20  # a phone photo fits
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded, that is 48 MB of RGB
MAX_SESSIONS_PER_CLIENT = 2  # one address cannot take every session slot
MAX_PENDING_PER_CLIENT = 16  # offers answered whose connection is not up yet, per address
CONTROL_SLOTS = 2  # with a token: places of each session that view-key viewers cannot take


class TooLarge(ValueError):
    """Input over a size limit in bytes: answered with 413."""


class LimitExceeded(Exception):
    """The server is at a configured capacity: answered with 429 and ``Retry-After``."""

    def __init__(self, message: str, retry_after: int = 10) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SessionPolicy:
    """How long sessions and viewers may linger, how many viewers a session takes, how fast they may talk.

    Times are seconds. ``grace``: a session without viewers stops generating at once and is closed after this
    long (a viewer joining meanwhile resumes it). ``idle_timeout``: a session that generates nothing (paused,
    stopped, finished or failed) is closed after this long, so it cannot hold a slot forever.
    ``connect_timeout``: a viewer whose connection is not up by then is dropped (an offer that never
    connects must not hold a viewer slot). ``viewer_timeout``: a connected viewer from which no RTCP
    receiver report arrived for this long has vanished (receivers report about once a second) and is
    dropped. ``message_rate`` / ``message_burst``: control messages per second per viewer, and how many may
    come at once.
    """

    max_viewers: int = 8
    grace: float = 30.0
    idle_timeout: float = 300.0
    connect_timeout: float = 20.0
    viewer_timeout: float = 10.0
    message_rate: float = 20.0
    message_burst: int = 40
    max_prompt_chars: int = 4000

    def __post_init__(self) -> None:
        if self.max_viewers < 1:
            raise ValueError(f"--max-viewers {self.max_viewers}: must be at least 1")
        for name in ("grace", "idle_timeout", "connect_timeout", "viewer_timeout", "message_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive number of seconds"
                                 if name != "message_rate" else f"--message-rate {value}: must be positive")
        if self.message_burst < 1:
            raise ValueError(f"message burst {self.message_burst}: must be at least 1")
        if self.max_prompt_chars < 1:
            raise ValueError(f"--max-prompt-chars {self.max_prompt_chars}: must be at least 1")


class RateLimiter:
    """A token bucket (``rate`` per second, ``burst`` deep) that also says when to warn about dropping.

    ``check()`` returns ``"ok"`` (act on the message), ``"warn"`` (drop it and tell the sender, at most once
    per ``warn_interval``) or ``"drop"`` (drop it silently): a flood costs one reply per interval, not one
    per message.
    """

    def __init__(self, rate: float, burst: int, warn_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.warn_interval = rate, burst, warn_interval
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._last_warning = -math.inf
        self.dropped = 0

    def check(self) -> str:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return "ok"
        self.dropped += 1
        if now - self._last_warning >= self.warn_interval:
            self._last_warning = now
            return "warn"
        return "drop"


class Reservations:
    """Places held by work in progress (sessions being built), so that concurrent requests that each pass a
    capacity check cannot together overshoot it. ``take()`` returns an idempotent release function."""

    def __init__(self) -> None:
        self.count = 0

    def take(self) -> Callable[[], None]:
        self.count += 1
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.count -= 1

        return release


class PerClient:
    """Places held per client address (sessions it started, offers not yet connected), at most ``limit`` each.

    ``take(client)`` raises :class:`LimitExceeded` at the limit, else returns an idempotent release function.
    Addresses holding nothing are forgotten, so the table is as large as the places held, never larger.
    """

    def __init__(self, limit: int, what: str, retry_after: int = 10) -> None:
        self.limit, self.what, self.retry_after = limit, what, retry_after
        self.held: dict[str, int] = {}

    def take(self, client: str) -> Callable[[], None]:
        count = self.held.get(client, 0)
        if count >= self.limit:
            raise LimitExceeded(f"your address already has {self.limit} {self.what} (the most one client may "
                                "have); try again when one ends", self.retry_after)
        self.held[client] = count + 1
        taken = [True]

        def release() -> None:
            if taken[0]:
                taken[0] = False
                left = self.held.get(client, 1) - 1
                if left > 0:
                    self.held[client] = left
                else:
                    self.held.pop(client, None)

        return release
