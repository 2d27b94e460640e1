"""Prompt blends and transitions (framepack_rt/engine/prompts.py), and the VideoStream that uses them on the
tiny model: a transition over 3 sections, weighted lists, timelines."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from framepack_rt.engine.generator import Conditioning
from framepack_rt.engine.prompts import (
    PromptBlender,
    blend_conditionings,
    blend_label,
    entry_sections,
    mix,
    normalize_blend,
    single,
    slerp,
)


def cond(prompt: str, length: int, seed: int, dim: int = 8, pooled_dim: int = 6) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(prompt=prompt, text=torch.randn(1, length, dim, generator=g),
                        pooled=torch.randn(1, pooled_dim, generator=g),
                        text_mask=torch.ones(1, length, dtype=torch.bool), image_embeds=torch.ones(1, 3, 4))


def assert_same(a: Conditioning, b: Conditioning) -> None:
    assert torch.equal(a.text, b.text) and torch.equal(a.pooled, b.pooled)
    assert torch.equal(a.text_mask, b.text_mask) and torch.equal(a.image_embeds, b.image_embeds)


# -- blend math ----------------------------------------------------------------------------------------------

def test_weight_zero_is_the_old_prompt_and_one_the_new():
    old, new = cond("old", 5, 0), cond("new", 9, 1)
    at_zero = blend_conditionings([(old, 1.0), (new, 0.0)])
    at_one = blend_conditionings([(old, 0.0), (new, 1.0)])
    assert_same(at_zero, old) and at_zero.prompt == "old"
    assert_same(at_one, new) and at_one.prompt == "new"


def test_text_is_padded_mixed_linearly_under_the_union_of_masks():
    short, long = cond("short", 3, 0), cond("long", 7, 1)
    short = Conditioning("short", short.text, short.pooled, torch.tensor([[True, True, False]]), short.image_embeds)
    mixed = blend_conditionings([(short, 0.25), (long, 0.75)])
    assert mixed.text.shape == (1, 7, 8) and mixed.prompt == "short:0.25 | long:0.75"
    assert mixed.text_mask.tolist() == [[True] * 7]  # position 2 is padding in one prompt, real in the other
    assert torch.allclose(mixed.text[:, :3], 0.25 * short.text + 0.75 * long.text[:, :3])
    assert torch.allclose(mixed.text[:, 3:], 0.75 * long.text[:, 3:])  # the longer prompt's tail, weighted
    both_short = blend_conditionings([(short, 0.5), (cond("other", 3, 2), 0.5)])
    assert both_short.text_mask.tolist() == [[True, True, True]]


def test_slerp_keeps_unit_norm_and_its_endpoints():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert torch.allclose(slerp(a, b, t).norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    # constant angular speed: at t the angle from a is t times the whole angle
    whole = torch.acos((a * b).sum(-1))
    part = torch.acos((a * slerp(a, b, 0.3)).sum(-1).clamp(-1, 1))
    assert torch.allclose(part, 0.3 * whole, atol=1e-4)


def test_slerp_of_parallel_or_zero_vectors_is_linear():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(slerp(a, b, 0.5), 0.5 * a + 0.5 * b)


def test_pooled_of_a_weighted_list_is_folded_slerp():
    p = [cond(name, 4, i) for i, name in enumerate("abc")]
    mixed = blend_conditionings([(p[0], 0.2), (p[1], 0.3), (p[2], 0.5)])
    expected = slerp(slerp(p[0].pooled, p[1].pooled, 0.3 / 0.5), p[2].pooled, 0.5)
    assert torch.allclose(mixed.pooled, expected, atol=1e-6)
    assert torch.allclose(mixed.text, 0.2 * p[0].text + 0.3 * p[1].text + 0.5 * p[2].text, atol=1e-6)


def test_normalize_blend_merges_drops_zeros_and_refuses_bad_weights():
    assert normalize_blend([("a cat", 3), ("a dog", 1), ("a cat ", 0), ("a bird", 0)]) == (("a cat", 0.75), ("a dog", 0.25))
    for bad, words in [([("a", -1)], "weight"), ([("a", math.nan)], "weight"), ([("a", 0)], "positive"),
                       ([(" ", 1)], "empty"), ([], "positive"), ([("a", True)], "weight")]:
        with pytest.raises(ValueError, match=words):
            normalize_blend(bad)


def test_mix_moves_weights_and_drops_what_reaches_zero():
    a, b = normalize_blend([("x", 1), ("y", 1)]), single("z")
    assert mix(a, b, 0.5) == (("x", 0.25), ("y", 0.25), ("z", 0.5))
    assert mix(a, b, 1.0) == (("z", 1.0),)
    assert blend_label(mix(a, b, 0.5)) == "x:0.25 | y:0.25 | z:0.50"


# -- the blender: transitions --------------------------------------------------------------------------------

class Encoder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str) -> Conditioning:
        self.calls.append(text)
        return cond(text, 3 + len(text) % 5, sum(map(ord, text)))


def test_transition_over_three_sections_ends_exactly_at_the_target():
    encode = Encoder()
    blender = PromptBlender(encode, "old")
    assert blender.advance() == (single("old"), None)  # nothing asked: nothing changes
    assert blender.start(single("new"), 3) == 3
    steps = [blender.advance() for _ in range(4)]
    weights = [dict(blend).get("new", 0.0) for blend, _ in steps]
    assert weights == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert steps[3][1] is None  # the transition is over: the conditioning stays
    assert_same(steps[2][1], encode("new"))
    assert_same(steps[0][1], blend_conditionings([(encode("old"), 2 / 3), (encode("new"), 1 / 3)]))
    assert encode.calls[:2] == ["old", "new"]  # each text encoded once while in play


def test_a_new_prompt_mid_transition_starts_from_the_blend_in_use():
    blender = PromptBlender(Encoder(), "a")
    blender.start(single("b"), 4)
    in_use, _ = blender.advance()  # a 0.75, b 0.25
    blender.start(single("c"), 2)
    first, _ = blender.advance()
    assert dict(first) == pytest.approx({"a": 0.375, "b": 0.125, "c": 0.5})  # halfway from (a .75, b .25)
    last, _ = blender.advance()
    assert last == (("c", 1.0),) and blender.transition is None


def test_no_transition_and_same_target_and_encodings_forgotten():
    encode = Encoder()
    blender = PromptBlender(encode, "a", first=encode("a"))
    assert blender.start(single("a"), 5) == 0 and blender.advance()[1] is None
    assert blender.start(single("b"), 0) == 1  # 0 sections: at the next section
    blend, conditioning = blender.advance()
    assert blend == single("b") and conditioning.prompt == "b"
    assert set(blender._encoded) == {"b"}  # "a" left play, its encoding with it


# -- timelines -----------------------------------------------------------------------------------------------

def test_entry_sections_forward_endless_and_finite():
    start = lambda k: 1.2 * k + 0.03  # section starts of an F1 stream (seconds)
    assert entry_sections([0.0, 3.5, 3.6, 7.0], start, 0, None) == [0, None, 3, 6]
    assert entry_sections([0.0, 1.0, 3.5], start, 2, None) == [None, 2, 3]  # past: the one in force, at once
    assert entry_sections([0.0, 3.5, 60.0], start, 0, 3) == [0, None, None]  # the clip ends after section 2
    assert entry_sections([0.0, 1e9], start, 0, None) == [0, math.ceil((1e9 - 0.03) / 1.2)]
    backward = lambda k: [2.4, 1.2, 0.03][k]  # inverted clips sample end-first
    assert entry_sections([0.0, 2.0], backward, 0, 3) == [1, 0]


# -- on the tiny model: VideoStream.set_prompt(..., transition_sections), weighted lists, timelines -------------

@pytest.fixture(scope="module")
def pipe(stream_pipe):
    return stream_pipe  # the tiny pipeline, loaded and warmed once for the whole run (tests/conftest.py)


@pytest.fixture
def image():
    img = np.full((64, 64, 3), 30, np.uint8)
    img[24:40, 8:24] = (220, 40, 40)
    return img


class NoDecode:
    """Stands in for the VAE decoder: these tests look at conditioning, and on 2 loaded cores the tiny VAE's
    decode takes 10-20x as long as sampling a 1-step section."""

    direction = "forward"

    def push(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(frames=torch.zeros(0, 8, 8, 3, dtype=torch.uint8), start=0)

    def finish(self) -> SimpleNamespace:
        return self.push(None)


def tiny_stream(pipe, image):
    stream = pipe.stream(image, "a red ball moves right", steps=1, decode_overlap=False)
    stream._decoder = NoDecode()
    return stream


def recorded(stream) -> list[Conditioning]:
    """The conditionings the stream hands its generator, in order."""
    seen, set_conditioning = [], stream._gen.set_conditioning

    def record(c: Conditioning) -> int:
        seen.append(c)
        return set_conditioning(c)

    stream._gen.set_conditioning = record
    return seen


def test_video_stream_transition_ends_exactly_at_the_new_prompt(pipe, image):
    stream = tiny_stream(pipe, image)
    seen = recorded(stream)
    next(stream)
    assert stream.set_prompt("a red ball moves left", transition_sections=3) == 1
    sections = [next(stream) for _ in range(4)]
    assert [dict(s.blend).get("a red ball moves left", 0.0) for s in sections] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    assert sections[0].prompt == "a red ball moves right:0.67 | a red ball moves left:0.33"
    assert sections[2].prompt == sections[3].prompt == "a red ball moves left"
    assert len(seen) == 3  # one conditioning per transition section, none once it is over
    assert_same(seen[2], pipe.conditioning("a red ball moves left", stream._image_embeds))
    old, new = (pipe.conditioning(t, stream._image_embeds) for t in ("a red ball moves right", "a red ball moves left"))
    assert torch.allclose(seen[1].text, blend_conditionings([(old, 1 / 3), (new, 2 / 3)]).text)


def test_weighted_list_with_one_weight_one_equals_the_plain_prompt(pipe, image):
    stream = tiny_stream(pipe, image)
    seen = recorded(stream)
    stream.set_prompt([("a red ball moves left", 1.0), ("a red ball grows", 0.0)])
    section = next(stream)
    assert section.prompt == "a red ball moves left" and section.blend == (("a red ball moves left", 1.0),)
    assert_same(seen[0], pipe.conditioning("a red ball moves left", stream._image_embeds))
    stream.set_prompt([("a red ball moves left", 1.0), ("a red ball grows", 3.0)])
    assert next(stream).blend == (("a red ball moves left", 0.25), ("a red ball grows", 0.75))
    with pytest.raises(ValueError, match="weight"):
        stream.set_prompt([("a red ball", -1.0)])
    with pytest.raises(ValueError, match="transition_sections"):
        stream.set_prompt("a red ball", transition_sections=-2)


def test_timeline_set_mid_stream_applies_at_video_times(pipe, image):
    from framepack_rt.pipeline.media import parse_prompt_schedule

    stream = tiny_stream(pipe, image)
    next(stream)  # section 0; section k starts at (36 k + 1) / 30 s
    plan = stream.set_prompt_schedule(parse_prompt_schedule("0:a ball;0.5:a ball grows;2.4:a ball shrinks"))
    assert plan == (1, [None, 1, 2])  # "a ball" was superseded at 0.5 s, before the next section (1.23 s)
    prompts = [next(stream).prompt for _ in range(3)]
    assert prompts == ["a ball grows", "a ball shrinks", "a ball shrinks"]
    stream.set_prompt("a ball stays still")  # held: the timeline has no entry left to take over
    assert next(stream).prompt == "a ball stays still"
    assert stream.set_prompt_schedule(None) == (5, []) and next(stream).prompt == "a ball stays still"


def test_generate_warns_about_entries_that_never_take_over(capsys):
    """``generate --prompt-schedule``: entries inside the video that no section start reaches are named too
    (the existing warning covers entries past the end)."""
    import argparse

    from framepack_rt.commands.generate import warn_unused_entries
    from framepack_rt.pipeline.media import parse_prompt_schedule

    schedule = parse_prompt_schedule("0:a ball rolls;3.5:the ball stops;5:the ball grows;9:never")
    for mode in ("f1", "inverted"):  # 5 sections of 9 latents start at 0.03, 1.23, 2.43, 3.63 and 4.83 s
        warn_unused_entries(schedule, schedule[3:], argparse.Namespace(window=9, mode=mode, end_image=None), 5)
        err = capsys.readouterr().err
        assert "entries at 5 s are not used" in err and "(at 0.03, 1.23, 2.43, 3.63, 4.83 s)" in err
        assert " 9" not in err and "3.5" not in err
    warn_unused_entries(schedule[:2], [], argparse.Namespace(window=9, mode="f1", end_image=None), 5)
    assert capsys.readouterr().err == ""
