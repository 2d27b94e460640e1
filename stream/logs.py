"""What ``framepack-rt serve`` logs: a few lines an operator can read, never a flood, never a secret.

* :func:`configure_logging` (``--log-level``): one handler on stderr; aioice and aiortc (which log every ICE
  check at INFO) only from WARNING unless the level is DEBUG; aiohttp's access log stays off.
* :class:`RejectionLog`: one line per rejected request (the client's address, the reason, the method and the
  path, never the query string, which may hold ``?token=``), rate-limited: a flood costs a few lines a second
  and the next line says how many were left out.
* :class:`ClientFaultFilter`: a record of aiohttp's server logger about something a client did (a malformed
  or oversized request line, an upload cut off) loses its traceback and exception text, which quote the
  request line; the server's own handler (stream/connections.py) already logs those as rejections.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from aiohttp import http_exceptions

from framepack_rt.stream.limits import RateLimiter

LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("aioice", "aiortc")  # an INFO line per ICE check and state change
MAX_PATH_CHARS = 80
# Exceptions that mean the client sent something broken or went away: never a traceback for these.
CLIENT_FAULTS = (http_exceptions.HttpProcessingError, ConnectionResetError, BrokenPipeError)


def configure_logging(level: str = "info") -> None:
    """Log to stderr at ``level`` (the CLI's --log-level)."""
    if level not in LEVELS:
        raise ValueError(f"--log-level {level!r}: use one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ClientFaultFilter())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class ClientFaultFilter(logging.Filter):
    """Drops the traceback (and the exception text, which may quote the request line) of client faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CLIENT_FAULTS):
            record.exc_info = None
            record.exc_text = None
            record.msg, record.args = "a client's request failed (%s)", (type(exc).__name__,)
        return True


def safe_path(path: str) -> str:
    """A request path fit for a log line: no query string, printable ASCII, at most MAX_PATH_CHARS."""
    path = path.split("?", 1)[0]
    shown = ascii(path)[1:-1]
    return shown if len(shown) <= MAX_PATH_CHARS else shown[:MAX_PATH_CHARS] + "..."


class RejectionLog:
    """One WARNING line per rejected request, at most ``rate`` a second (bursts of ``burst``).

    ``on_reject(reason)`` sees every rejection, logged or not (the metrics count them all).
    """

    def __init__(self, logger: logging.Logger, rate: float = 2.0, burst: int = 10,
                 on_reject: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self._limiter = RateLimiter(rate, burst, clock=clock)
        self._on_reject = on_reject
        self.left_out = 0  # rejections not logged since the last line
        self.total = 0

    def reject(self, reason: str, client: str, what: str = "") -> None:
        """``reason``: a short label (a metrics label too); ``what``: e.g. "POST /offer 400" (no query)."""
        self.total += 1
        if self._on_reject is not None:
            self._on_reject(reason)
        if self._limiter.check() != "ok":
            self.left_out += 1
            return
        more = f" ({self.left_out} more rejections not logged)" if self.left_out else ""
        self.left_out = 0
        self.log.warning("rejected %s from %s%s%s", reason, client or "?", f": {what}" if what else "", more)

    def flush(self) -> None:
        """Log the tally of rejections left out since the last line, if any (the server calls this every
        second and at shutdown, so that the last burst of a flood is counted even when nothing follows it)."""
        if self.left_out:
            self.log.warning("%d more rejections not logged", self.left_out)
            self.left_out = 0
