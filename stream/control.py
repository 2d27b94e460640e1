"""The "control" data channel protocol: JSON text messages, parsed strictly, built in one place.

Client -> server::

    {"type": "prompt", "text": "...", "id": <str|int, optional>}
    {"type": "pause"} | {"type": "resume"} | {"type": "stop"}
    {"type": "ping", "t": <number>}

Server -> client (broadcast to every viewer of a session, except ``pong`` and ``error`` which answer the
sender): ``ack``, ``section``, ``progress``, ``preview``, ``stats``, ``state``, ``prompt_live``, ``pong``,
``error``. An invalid client message gets an ``error`` reply; the stream is never interrupted by one. So do
control messages (all but ``ping``) from a view-only viewer; and a viewer sending more than its rate limit
gets one ``error`` a second while the excess is dropped unread (see session.py).
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Union

MAX_MESSAGE_CHARS = 16_384  # a prompt is a few hundred characters; anything this big is a mistake
MAX_PROMPT_CHARS = 4_000


class ControlError(ValueError):
    """A client message that cannot be acted on; its text is sent back to the client as is."""


@dataclass(frozen=True)
class PromptMessage:
    text: str
    id: str | int | None = None


@dataclass(frozen=True)
class PauseMessage:
    pass


@dataclass(frozen=True)
class ResumeMessage:
    pass


@dataclass(frozen=True)
class StopMessage:
    pass


@dataclass(frozen=True)
class PingMessage:
    t: float


ClientMessage = Union[PromptMessage, PauseMessage, ResumeMessage, StopMessage, PingMessage]

_SIMPLE = {"pause": PauseMessage, "resume": ResumeMessage, "stop": StopMessage}
CLIENT_TYPES = ("prompt", "pause", "resume", "stop", "ping")
MAX_ID_CHARS = 200
MAX_SAFE_INT = 2**53 - 1  # ids go back to browsers: stay within what a JavaScript number holds exactly
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def max_message_chars(max_prompt_chars: int = MAX_PROMPT_CHARS) -> int:
    """The longest message worth parsing: room for a maximal prompt, also when its non-ASCII is escaped."""
    return max(MAX_MESSAGE_CHARS, 3 * max_prompt_chars + 1024)


def load_json(text: str) -> Any:
    """``json.loads`` for untrusted text: every failure is a ValueError whose message says what was wrong
    (both the control channel and POST /offer use it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError):  # an integer of over 4300 digits; nesting deeper than the stack
        raise ValueError("not usable JSON (nested too deeply or a number too long)") from None


def parse_client_message(raw: object, max_prompt_chars: int = MAX_PROMPT_CHARS) -> ClientMessage:
    """Parse one data-channel message; raises :class:`ControlError` (only) saying what a valid one looks like.

    Any input is safe: bytes that are not UTF-8, text that is not JSON, JSON nested deeper than Python
    recurses or with numbers too long to convert, and values of the wrong type all become a ControlError.
    """
    limit = max_message_chars(max_prompt_chars)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) > 4 * limit:  # checked before decoding: UTF-8 takes at most 4 bytes a character
            raise ControlError(f"message too long ({len(raw)} bytes, at most {limit} characters)")
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ControlError("control messages must be UTF-8 JSON text") from None
    if not isinstance(raw, str):
        raise ControlError("control messages must be UTF-8 JSON text")
    if len(raw) > limit:
        raise ControlError(f"message too long ({len(raw)} characters, at most {limit})")
    try:
        data = load_json(raw)
    except ValueError as exc:
        raise ControlError(f'{exc}; send e.g. {{"type": "prompt", "text": "a cat"}}') from None
    if not isinstance(data, dict):
        raise ControlError("a control message must be a JSON object with a \"type\" field")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ControlError(f"missing \"type\"; expected one of {', '.join(CLIENT_TYPES)}")
    if kind in _SIMPLE:
        return _SIMPLE[kind]()
    if kind == "prompt":
        return _parse_prompt(data, max_prompt_chars)
    if kind == "ping":
        t = data.get("t")
        # bool is an int subclass; a ping stamped True is a client bug worth reporting. NaN and infinities
        # (which Python's json accepts) could not be sent back as JSON in the pong.
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ControlError("ping needs a finite numeric \"t\" (the client's clock), e.g. "
                               '{"type": "ping", "t": 12.5}')
        return PingMessage(float(t))
    raise ControlError(f"unknown message type {_shorten(kind)!r}; expected one of {', '.join(CLIENT_TYPES)}")


