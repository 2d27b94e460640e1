"""The "control" data channel protocol: JSON text messages, parsed strictly, built in one place.

Client -> server::

    {"type": "prompt", "text": "...", "id": <str|int, optional>, "transition": <sections, optional>}
    {"type": "prompt", "prompts": [{"text": "a cat", "weight": 0.7}, {"text": "a dog", "weight": 0.3}], ...}
    {"type": "timeline", "schedule": "0:a cat;3.5:a dog", "transition": <optional>, "id": <optional>}
    {"type": "pause"} | {"type": "resume"} | {"type": "stop"}
    {"type": "ping", "t": <number>}
    {"type": "lora", "name": "<adapter>", "scale": <number>, "id": <optional>}   (answered by "lora_ack")

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
    """text: the prompt, or the label of ``prompts`` (weighted texts, weights as sent). transition: sections
    to blend it in over (None: the server's --transition-sections)."""

    text: str
    id: str | int | None = None
    prompts: tuple[tuple[str, float], ...] | None = None
    transition: int | None = None


@dataclass(frozen=True)
class TimelineMessage:
    """A prompt timeline in video seconds from the session's start ("0:a cat;3.5:a dog", what ``generate
    --prompt-schedule`` takes); ``entries`` empty: drop the session's timeline."""

    schedule: str
    entries: tuple[tuple[float, str], ...]
    transition: int | None = None
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


@dataclass(frozen=True)
class LoraMessage:
    """A session's scale for one loaded LoRA adapter (by name) from the next section on."""

    name: str
    scale: float
    id: str | int | None = None


ClientMessage = Union[PromptMessage, TimelineMessage, PauseMessage, ResumeMessage, StopMessage, PingMessage,
                      LoraMessage]

_SIMPLE = {"pause": PauseMessage, "resume": ResumeMessage, "stop": StopMessage}
CLIENT_TYPES = ("prompt", "timeline", "pause", "resume", "stop", "ping", "lora")
MAX_TRANSITION_SECTIONS = 64  # about 77 s of video at the default window: longer is surely a typo
MAX_WEIGHTED_PROMPTS = 8
MAX_TIMELINE_ENTRIES = 64
MAX_TIMELINE_SECONDS = 86_400.0  # a day of video
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
    if kind == "timeline":
        return _parse_timeline(data, max_prompt_chars)
    if kind == "lora":
        return _parse_lora(data)
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
    transition = _parse_transition(data, "prompt")
    if "prompts" in data:
        if "text" in data:
            raise ControlError('prompt takes "text" or "prompts" (weighted), not both')
        prompts = normalized(_parse_weighted(data["prompts"], max_prompt_chars))
        return PromptMessage(text=blend_label(prompts), id=_parse_id(data, "prompt"), prompts=prompts,
                             transition=transition)
    if not isinstance(data.get("text"), str):
        raise ControlError("prompt needs a string \"text\", e.g. {\"type\": \"prompt\", \"text\": \"a cat\"}")
    text = validate_prompt(data["text"], max_prompt_chars)
    return PromptMessage(text=text, id=_parse_id(data, "prompt"), transition=transition)


def _parse_id(data: dict[str, Any], kind: str) -> str | int | None:
    ident = data.get("id")
    valid_id = ident is None or (isinstance(ident, str) and len(ident) <= MAX_ID_CHARS) or (
        isinstance(ident, int) and not isinstance(ident, bool) and abs(ident) <= MAX_SAFE_INT)
    if not valid_id:
        raise ControlError(f"{kind} \"id\" must be a string (at most {MAX_ID_CHARS} characters) or an integer "
                           "(at most 2**53 - 1)")
    return ident


def _parse_transition(data: dict[str, Any], kind: str) -> int | None:
    """The optional "transition": sections a new prompt blends in over (0: at once)."""
    value = data.get("transition")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TRANSITION_SECTIONS:
        raise ControlError(f'{kind} "transition" must be a whole number of sections from 0 (at once) to '
                           f'{MAX_TRANSITION_SECTIONS}, e.g. {{"type": "{kind}", ..., "transition": 3}}')
    return value


def _parse_weighted(value: object, max_prompt_chars: int) -> tuple[tuple[str, float], ...]:
    """"prompts": [{"text": ..., "weight": ...}, ...]: 1-8 entries, weights >= 0, at least one > 0."""
    example = '"prompts": [{"text": "a cat", "weight": 0.7}, {"text": "a dog", "weight": 0.3}]'
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_WEIGHTED_PROMPTS:
        raise ControlError(f'"prompts" must be a list of 1 to {MAX_WEIGHTED_PROMPTS} weighted prompts, e.g. {example}')
    prompts = []
    for i, entry in enumerate(value, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ControlError(f'weighted prompt {i} needs a string "text" and a "weight", e.g. {example}')
        try:
            text = validate_prompt(entry["text"], max_prompt_chars)
        except ControlError as exc:
            raise ControlError(f"weighted prompt {i}: {exc}") from None
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ControlError(f'weighted prompt {i} ({_shorten(text)!r}): "weight" must be a finite number >= 0')
        prompts.append((text, float(weight)))
    if not any(weight > 0 for _, weight in prompts):
        raise ControlError("the weighted prompts' weights are all 0; give at least one a weight > 0")
    return tuple(prompts)


def normalized(prompts: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    """Weights scaled to sum to 1, repeated texts merged, zero weights dropped (engine/prompts.py's
    normalize_blend, which the pipeline applies; repeated here so that this module stays free of torch)."""
    merged: dict[str, float] = {}
    for text, weight in prompts:
        merged[text] = merged.get(text, 0.0) + weight
    total = sum(merged.values())
    return tuple((text, weight / total) for text, weight in merged.items() if weight > 0)


def blend_label(prompts: tuple[tuple[str, float], ...]) -> str:
    """The label the pipeline gives a blend (Section.prompt): the text alone, or "a cat:0.70 | a dog:0.30"."""
    if len(prompts) == 1:
        return prompts[0][0]
    return " | ".join(f"{text}:{weight:.2f}" for text, weight in prompts)


def _parse_timeline(data: dict[str, Any], max_prompt_chars: int) -> TimelineMessage:
    """{"type": "timeline", "schedule": "0:a cat;3.5:a dog"}: generate's --prompt-schedule syntax, parsed by
    the same parser; times are video seconds from the session's start; "" drops the timeline."""
    from framepack_rt.pipeline.media import parse_prompt_schedule

    schedule = data.get("schedule")
    if not isinstance(schedule, str):
        raise ControlError('timeline needs a string "schedule" of SECONDS:PROMPT entries separated by ";", e.g. '
                           '{"type": "timeline", "schedule": "0:a cat;3.5:a dog"} ("" drops the timeline)')
    transition, ident = _parse_transition(data, "timeline"), _parse_id(data, "timeline")
    if not schedule.strip():
        return TimelineMessage(schedule="", entries=(), transition=transition, id=ident)
    try:
        changes = parse_prompt_schedule(schedule)
    except ValueError as exc:
        raise ControlError(f"timeline: {exc}") from None
    if len(changes) > MAX_TIMELINE_ENTRIES:
        raise ControlError(f"timeline has {len(changes)} entries, at most {MAX_TIMELINE_ENTRIES}")
    entries = []
    for change in changes:
        where = f"timeline entry {change.seconds:g}:{_shorten(change.prompt)!r}"
        if not math.isfinite(change.seconds) or change.seconds > MAX_TIMELINE_SECONDS:
            raise ControlError(f"{where}: times are video seconds from the session's start, at most "
                               f"{MAX_TIMELINE_SECONDS:g}")
        try:
            entries.append((change.seconds, validate_prompt(change.prompt, max_prompt_chars)))
        except ControlError as exc:
            raise ControlError(f"{where}: {exc}") from None
    return TimelineMessage(schedule=schedule.strip(), entries=tuple(entries), transition=transition, id=ident)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_lora(data: dict[str, Any]) -> LoraMessage:
    """{"type": "lora", "name": ..., "scale": ...}: the shape only; the pipeline checks the name against the
    loaded adapters and the scale's range (its error lists the names)."""
    example = '{"type": "lora", "name": "style", "scale": 0.8}'
    name, scale = data.get("name"), data.get("scale")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_ID_CHARS:
        raise ControlError(f'lora needs the adapter\'s "name" (a string; /api/config lists them), e.g. {example}')
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ControlError(f'lora needs a finite numeric "scale", e.g. {example}')
    return LoraMessage(name=name, scale=float(scale), id=_parse_id(data, "lora"))


def client_message(msg: ClientMessage) -> dict[str, Any]:
    """The JSON object a client sends for ``msg`` (the inverse of :func:`parse_client_message`)."""
    if isinstance(msg, PromptMessage):
        body: dict[str, Any] = {"type": "prompt"}
        if msg.prompts is not None:
            body["prompts"] = [{"text": text, "weight": weight} for text, weight in msg.prompts]
        else:
            body["text"] = msg.text
        if msg.transition is not None:
            body["transition"] = msg.transition
        return {**body, **({} if msg.id is None else {"id": msg.id})}
    if isinstance(msg, TimelineMessage):
        body = {"type": "timeline", "schedule": msg.schedule}
        if msg.transition is not None:
            body["transition"] = msg.transition
        return {**body, **({} if msg.id is None else {"id": msg.id})}
    if isinstance(msg, PingMessage):
        return {"type": "ping", "t": msg.t}
    if isinstance(msg, LoraMessage):
        return {"type": "lora", "name": msg.name, "scale": msg.scale, **({} if msg.id is None else {"id": msg.id})}
    kind = {PauseMessage: "pause", ResumeMessage: "resume", StopMessage: "stop"}[type(msg)]
    return {"type": kind}


# -- server -> client ---------------------------------------------------------------------------------------

def encode(message: dict[str, Any]) -> str:
    """Serialize a server message (compact: previews and stats go out several times a second)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def ack(ident: str | int | None, section: int, prompt: str, *, transition: int | None = None,
        prompts: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """A prompt was taken: it applies from ``section`` (blended in over ``transition`` sections when given;
    ``prompts``: the weighted prompts as normalised)."""
    message: dict[str, Any] = {"type": "ack", "id": ident, "section": section, "prompt": prompt}
    if transition is not None:
        message["transition"] = transition
    if prompts is not None:
        message["prompts"] = blend_entries(prompts)
    return message


def timeline_ack(ident: str | int | None, section: int, entries: list[tuple[float, str, int | None]],
                 transition: int) -> dict[str, Any]:
    """A timeline was taken from ``section`` on: each entry with the section it takes over at (None: never,
    e.g. an entry already past that a later past one supersedes); no entries: the timeline was dropped."""
    return {"type": "ack", "id": ident, "section": section, "transition": transition,
            "timeline": [{"seconds": s, "prompt": p, "section": k} for s, p, k in entries]}


def blend_entries(blend: Any) -> list[dict[str, Any]]:
    """[(text, weight), ...] -> [{"text", "weight"}, ...], weights rounded for display."""
    return [{"text": text, "weight": round(float(weight), 4)} for text, weight in blend]


def section(index: int, prompt: str, first: int, last: int, ms: float, steps_run: int, steps_skipped: int,
            is_last: bool, blend: Any = None) -> dict[str, Any]:
    """``blend``: the weighted prompts the section was generated with (``prompt`` is their label)."""
    message = {"type": "section", "index": index, "prompt": prompt, "frames": [first, last], "ms": round(ms, 2),
               "steps_run": steps_run, "steps_skipped": steps_skipped, "is_last": is_last}
    if blend:
        message["blend"] = blend_entries(blend)
    return message


def progress(section_index: int, step: int, steps: int) -> dict[str, Any]:
    return {"type": "progress", "section": section_index, "step": step, "steps": steps}


def preview(section_index: int, step: int, steps: int, image: str, width: int, height: int) -> dict[str, Any]:
    return {"type": "preview", "section": section_index, "step": step, "steps": steps, "image": image,
            "width": width, "height": height}


def state(value: str, detail: str = "") -> dict[str, Any]:
    return {"type": "state", "state": value, "detail": detail}


def prompt_live(ident: str | int | None, section_index: int, latency_ms: float,
                prompt: str | None = None) -> dict[str, Any]:
    """The first frame generated with a new prompt is being played: the prompt-to-screen latency. ``prompt``:
    the label of the blend that frame was generated with (mid-transition, both prompts and their weights)."""
    message = {"type": "prompt_live", "id": ident, "section": section_index, "latency_ms": round(latency_ms, 1)}
    if prompt is not None:
        message["prompt"] = prompt
    return message


def pong(t: float, server_time: float) -> dict[str, Any]:
    return {"type": "pong", "t": t, "server_time": server_time}


def lora_ack(ident: str | int | None, name: str, scale: float, section: int) -> dict[str, Any]:
    """A LoRA scale was accepted: it applies from ``section`` on (broadcast, like ``ack``)."""
    return {"type": "lora_ack", "id": ident, "name": name, "scale": scale, "section": section}


def error(message: str) -> dict[str, Any]:
    return {"type": "error", "message": message}
