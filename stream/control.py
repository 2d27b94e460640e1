"""The "control" data channel protocol: JSON text messages, parsed strictly, built in one place.

Client -> server::

    {"type": "prompt", "text": "...", "id": <str|int, optional>}
    {"type": "pause"} | {"type": "resume"} | {"type": "stop"}
    {"type": "ping", "t": <number>}

Server -> client (broadcast to every viewer of a session, except ``pong`` and ``error`` which answer the
sender): ``ack``, ``section``, ``progress``, ``preview``, ``stats``, ``state``, ``prompt_live``, ``pong``,
``error``. An invalid client message gets an ``error`` reply; the stream is never interrupted by one.
"""

from __future__ import annotations

import json
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


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Parse one data-channel message; raises :class:`ControlError` saying what a valid message looks like."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ControlError("control messages must be UTF-8 JSON text") from None
    if len(raw) > MAX_MESSAGE_CHARS:
        raise ControlError(f"message too long ({len(raw)} characters, at most {MAX_MESSAGE_CHARS})")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ControlError(f"not JSON ({exc.msg} at character {exc.pos}); send e.g. "
                           '{"type": "prompt", "text": "a cat"}') from None
    if not isinstance(data, dict):
        raise ControlError("a control message must be a JSON object with a \"type\" field")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ControlError(f"missing \"type\"; expected one of {', '.join(CLIENT_TYPES)}")
    if kind in _SIMPLE:
        return _SIMPLE[kind]()
    if kind == "prompt":
        return _parse_prompt(data)
    if kind == "ping":
        t = data.get("t")
        # bool is an int subclass; a ping stamped True is a client bug worth reporting.
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ControlError("ping needs a numeric \"t\" (the client's clock), e.g. {\"type\": \"ping\", \"t\": 12.5}")
        return PingMessage(float(t))
    raise ControlError(f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_TYPES)}")


def _parse_prompt(data: dict[str, Any]) -> PromptMessage:
    text = data.get("text")
    if not isinstance(text, str):
        raise ControlError("prompt needs a string \"text\", e.g. {\"type\": \"prompt\", \"text\": \"a cat\"}")
    text = text.strip()
    if not text:
        raise ControlError("prompt text is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ControlError(f"prompt too long ({len(text)} characters, at most {MAX_PROMPT_CHARS})")
    ident = data.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise ControlError("prompt \"id\" must be a string or an integer")
    return PromptMessage(text=text, id=ident)


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
