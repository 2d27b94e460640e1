"""HTTP connections held to account: how many, from whom, how slowly, and what is said about broken ones.

aiohttp accepts every connection, waits for headers and bodies as long as the client likes and keeps an idle
connection for an hour; 250 idle connections under a 256-descriptor limit made the server unusable. So the
server listens through :class:`GuardedSite`, whose protocol (:class:`GuardedProtocol`) wraps aiohttp's:

* at most ``max_connections`` open at once, and ``max_per_client`` from one address (trusted proxies are
  exempt from the latter). A connection over the per-address cap gets a 503 and is closed before anything
  is read. At the total cap a new connection takes the place of the oldest one still waiting for its
  request's headers (idle connections cannot lock others out), and is refused only if there is none;
* a request's headers must arrive within ``header_timeout`` of its first byte (of the connection, for the
  first one), its body within ``body_timeout`` of the headers; otherwise the connection is closed;
* idle keep-alive connections close after ``keepalive_timeout`` (aiohttp's own timer, set short).

:class:`QuietRequestHandler` is aiohttp's handler with its error answer replaced: a malformed or oversized
request, or an upload cut off, is the client's fault: one rate-limited line (:class:`~.logs.RejectionLog`),
no traceback, and an answer that never echoes the request line (which may carry ``?token=``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from framepack_rt.stream.logs import CLIENT_FAULTS, RejectionLog
from framepack_rt.stream.security import SERVER_NAME

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # the page and the API never send more; aiohttp's own per-line limit is 8190
RESERVED_DESCRIPTORS = 0.5  # the share of the descriptor limit kept for WebRTC sockets, files, the model


@dataclass(frozen=True)
class ConnectionLimits:
    """Caps and deadlines of HTTP connections (defaults mirrored in options.CONNECTION_DEFAULTS for --help)."""

    max_connections: int = 256
    max_per_client: int = 32
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_client < 1:
            raise ValueError("--max-connections and --max-connections-per-client: must be at least 1")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive number of seconds")

    def within_descriptors(self) -> "ConnectionLimits":
        """These limits, with ``max_connections`` lowered to fit the process's descriptor limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self
        fits = max(1, int(soft * (1 - RESERVED_DESCRIPTORS)))
        if self.max_connections <= fits:
            return self
        log.warning("--max-connections %d lowered to %d: the descriptor limit is %d (ulimit -n), and WebRTC "
                    "needs the rest", self.max_connections, fits, soft)
        return ConnectionLimits(fits, min(self.max_per_client, fits), self.header_timeout, self.body_timeout,
                                self.keepalive_timeout)