def validate_prompt(text: object, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A prompt from a client, stripped; ControlError (a ValueError) if it is not usable text.

    Unpaired surrogates and control characters are refused here because they would fail later, inside
    the text encoders on the device thread, and take the whole session down with them.
    """
    if not isinstance(text, str):
        raise ControlError("the prompt must be a string, e.g. {\"type\": \"prompt\", \"text\": \"a cat\"}")
    text = text.strip()
    if not text:
        raise ControlError("prompt text is empty")
    if len(text) > max_chars:
        raise ControlError(f"prompt too long ({len(text)} characters, at most {max_chars})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ControlError("prompt text is not valid Unicode (it holds unpaired surrogates)") from None
    if any(unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS for c in text):
        raise ControlError("prompt text holds control characters; send plain text")
    return text


def _parse_prompt(data: dict[str, Any], max_prompt_chars: int) -> PromptMessage:
    if not isinstance(data.get("text"), str):
        raise ControlError("prompt needs a string \"text\", e.g. {\"type\": \"prompt\", \"text\": \"a cat\"}")
    text = validate_prompt(data["text"], max_prompt_chars)
    ident = data.get("id")
    valid_id = ident is None or (isinstance(ident, str) and len(ident) <= MAX_ID_CHARS) or (
        isinstance(ident, int) and not isinstance(ident, bool) and abs(ident) <= MAX_SAFE_INT)
    if not valid_id:
        raise ControlError(f"prompt \"id\" must be a string (at most {MAX_ID_CHARS} characters) or an integer "
                           "(at most 2**53 - 1)")
    return PromptMessage(text=text, id=ident)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def client_message(msg: ClientMessage) -> dict[str, Any]:
    """The JSON object a client sends for ``msg`` (the inverse of :func:`parse_client_message`)."""
    if isinstance(msg, PromptMessage):
        return {"type": "prompt", "text": msg.text, **({} if msg.id is None else {"id": msg.id})}
    if isinstance(msg, PingMessage):
        return {"type": "ping", "t": msg.t}
    kind = {PauseMessage: "pause", ResumeMessage: "resume", StopMessage: "stop"}[type(msg)]
    return {"type": kind}


# -- server -> client ---------------------------------------------------------------------------------------

def encode(message: dict[str, Any]) -> str:
    """Serialize a server message (compact: previews and stats go out several times a second)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def ack(ident: str | int | None, section: int, prompt: str) -> dict[str, Any]:
    return {"type": "ack", "id": ident, "section": section, "prompt": prompt}


def section(index: int, prompt: str, first: int, last: int, ms: float, steps_run: int, steps_skipped: int,
            is_last: bool) -> dict[str, Any]:
    return {"type": "section", "index": index, "prompt": prompt, "frames": [first, last], "ms": round(ms, 2),
            "steps_run": steps_run, "steps_skipped": steps_skipped, "is_last": is_last}


def progress(section_index: int, step: int, steps: int) -> dict[str, Any]:
    return {"type": "progress", "section": section_index, "step": step, "steps": steps}


def preview(section_index: int, step: int, steps: int, image: str, width: int, height: int) -> dict[str, Any]:
    return {"type": "preview", "section": section_index, "step": step, "steps": steps, "image": image,
            "width": width, "height": height}


def state(value: str, detail: str = "") -> dict[str, Any]:
    return {"type": "state", "state": value, "detail": detail}


def prompt_live(ident: str | int | None, section_index: int, latency_ms: float) -> dict[str, Any]:
    """The first frame generated with a new prompt is being played: the prompt-to-screen latency."""
    return {"type": "prompt_live", "id": ident, "section": section_index, "latency_ms": round(latency_ms, 1)}


def pong(t: float, server_time: float) -> dict[str, Any]:
    return {"type": "pong", "t": t, "server_time": server_time}


def error(message: str) -> dict[str, Any]:
    return {"type": "error", "message": message}
