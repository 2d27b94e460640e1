"""Who may do what, and HTTP hygiene: the access token and roles, JSON errors, security headers, static files.

Access model (``--token`` / ``FRAMEPACK_RT_TOKEN``):

* Without a token the server is open to whoever can reach it (it binds 127.0.0.1 by default): anyone may
  start a session, and gets **control** of it; anyone may join a session by its id, as a **viewer**.
* With a token, starting a session, listing sessions and joining with control all need it (header
  ``Authorization: Bearer <token>``, or ``"token"`` in the offer body; the page takes ``?token=`` from its
  URL). Every session also has a ``view_key``, handed to whoever holds control: the join link
  ``/?session=<id>&key=<view_key>`` lets its holder watch that one session, and nothing else.
* Roles: **control** may send prompt / pause / resume / stop; a **viewer** only watches (and may ping):
  its control messages get an ``error`` reply and change nothing. The creator of a session and anyone
  joining with the token have control; everyone else is a viewer.

Tokens and keys are compared in constant time and never logged (the access log is off; errors log the path
without the query string).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web, web_protocol

from framepack_rt.stream.logs import RejectionLog, safe_path

log = logging.getLogger(__name__)

CONTROL, VIEW = "control", "view"
SERVER_NAME = "framepack-rt"  # the Server header: no versions
MIN_TOKEN_CHARS = 8
# The page needs its own scripts and styles, data: images (previews, picked files) and same-origin fetches.
# No inline script and no eval can run (the usual ways an injection becomes code). Browser automation does
# not need 'unsafe-eval': playwright's evaluate() goes through the DevTools protocol, and wait_for_function()
# given a function ("() => ...", not an expression) polls without eval (see tests/stream/test_security_browser).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; "
                           "connect-src 'self'; media-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
# The page uses none of these: no other page it could be framed into or script it runs may ask for them.
PERMISSIONS_POLICY = ("camera=(), microphone=(), geolocation=(), display-capture=(), usb=(), serial=(), "
                      "payment=(), interest-cohort=()")
SECURITY_HEADERS = {
    "Permissions-Policy": PERMISSIONS_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a ?token= URL must not leak to other sites through Referer
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
}


# The one answer to a join that cannot be allowed: a wrong key, or (with a token set) a session that does not
# exist. Telling the two apart would tell a stranger which session ids are live.
JOIN_REFUSED = "joining this session needs its join link (?session=...&key=...) or the server token"


class Unauthorized(Exception):
    """No valid token or key for what was asked: answered with 401."""


def check_token(token: str | None) -> None:
    """ValueError unless ``token`` is None or usable in an HTTP header and long enough to be worth having."""
    if token is None:
        return
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"--token: use at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces, "
                         "e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'")


def new_key() -> str:
    """A session's view key: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def _same(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


class Access:
    """Decides roles from the server token and a session's view key."""

    def __init__(self, token: str | None) -> None:
        check_token(token)
        self._token = token

    @property
    def required(self) -> bool:
        return self._token is not None

    def has_token(self, request: web.Request, body: dict[str, Any] | None = None) -> bool:
        """True if the request carries the server token (header ``Authorization: Bearer``, or body "token")."""
        if self._token is None:
            return False
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(value.strip(), self._token):
            return True
        return body is not None and _same(body.get("token"), self._token)

    def require(self, request: web.Request, body: dict[str, Any] | None = None) -> None:
        """Raise :class:`Unauthorized` if a token is configured and the request lacks it."""
        if self._token is not None and not self.has_token(request, body):
            raise Unauthorized(self._missing(request, body))

    def role_to_create(self, request: web.Request, body: dict[str, Any]) -> str:
        self.require(request, body)
        return CONTROL

    def role_to_join(self, request: web.Request, body: dict[str, Any], view_key: str) -> str:
        """CONTROL with the token; VIEW with the session's key (or with anything when no token is set)."""
        if self.has_token(request, body):
            return CONTROL
        if self._token is None or _same(body.get("key"), view_key):
            return VIEW
        raise Unauthorized(JOIN_REFUSED)

    def _missing(self, request: web.Request, body: dict[str, Any] | None) -> str:
        given = "Authorization" in request.headers or (body is not None and "token" in body)
        if given:
            return "the token is not valid; ask the server's operator for the right one"
        return ("this server needs a token: open the page as http://HOST:PORT/?token=..., or send "
                "'Authorization: Bearer <token>'")


REASONS = {400: "bad request", 401: "unauthorized", 404: "not found", 405: "method not allowed",
           408: "request timeout", 413: "too large", 415: "unsupported media type", 429: "at capacity"}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_errors(max_body_bytes: int, rejections: RejectionLog | None = None,
                client: Callable[[web.Request], str] = lambda r: r.remote or "",
                ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: every error answer is JSON with a message; an unexpected exception is a logged 500. Every
    4xx is reported to ``rejections`` (one rate-limited line: method, path without query, status)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await answer(request, handler)
        if rejections is not None and 400 <= response.status < 500:
            rejections.reject(REASONS.get(response.status, f"status {response.status}"), client(request),
                              f"{request.method} {safe_path(request.path)} {response.status}")
        return response

    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web_protocol.RequestPayloadError:  # a body that does not parse as what its headers announced
            return json_error(400, "the request body is malformed (its length or chunks do not match)")
        except Unauthorized as exc:
            return json_error(401, str(exc), {"WWW-Authenticate": 'Bearer realm="framepack-rt"'})
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body too large (at most {max_body_bytes / 2**20:.1f} MB); send a "
                                   "smaller start image")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
            known = {404: f"nothing at {request.path}", 405: f"{request.method} is not allowed on {request.path}"}
            return json_error(exc.status, known.get(exc.status, exc.reason), headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away: nobody to answer
        except Exception:  # noqa: BLE001 -- the one place a server fault becomes a 500, logged with a traceback
            # request.path, never the query string: it may hold ?token=.
            log.exception("%s %s failed", request.method, safe_path(request.path))
            return json_error(500, "internal server error; the server log has the details")

    return middleware


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the same headers on every answer (pages, files, errors); never a CORS header."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = SERVER_NAME  # aiohttp's default names Python's and its own version
    response.headers.pop("Access-Control-Allow-Origin", None)


def static_files(folder: Path) -> dict[str, Path]:
    """The files the page may load: regular files directly in ``folder``, by name.

    Serving by a fixed name lookup, not by joining a path, leaves nothing to walk out of the folder with
    (``..``, ``%2e%2e``, absolute paths); symbolic links are left out, so one placed there leads nowhere.
    """
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}