def raw_error(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error answer, for connections refused before aiohttp sees them."""
    body = json.dumps({"error": message}).encode()
    retry = f"Retry-After: {retry_after}\r\n" if retry_after else ""
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\nServer: {SERVER_NAME}\r\n{retry}\r\n")
    return head.encode() + body


class ConnectionGuard:
    """Counts open connections, in total and per address, and reports what it refuses."""

    def __init__(self, limits: ConnectionLimits, rejections: RejectionLog, exempt: tuple[str, ...] = ()) -> None:
        self.limits = limits
        self.rejections = rejections
        self.exempt = frozenset(exempt)
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.waiting: dict[GuardedProtocol, None] = {}  # connections waiting for headers, oldest first

    def admit(self, client: str) -> str | None:
        """Count a new connection from ``client``; or the reason it is refused (then nothing is counted)."""
        held = self.per_client.get(client, 0)
        if held >= self.limits.max_per_client and client not in self.exempt:
            return "client connection cap"
        if self.total >= self.limits.max_connections:
            if not self.waiting:
                return "connection cap"
            oldest = next(iter(self.waiting))
            oldest.evict()  # released at once: its place is this connection's
        self.total += 1
        self.per_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        left = self.per_client.get(client, 1) - 1
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol behind the connection caps and the header and body deadlines.

    It follows the requests on the connection from the bytes alone (where the headers end, Content-Length,
    chunked bodies) to know which deadline applies; aiohttp parses them for real.
    """

    def __init__(self, guard: ConnectionGuard, make_inner: Callable[[], asyncio.Protocol]) -> None:
        self.guard = guard
        self._make_inner = make_inner
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self._timer: asyncio.TimerHandle | None = None
        self._state = "head"  # head (awaiting headers) | body | chunked | idle (between requests)
        self._head = bytearray()
        self._remaining = 0  # body bytes still to come
        self._tail = b""  # the end of a chunked body so far (to find its terminator across reads)
        self._requests = 0
        self._counted = False  # holds a place in the guard's counts

    # -- asyncio.Protocol ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        refused = self.guard.admit(self.client)
        if refused is not None:
            self.guard.rejections.reject(refused, self.client)
            transport.write(raw_error(503, "Service Unavailable", "too many connections (from your address, or "
                                      "in all); try again in a moment", retry_after=5))  # type: ignore[attr-defined]
            transport.close()
            return
        self._counted = True
        self.inner = self._make_inner()
        self.inner.connection_made(transport)
        self._wait_for_headers()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if not self._follow(data):
            return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._uncount()
        if self.inner is not None:
            self.inner.connection_lost(exc)
            self.inner = None

    def _uncount(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._counted:
            self._counted = False
            self.guard.release(self.client)

    def evict(self) -> None:
        """Give this connection's place to a new one: it was waiting for headers at the total cap."""
        self._uncount()
        self._close("evicted at the connection cap", None)

    def _wait_for_headers(self) -> None:
        self._state = "head"
        self.guard.waiting[self] = None
        self._arm(self.guard.limits.header_timeout, "header timeout")

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- following the requests ------------------------------------------------------------------------------
    def _follow(self, data: bytes) -> bool:
        """Advance the request state over ``data``; False if the connection was closed for it."""
        view = memoryview(data)
        while len(view):
            if self._state == "idle":
                self._wait_for_headers()
            if self._state == "head":
                start = max(0, len(self._head) - 3)
                self._head += view
                end = self._head.find(b"\r\n\r\n", start)
                if end < 0:
                    if len(self._head) > MAX_HEADER_BYTES:
                        self._close("headers too large", raw_error(431, "Request Header Fields Too Large",
                                                                   "request headers too large"))
                        return False
                    return True
                rest = len(self._head) - (end + 4)
                self.guard.waiting.pop(self, None)
                self._start_body(bytes(self._head[:end]))
                self._head = bytearray()
                view = view[len(view) - rest:]
            elif self._state == "body":
                taken = min(self._remaining, len(view))
                self._remaining -= taken
                view = view[taken:]
                if self._remaining == 0:
                    self._request_done()
            else:  # chunked: look for the last chunk (0 CRLF CRLF), also across reads
                seen = self._tail + bytes(view)
                end = seen.find(b"\r\n0\r\n\r\n")
                if end < 0:
                    self._tail = seen[-7:]
                    return True
                consumed = end + 7 - len(self._tail)
                self._tail = b""
                view = view[consumed:]
                self._request_done()
        return True

    def _start_body(self, head: bytes) -> None:
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            self._state, self._tail = "chunked", b"\r\n"  # the terminator may follow the headers at once
        elif length > 0:
            self._state, self._remaining = "body", length
        else:
            self._request_done()
            return
        self._arm(self.guard.limits.body_timeout, "body timeout")

    def _request_done(self) -> None:
        self._requests += 1
        self._state = "idle"
        self._disarm()  # between requests aiohttp's keep-alive timer closes an idle connection

    # -- deadlines -------------------------------------------------------------------------------------------
    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, reason: str) -> None:
        self._timer = None
        # A 408 only where no answer can be in flight on this connection (before its first request is in).
        answer = raw_error(408, "Request Timeout", f"request too slow ({reason})") if (
            self._state == "head" and self._requests == 0) else None
        self._close(reason, answer)

    def _close(self, reason: str, answer: bytes | None) -> None:
        self.guard.rejections.reject(reason, self.client)
        if self.transport is None or self.transport.is_closing():
            return
        if answer is not None:
            self.transport.write(answer)
            self.transport.close()
        else:
            self.transport.abort()


class QuietRequestHandler(RequestHandler):
    """aiohttp's RequestHandler whose error answers are JSON, name no versions and quote nothing the client
    sent; client faults are one rejection line, server faults keep aiohttp's traceback."""

    rejections: RejectionLog  # set by the factory

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500 and not isinstance(exc, CLIENT_FAULTS):
            response = super().handle_error(request, status, exc, message)
            response.headers["Server"] = SERVER_NAME
            return response
        reason = _fault(exc, status)
        self.rejections.reject(reason, str(getattr(request, "remote", "") or ""))
        if request.writer.output_size > 0:  # an answer was begun: the connection can only be dropped
            raise ConnectionError("the client went away during the answer")
        response = web.json_response({"error": f"{reason}; send a well-formed HTTP/1.1 request"},
                                     status=400 if status == 500 else status)
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


def _fault(exc: BaseException | None, status: int) -> str:
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "aborted request"
    name = type(exc).__name__ if exc is not None else ""
    if name == "LineTooLong":
        return "request line or header too long"
    if status == 504:
        return "request timeout"
    return "malformed request"


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard` to a :class:`QuietRequestHandler`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard,
                 handler_kwargs: dict[str, Any], backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self.host, self.port, self.guard = host, port, guard
        self._handler_kwargs = handler_kwargs

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _inner(self) -> asyncio.Protocol:
        handler = QuietRequestHandler(self._runner.server, loop=asyncio.get_running_loop(), **self._handler_kwargs)
        handler.rejections = self.guard.rejections
        return handler

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: GuardedProtocol(self.guard, self._inner), self.host,
                                                self.port, backlog=self._backlog, reuse_address=True)
