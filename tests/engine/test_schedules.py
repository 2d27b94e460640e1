"""Section schedules: layouts, index tensors, padding sequences, section and frame counts."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.engine.schedules import (
    F1_PATTERN,
    GEOMETRIC_PATTERN,
    VANILLA_PATTERN,
    CompressionPattern,
    Order,
    SectionLayout,
    custom_schedule,
    f1_layout,
    f1_schedule,
    forward_layout,
    inverted_layout,
    inverted_schedule,
    latent_paddings,
    num_sections,
    vanilla_layout,
    vanilla_schedule,
    video_frames_for_latents,
)


def r(a: int, b: int) -> list[int]:
    return list(range(a, b))


def as_lists(layout: SectionLayout) -> dict:
    return {k: (None if v is None else v.tolist()) for k, v in layout.indices().items()}


def check_index_tensors(layout: SectionLayout) -> None:
    for value in layout.indices().values():
        if value is not None:
            assert value.dtype == torch.int64 and value.dim() == 1


# ------------------------------------------------------------------------------------------------- F1
def test_f1_layout_pinned():
    layout = f1_layout(9)
    assert layout.order is Order.FORWARD
    assert layout.names == ("start", "history_4x", "history_2x", "clean_1x", "noisy")
    assert layout.splits == (1, 16, 2, 1, 9)
    assert layout.length == 29
    assert layout.num_history == 19
    assert as_lists(layout) == {
        "indices_latents": r(20, 29),
        "indices_latents_clean": [0, 19],
        "indices_latents_history_2x": [17, 18],
        "indices_latents_history_4x": r(1, 17),
    }
    assert layout.history_slices == {
        "history_4x": slice(0, 16),
        "history_2x": slice(16, 18),
        "clean_1x": slice(18, 19),
    }
    check_index_tensors(layout)


@pytest.mark.parametrize("window", [1, 5, 9, 16], ids=lambda w: f"w={w}")
def test_f1_layout_matches_demo_split(window):
    # The released F1 demo: arange(0, 1+16+2+1+w).split([1, 16, 2, 1, w]); clean = cat(start, 1x).
    start, i4, i2, i1, noisy = torch.arange(0, 1 + 16 + 2 + 1 + window).split([1, 16, 2, 1, window])
    got = f1_layout(window).indices()
    assert torch.equal(got["indices_latents"], noisy)
    assert torch.equal(got["indices_latents_clean"], torch.cat([start, i1]))
    assert torch.equal(got["indices_latents_history_2x"], i2)
    assert torch.equal(got["indices_latents_history_4x"], i4)


def test_f1_indices_same_every_section():
    schedule = f1_schedule(9)
    first = as_lists(schedule.layout(0))
    for k in (1, 2, 50, 10_000):
        assert as_lists(schedule.layout(k)) == first
    assert schedule.latent_paddings is None
    assert not schedule.is_last(10_000)


# ------------------------------------------------------------------------------------------- inverted
EXPECTED_PADDINGS = {
    1: [0],
    2: [1, 0],
    3: [2, 1, 0],
    4: [3, 2, 1, 0],
    5: [3, 2, 2, 1, 0],
    6: [3, 2, 2, 2, 1, 0],
    7: [3, 2, 2, 2, 2, 1, 0],
    8: [3, 2, 2, 2, 2, 2, 1, 0],
    9: [3, 2, 2, 2, 2, 2, 2, 1, 0],
    10: [3, 2, 2, 2, 2, 2, 2, 2, 1, 0],
}


@pytest.mark.parametrize("n", sorted(EXPECTED_PADDINGS), ids=lambda n: f"n={n}")
def test_latent_paddings_literal(n):
    assert latent_paddings(n) == EXPECTED_PADDINGS[n]
    assert inverted_schedule(n).latent_paddings == tuple(EXPECTED_PADDINGS[n])


@pytest.mark.parametrize("n", [0, -1], ids=lambda n: f"n={n}")
def test_latent_paddings_rejects_no_sections(n):
    with pytest.raises(ValueError):
        latent_paddings(n)


# Literal index layouts of the inverted demo (w = 9): split [1, pad, 9, 1, 2, 16].
EXPECTED_INVERTED = {
    0: {  # last section: no blank
        "indices_latents": r(1, 10),
        "indices_latents_clean": [0, 10],
        "indices_latents_history_2x": [11, 12],
        "indices_latents_history_4x": r(13, 29),
    },
    1: {
        "indices_latents": r(10, 19),
        "indices_latents_clean": [0, 19],
        "indices_latents_history_2x": [20, 21],
        "indices_latents_history_4x": r(22, 38),
    },
    2: {
        "indices_latents": r(19, 28),
        "indices_latents_clean": [0, 28],
        "indices_latents_history_2x": [29, 30],
        "indices_latents_history_4x": r(31, 47),
    },
    3: {
        "indices_latents": r(28, 37),
        "indices_latents_clean": [0, 37],
        "indices_latents_history_2x": [38, 39],
        "indices_latents_history_4x": r(40, 56),
    },
}


@pytest.mark.parametrize("padding", sorted(EXPECTED_INVERTED), ids=lambda p: f"padding={p}")
def test_inverted_layout_literal(padding):
    layout = inverted_layout(padding, 9)
    assert layout.names == ("start", "blank", "noisy", "clean_1x", "history_2x", "history_4x")
    assert layout.splits == (1, 9 * padding, 9, 1, 2, 16)
    assert layout.segment("blank") == range(1, 1 + 9 * padding)
    assert layout.num_history == 19
    assert as_lists(layout) == EXPECTED_INVERTED[padding]
    assert layout.history_slices == {
        "clean_1x": slice(0, 1),
        "history_2x": slice(1, 3),
        "history_4x": slice(3, 19),
    }
    check_index_tensors(layout)


def demo_inverted_indices(latent_padding: int, w: int) -> dict:
    """The released inverted demo's index code, verbatim in structure."""
    pad = latent_padding * w
    indices = torch.arange(0, sum([1, pad, w, 1, 2, 16])).unsqueeze(0)
    pre, _blank, latent, post, i2, i4 = indices.split([1, pad, w, 1, 2, 16], dim=1)
    return {
        "indices_latents": latent[0].tolist(),
        "indices_latents_clean": torch.cat([pre, post], dim=1)[0].tolist(),
        "indices_latents_history_2x": i2[0].tolist(),
        "indices_latents_history_4x": i4[0].tolist(),
    }


