"""The control data-channel parser: valid messages become typed objects, invalid ones a ControlError that
says what a valid message looks like."""

from __future__ import annotations

import json

import pytest

from framepack_rt.stream import control
from framepack_rt.stream.control import (
    ControlError,
    PauseMessage,
    PingMessage,
    PromptMessage,
    ResumeMessage,
    StopMessage,
    parse_client_message,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('{"type": "prompt", "text": "a cat", "id": 7}', PromptMessage("a cat", 7)),
        ('{"type": "prompt", "text": "  padded  ", "id": "p1"}', PromptMessage("padded", "p1")),
        ('{"type": "prompt", "text": "no id"}', PromptMessage("no id", None)),
        ('{"type": "pause"}', PauseMessage()),
        ('{"type": "resume", "extra": 1}', ResumeMessage()),
        ('{"type": "stop"}', StopMessage()),
        ('{"type": "ping", "t": 12.5}', PingMessage(12.5)),
        ('{"type": "ping", "t": 3}', PingMessage(3.0)),
        (b'{"type": "pause"}', PauseMessage()),
    ],
)
def test_valid_messages(raw, expected):
    assert parse_client_message(raw) == expected


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"text": "a"}', "missing \"type\""),
        ('{"type": 5}', "missing \"type\""),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"type": "prompt"}', "string \"text\""),
        ('{"type": "prompt", "text": 3}', "string \"text\""),
        ('{"type": "prompt", "text": "   "}', "empty"),
        ('{"type": "prompt", "text": "a", "id": [1]}', "\"id\" must be"),
        ('{"type": "prompt", "text": "a", "id": true}', "\"id\" must be"),
        ('{"type": "ping"}', "numeric \"t\""),
        ('{"type": "ping", "t": "now"}', "numeric \"t\""),
        ('{"type": "ping", "t": false}', "numeric \"t\""),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_invalid_messages_say_what_is_wrong(raw, fragment):
    with pytest.raises(ControlError, match=None) as info:
        parse_client_message(raw)
    assert fragment in str(info.value)


def test_size_limits():
    long_prompt = json.dumps({"type": "prompt", "text": "x" * (control.MAX_PROMPT_CHARS + 1)})
    with pytest.raises(ControlError, match="prompt too long"):
        parse_client_message(long_prompt)
    with pytest.raises(ControlError, match="message too long"):
        parse_client_message(" " * (control.MAX_MESSAGE_CHARS + 1))


def test_unknown_types_list_the_valid_ones():
    with pytest.raises(ControlError) as info:
        parse_client_message('{"type": "Prompt"}')
    for kind in control.CLIENT_TYPES:
        assert kind in str(info.value)


def test_server_messages_are_compact_json():
    msg = control.section(3, "a cat", 99, 131, 12.3456, 8, 2, False)
    text = control.encode(msg)
    assert " " not in text.replace("a cat", "")
    assert json.loads(text) == {"type": "section", "index": 3, "prompt": "a cat", "frames": [99, 131],
                                "ms": 12.35, "steps_run": 8, "steps_skipped": 2, "is_last": False}
    assert json.loads(control.encode(control.ack("p1", 4, "x"))) == {"type": "ack", "id": "p1", "section": 4,
                                                                     "prompt": "x"}
    with pytest.raises(ValueError):  # NaN is not JSON: a bug upstream must not reach the browser as NaN
        control.encode({"type": "stats", "gen_fps": float("nan")})
