"""Prompt transitions, weighted prompts and timelines over the control channel: strict parsing, and a live
session on the tiny model that follows a timeline and blends a prompt in."""

from __future__ import annotations

import json

import pytest

from framepack_rt.stream import control
from framepack_rt.stream.control import ControlError, PromptMessage, TimelineMessage, parse_client_message


def parse(message: dict) -> control.ClientMessage:
    return parse_client_message(json.dumps(message))


# -- parsing -----------------------------------------------------------------------------------------------------

def test_prompt_with_transition_and_weighted_prompts_parse():
    assert parse({"type": "prompt", "text": " a cat ", "transition": 3}) == PromptMessage("a cat", transition=3)
    assert parse({"type": "prompt", "text": "a cat"}).transition is None  # the server's default applies
    weighted = parse({"type": "prompt", "id": 7, "prompts": [{"text": "a cat", "weight": 3},
                                                           {"text": "a dog", "weight": 1}, {"text": "a cow", "weight": 0}]})
    assert weighted == PromptMessage("a cat:0.75 | a dog:0.25", id=7, prompts=(("a cat", 0.75), ("a dog", 0.25)))
    one = parse({"type": "prompt", "prompts": [{"text": "a cat", "weight": 1}, {"text": "a dog", "weight": 0}]})
    assert one.text == "a cat" and one.prompts == (("a cat", 1.0),)  # labelled as the plain prompt
    for msg in (weighted, one, PromptMessage("a cat", transition=3)):
        assert parse(control.client_message(msg)) == msg


@pytest.mark.parametrize("message, words", [
    ({"type": "prompt", "text": "a cat", "transition": -1}, "from 0"),
    ({"type": "prompt", "text": "a cat", "transition": 65}, "to 64"),
    ({"type": "prompt", "text": "a cat", "transition": 2.5}, "whole number"),
    ({"type": "prompt", "text": "a cat", "transition": True}, "whole number"),
    ({"type": "prompt", "text": "a cat", "prompts": [{"text": "a dog", "weight": 1}]}, "not both"),
    ({"type": "prompt", "prompts": []}, "list of 1 to 8"),
    ({"type": "prompt", "prompts": "a cat"}, "list of 1 to 8"),
    ({"type": "prompt", "prompts": [{"text": "a cat", "weight": 1}] * 9}, "list of 1 to 8"),
    ({"type": "prompt", "prompts": [{"weight": 1}]}, "weighted prompt 1 needs"),
    ({"type": "prompt", "prompts": [{"text": "a cat", "weight": 1}, {"text": " ", "weight": 1}]}, "weighted prompt 2: prompt text is empty"),
    ({"type": "prompt", "prompts": [{"text": "a cat", "weight": -1}]}, "finite number >= 0"),
    ({"type": "prompt", "prompts": [{"text": "a cat", "weight": "1"}]}, "finite number >= 0"),
    ({"type": "prompt", "prompts": [{"text": "a cat", "weight": 0}]}, "all 0"),
    ({"type": "timeline"}, "string \"schedule\""),
    ({"type": "timeline", "schedule": "2:a cat"}, "must start at 0"),
    ({"type": "timeline", "schedule": "0:a cat;soon:a dog"}, "entry 'soon:a dog'"),
    ({"type": "timeline", "schedule": "0:a cat;3:"}, "entry '3:'"),
    ({"type": "timeline", "schedule": "0:a cat;1e9:a dog"}, "timeline entry 1e\\+09:'a dog'.*at most 86400"),
    ({"type": "timeline", "schedule": "0:a cat;nan:a dog"}, "timeline entry nan"),
    ({"type": "timeline", "schedule": "0:a cat;2:a \u0007dog"}, "timeline entry 2:.*control characters"),
    ({"type": "timeline", "schedule": ";".join(f"{i}:p{i}" for i in range(65))}, "at most 64"),
    ({"type": "timeline", "schedule": "0:a cat", "transition": 100}, "timeline \"transition\""),
])
def test_bad_messages_say_what_is_wrong(message, words):
    with pytest.raises(ControlError, match=words):
        parse(message)


def test_timeline_parses_with_generates_parser():
    msg = parse({"type": "timeline", "schedule": "3.5:a dog; 0:a cat", "transition": 2, "id": "t"})
    assert msg == TimelineMessage("3.5:a dog; 0:a cat", ((0.0, "a cat"), (3.5, "a dog")), transition=2, id="t")
    assert parse({"type": "timeline", "schedule": "  "}) == TimelineMessage("", ())  # drops the timeline
    assert parse(control.client_message(msg)) == msg