@pytest.mark.parametrize("has_end_frame", [False, True], ids=["no-end", "end-frame"])
@pytest.mark.parametrize("n", [1, 3, 5, 10], ids=lambda n: f"n={n}")
@pytest.mark.parametrize("window", [9, 4], ids=lambda w: f"w={w}")
def test_inverted_schedule_indices_follow_demo(n, window, has_end_frame):
    schedule = inverted_schedule(n, window, has_end_frame=has_end_frame)
    assert schedule.has_end_frame is has_end_frame
    layouts = list(schedule.layouts())
    assert len(layouts) == n
    for k, layout in enumerate(layouts):
        assert layout.latent_padding == EXPECTED_PADDINGS[n][k]
        # An end frame changes the history contents, never the indices.
        assert as_lists(layout) == demo_inverted_indices(EXPECTED_PADDINGS[n][k], window)
        assert schedule.is_last(k) == (k == n - 1) == (layout.latent_padding == 0)
        assert schedule.prepends_start(k) == (k == n - 1)
    with pytest.raises(IndexError):
        schedule.layout(n)


def test_end_frame_only_for_inverted():
    with pytest.raises(ValueError):
        custom_schedule(F1_PATTERN, order="forward", has_end_frame=True)


def test_inverted_needs_section_count():
    with pytest.raises(ValueError):
        custom_schedule(F1_PATTERN, order="inverted", num_sections=None)


# -------------------------------------------------------------------------------------------- vanilla
def test_vanilla_layout_pinned():
    layout = vanilla_layout(9)
    assert layout.pattern == VANILLA_PATTERN
    assert layout.splits == (0, 16, 2, 1, 9)
    assert layout.length == 28
    assert layout.num_history == 19
    assert as_lists(layout) == {
        "indices_latents": r(19, 28),
        "indices_latents_clean": [18],  # the newest history latent only: no start slot
        "indices_latents_history_2x": [16, 17],
        "indices_latents_history_4x": r(0, 16),
    }
    schedule = vanilla_schedule(9)
    assert schedule.order is Order.FORWARD and schedule.layout(7) == layout


def test_inverted_rejects_pattern_without_start_slot():
    with pytest.raises(ValueError):
        inverted_layout(1, 9, VANILLA_PATTERN)


# ------------------------------------------------------------------------------------------- custom
def test_geometric_forward_layout():
    layout = forward_layout(GEOMETRIC_PATTERN, 9)
    assert layout.num_history == 14
    assert layout.splits == (1, 8, 4, 2, 9)
    assert as_lists(layout) == {
        "indices_latents": r(15, 24),
        "indices_latents_clean": [0, 13, 14],
        "indices_latents_history_2x": [9, 10, 11, 12],
        "indices_latents_history_4x": r(1, 9),
    }
    assert layout.history_slices == {
        "history_4x": slice(0, 8),
        "history_2x": slice(8, 12),
        "clean_1x": slice(12, 14),
    }


def test_geometric_inverted_layout():
    layout = custom_schedule(GEOMETRIC_PATTERN, 9, order="inverted", num_sections=3).layout(1)
    assert layout.latent_padding == 1
    assert layout.splits == (1, 9, 9, 2, 4, 8)
    assert as_lists(layout) == {
        "indices_latents": r(10, 19),
        "indices_latents_clean": [0, 19, 20],
        "indices_latents_history_2x": r(21, 25),
        "indices_latents_history_4x": r(25, 33),
    }
    assert layout.history_slices == {
        "clean_1x": slice(0, 2),
        "history_2x": slice(2, 6),
        "history_4x": slice(6, 14),
    }


def test_zero_sized_segments_give_none():
    pattern = CompressionPattern(num_1x=0, num_2x=0, num_4x=4, start_full_resolution=True)
    layout = forward_layout(pattern, 3)
    assert layout.splits == (1, 4, 0, 0, 3)
    assert as_lists(layout) == {
        "indices_latents": [5, 6, 7],
        "indices_latents_clean": [0],
        "indices_latents_history_2x": None,
        "indices_latents_history_4x": [1, 2, 3, 4],
    }
    no_clean = forward_layout(CompressionPattern(0, 2, 0, start_full_resolution=False), 2)
    assert as_lists(no_clean) == {
        "indices_latents": [2, 3],
        "indices_latents_clean": None,
        "indices_latents_history_2x": [0, 1],
        "indices_latents_history_4x": None,
    }


@pytest.mark.parametrize("bad", [dict(num_1x=-1), dict(num_2x=1.5), dict(num_4x=True)], ids=["negative", "float", "bool"])
def test_pattern_validation(bad):
    with pytest.raises(ValueError):
        CompressionPattern(**bad)


def test_layouts_are_hashable_values():
    assert f1_layout(9) == forward_layout(F1_PATTERN, 9)
    assert len({f1_layout(9), forward_layout(F1_PATTERN, 9), vanilla_layout(9), inverted_layout(0)}) == 3


# ---------------------------------------------------------------------------------- counts and frames
@pytest.mark.parametrize(
    "seconds, window, expected",
    [
        (5, 9, 4),  # 150 / 36 = 4.17
        (1, 9, 1),  # 0.83
        (0.5, 9, 1),  # 0.42 rounds to 0 -> at least 1
        (0, 9, 1),
        (2, 9, 2),  # 1.67
        (3, 9, 2),  # exactly 2.5: Python's round is half-to-even, as in the demo
        (60, 9, 50),  # 1800 / 36
        (5, 5, 8),  # 150 / 20 = 7.5 -> 8 (even)
    ],
    ids=lambda v: str(v),
)
def test_num_sections(seconds, window, expected):
    assert num_sections(seconds, window) == expected


def test_num_sections_fps():
    assert num_sections(5, 9, fps=60) == 8  # 300 / 36 = 8.33


@pytest.mark.parametrize("latents, frames", [(0, 0), (1, 1), (9, 33), (10, 37), (18, 69), (37, 145)], ids=lambda v: str(v))
def test_video_frames_for_latents(latents, frames):
    assert video_frames_for_latents(latents) == frames


def test_inverted_five_seconds_is_145_frames():
    n = num_sections(5, 9)
    assert n == 4
    schedule = inverted_schedule(n, 9)
    assert [schedule.section_frames(k) for k in range(n)] == [33, 36, 36, 40]
    assert [schedule.output_latents(k) for k in range(n)] == [9, 18, 27, 37]
    assert schedule.total_frames() == 145
    assert sum(schedule.section_frames(k) for k in range(n)) == 145


@pytest.mark.parametrize("n", [1, 2, 7], ids=lambda n: f"n={n}")
def test_inverted_total_frames_rule(n):
    schedule = inverted_schedule(n, 9)
    assert schedule.total_frames() == 4 * n * 9 + 1
    assert sum(schedule.section_frames(k) for k in range(n)) == 4 * n * 9 + 1


def test_f1_frames():
    schedule = f1_schedule(9)
    assert [schedule.section_frames(k) for k in range(4)] == [33, 36, 36, 36]
    # With the start frame decoded in front (what the F1 demo writes): 37 first, then 36.
    assert [schedule.section_frames(k, include_start_frame=True) for k in range(3)] == [37, 36, 36]
    assert f1_schedule(5).section_frames(0) == 17 and f1_schedule(5).section_frames(1) == 20
    with pytest.raises(ValueError):
        schedule.total_frames()
    assert f1_schedule(9, num_sections=4).total_frames() == 141
    assert f1_schedule(9, num_sections=4).total_frames(include_start_frame=True) == 145