def test_acks_and_section_messages_report_blends():
    assert control.ack(1, 4, "a cat") == {"type": "ack", "id": 1, "section": 4, "prompt": "a cat"}
    blended = control.ack(1, 4, "a cat:0.70 | a dog:0.30", transition=3, prompts=[("a cat", 0.7), ("a dog", 0.3)])
    assert blended["transition"] == 3 and blended["prompts"] == [{"text": "a cat", "weight": 0.7},
                                                               {"text": "a dog", "weight": 0.3}]
    section = control.section(2, "x:0.50 | y:0.50", 0, 11, 5.0, 2, 0, False, blend=(("x", 0.5), ("y", 0.5)))
    assert section["blend"] == [{"text": "x", "weight": 0.5}, {"text": "y", "weight": 0.5}]
    assert control.timeline_ack("t", 3, [(0.0, "a", None), (2.0, "b", 5)], 0)["timeline"] == [
        {"seconds": 0.0, "prompt": "a", "section": None}, {"seconds": 2.0, "prompt": "b", "section": 5}]


def test_serve_flag_and_setting():
    from framepack_rt.commands.cli import build_parser
    from framepack_rt.stream import options
    from framepack_rt.stream.server import ServerSettings

    args = build_parser().parse_args(["serve", "--transition-sections", "4"])
    assert options.settings_kwargs(args)["transition_sections"] == 4
    assert ServerSettings().transition_sections == 0
    with pytest.raises(ValueError, match="--transition-sections 65"):
        ServerSettings(transition_sections=65)


# -- a live session ------------------------------------------------------------------------------------------------

def test_timeline_and_transition_in_a_live_session(stream_pipe, run_with_server):
    """The page's path end to end on the tiny model: a timeline applied at its video time, then a prompt
    blended in over 2 sections; acks, section messages and /api/sessions say so. Window 3: sections of 12
    frames (0.4 s), section k starts at (12 k + 1) / 30 s."""
    from framepack_rt.stream.client import StreamClient

    def section_message(index: int):
        return lambda m: m.get("type") == "section" and m["index"] == index

    async def scenario(server, url):
        client = StreamClient(url)
        try:
            session = await client.connect(prompt="a calm lake")
            await client.wait_for("section", timeout=30)
            client.send({"type": "timeline", "schedule": "0:a calm lake;3:a storm over the lake", "id": "t1"})
            timeline = await client.wait_for(lambda m: m.get("type") == "ack" and m.get("id") == "t1", timeout=30)
            storm = timeline["timeline"][1]["section"]
            stormy = await client.wait_for(section_message(storm), timeout=60)
            before = [m for m in client.messages if m.get("type") == "section" and m["index"] == storm - 1]
            client.send({"type": "prompt", "text": "a sunny lake", "transition": 2, "id": "p1"})
            ack = await client.wait_for(lambda m: m.get("type") == "ack" and m.get("id") == "p1", timeout=30)
            halfway = await client.wait_for(section_message(ack["section"]), timeout=60)
            done = await client.wait_for(section_message(ack["section"] + 1), timeout=60)
            live = await client.wait_for(lambda m: m.get("type") == "prompt_live" and m.get("id") == "p1", timeout=30)
            listing = await client.get_json(f"/api/sessions/{session}")
            return timeline, storm, stormy, before, ack, halfway, done, live, listing
        finally:
            await client.close()

    timeline, storm, stormy, before, ack, halfway, done, live, listing = run_with_server(
        stream_pipe, scenario, timeout=240, window=3)
    # Times are video seconds from the session's start: 3 s is the start of section 8 ((12 * 8 + 1) / 30 s).
    assert timeline["timeline"][0] == {"seconds": 0.0, "prompt": "a calm lake",
                                       "section": timeline["section"]}  # in force already: from the next section
    assert storm == max(8, timeline["section"]) and stormy["prompt"] == "a storm over the lake"
    assert not before or before[0]["prompt"] == "a calm lake"
    assert ack["transition"] == 2 and ack["prompt"] == "a sunny lake"
    assert halfway["blend"] == [{"text": "a storm over the lake", "weight": 0.5}, {"text": "a sunny lake", "weight": 0.5}]
    assert halfway["prompt"] == "a storm over the lake:0.50 | a sunny lake:0.50"
    assert done["prompt"] == "a sunny lake" and done["blend"] == [{"text": "a sunny lake", "weight": 1.0}]
    assert live["section"] == ack["section"] and live["prompt"] == halfway["prompt"]
    assert listing["timeline"] == timeline["timeline"] and listing["blend"][-1]["text"] == "a sunny lake"
