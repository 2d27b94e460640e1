"""The demo's synthetic world: rendered motion matches the prompt, timelines, determinism, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from framepack_rt.demo.world import (
    COLOURS,
    MOTIONS,
    REVERSE,
    WorldConfig,
    WorldObject,
    all_prompts,
    first_frame_of_latent,
    frames_for_latents,
    latent_of_frame,
    make_clip,
    parse_prompt,
    render,
    simulate,
    start_image,
    vocabulary,
)


def red_centroid(frames: np.ndarray) -> np.ndarray:
    """(T, 2) x, y of the strongly red pixels: measured on the pixels, independently of the tracks."""
    f = frames.astype(np.int32)
    red = (f[..., 0] > 150) & (f[..., 1] < 90) & (f[..., 2] < 90)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    n = red.sum(axis=(1, 2))
    return np.stack([(red * xs).sum(axis=(1, 2)) / n, (red * ys).sum(axis=(1, 2)) / n], axis=1)


def red_area(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.int32)
    return ((f[..., 0] > 150) & (f[..., 1] < 90) & (f[..., 2] < 90)).sum(axis=(1, 2))


@pytest.mark.parametrize("motion, axis, sign", [("moves right", 0, 1), ("moves left", 0, -1), ("moves down", 1, 1),
                                                ("moves up", 1, -1)])
def test_rendered_motion_follows_the_prompt(motion, axis, sign):
    went = 0
    for seed in range(6):
        # 29 frames: the first prompt change can come at frame 29 at the earliest (8 latents)
        clip = make_clip(seed, 29, num_objects=1, first_prompt=f"a red ball {motion}")
        assert clip.timeline == [(0, f"{clip.timeline[0][1].split()[0]} red ball {motion}")]
        c = red_centroid(clip.frames)
        assert np.allclose(c, clip.centers[:, 0], atol=0.5)  # the pixels agree with the track
        assert np.all(sign * np.diff(c[:, axis]) > -0.3)  # never against the prompt
        assert np.allclose(c[:, 1 - axis], c[0, 1 - axis], atol=0.3)  # and not sideways
        went += sign * (c[-1, axis] - c[0, axis]) > 5
    assert went >= 3  # most random starts have room to move 5 px of the 18 px the prompt asks


def test_moving_from_the_centre_covers_speed_times_frames():
    cfg = WorldConfig()
    for motion, axis, sign in (("moves right", 0, 1), ("moves left", 0, -1), ("moves up", 1, -1)):
        objects = [WorldObject("ball", "red")]
        states = np.array([[32.0, 32.0, 6.0]])
        centers, radii, _ = simulate(objects, states, [(0, 0, motion)], 16, cfg)
        frames = render(objects, (25, 25, 30), centers, radii, cfg.size)
        c = red_centroid(frames)
        assert sign * (c[-1, axis] - c[0, axis]) == pytest.approx(15 * cfg.speed * cfg.size, abs=0.3)
        assert c[-1, 1 - axis] == pytest.approx(32.0, abs=0.2)


def test_moving_stops_at_the_edge_and_stays_inside():
    cfg = WorldConfig()
    objects = [WorldObject("square", "red")]
    centers, radii, _ = simulate(objects, np.array([[50.0, 20.0, 6.0]]), [(0, 0, "moves right")], 120, cfg)
    x = centers[:, 0, 0]
    assert np.all(np.diff(x) >= 0) and x[-1] == x[-30]  # reached the edge, then still
    assert x[-1] + radii[-1, 0] <= cfg.size - 1


def test_a_negative_margin_stops_objects_partly_outside_the_frame():
    cfg = WorldConfig(margin=-0.05)  # train encode --world-margin: clips of objects pressed past the edge
    objects = [WorldObject("ball", "red")]
    centers, radii, _ = simulate(objects, np.array([[50.0, 20.0, 6.0]]), [(0, 0, "moves right")], 120, cfg)
    x = centers[:, 0, 0]
    assert x[-1] == x[-30] and x[-1] == pytest.approx(cfg.size - 1 - 6.0 + 0.05 * cfg.size)
    assert x[-1] + radii[-1, 0] > cfg.size - 1
    for margin in (-0.07, 0.25, float("nan")):  # the smallest ball's centre off the frame; no room; not a number
        with pytest.raises(ValueError, match="--world-margin"):
            WorldConfig(margin=margin)


def test_bounce_grow_shrink_still():
    cfg = WorldConfig()
    obj = [WorldObject("ball", "red")]
    start = np.array([[32.0, 40.0, 6.0]])
    c, r, _ = simulate(obj, start, [(0, 0, "bounces")], cfg.hop_frames * 2 + 1, cfg)
    y = c[:, 0, 1]
    assert y.min() == pytest.approx(40.0 - cfg.hop_height * cfg.size, abs=0.5) and y.max() == pytest.approx(40.0)
    assert y[cfg.hop_frames] == pytest.approx(40.0, abs=1e-3) and np.all(c[:, 0, 0] == 32.0)
    c, r, _ = simulate(obj, start, [(0, 0, "grows")], 20, cfg)
    area = red_area(render(obj, (25, 25, 30), c, r, cfg.size))
    assert np.all(np.diff(r[:, 0]) > 0) and area[-1] > 1.5 * area[0]
    c, r, _ = simulate(obj, start, [(0, 0, "shrinks")], 20, cfg)
    assert np.all(np.diff(r[:, 0]) <= 0) and r[1, 0] < r[0, 0]
    assert r[-1, 0] == pytest.approx(cfg.min_radius * cfg.size)  # shrank down to the smallest size, then held
    c, r, _ = simulate(obj, start, [(0, 0, "stays still")], 20, cfg)
    frames = render(obj, (25, 25, 30), c, r, cfg.size)
    assert np.array_equal(frames[0], frames[-1])


def test_only_the_subject_moves():
    clip = make_clip(5, frames_for_latents(30), num_objects=3)
    for (start, prompt), nxt in zip(clip.timeline, [f for f, _ in clip.timeline[1:]] + [len(clip.frames)]):
        subject = clip.subjects[start]
        colour, shape, _ = parse_prompt(prompt)
        assert (clip.objects[subject].colour, clip.objects[subject].shape) == (colour, shape)
        others = [i for i in range(3) if i != subject]
        seg = slice(max(start - 1, 0), nxt)
        assert np.allclose(clip.centers[seg, others], clip.centers[max(start - 1, 0), others])


def test_timeline_lands_on_latent_boundaries_and_prompts_per_latent():
    clip = make_clip(11, frames_for_latents(80))
    frames = [f for f, _ in clip.timeline]
    assert frames[0] == 0 and len(frames) > 2 and all(f % 4 == 1 for f in frames[1:])
    assert clip.num_latents == 80
    for f, prompt in clip.timeline:
        j = latent_of_frame(f)
        assert first_frame_of_latent(j) == f and clip.prompt_at_latent(j) == prompt
        assert clip.prompt_at(f - 1) != prompt or f == 0
    lengths = np.diff(clip.change_latents())
    cfg = WorldConfig()
    assert np.all((lengths >= cfg.min_segment_latents) & (lengths <= cfg.max_segment_latents))
    assert clip.change_latents() == [latent_of_frame(f) for f in frames]


def _changes(clip) -> list[tuple[int, int, int, str, str]]:
    """(frame, subject after, subject before, motion before, motion after) of each prompt change."""
    return [(f, int(clip.subjects[f]), int(clip.subjects[f - 1]), parse_prompt(before)[2], parse_prompt(after)[2])
            for (_, before), (f, after) in zip(clip.timeline, clip.timeline[1:])]


def test_turns_keep_the_subject_and_reverse_its_motion():
    turns = changes = 0
    for seed in range(6):
        random, turning = make_clip(seed, frames_for_latents(90)), make_clip(seed, frames_for_latents(90),
                                                                             WorldConfig(turn_rate=1.0))
        assert random.objects == turning.objects and random.background == turning.background  # the same scene
        assert parse_prompt(random.timeline[0][1]) == parse_prompt(turning.timeline[0][1])
        for f, subject, previous, before, after in _changes(turning):
            changes += 1
            if subject == previous and REVERSE.get(before) == after:
                turns += 1
                if after in ("moves left", "moves right"):  # the object really goes back the way it came
                    x = turning.centers[:, subject, 0]
                    came, goes = np.sign(x[f - 1] - x[f - 9]), np.sign(x[f + 8] - x[f])
                    assert goes == -came or came == 0  # (0: it had stopped at the edge)
        random_turns = sum(s == p and REVERSE.get(b) == a for _, s, p, b, a in _changes(random))
        assert random_turns <= 2
    assert changes >= 12 and turns / changes > 0.6  # the rest: a reverse with no room, or none (bounces, still)


def test_turn_rate_zero_draws_the_clips_it_always_drew():
    """The setting's default leaves the random stream alone, so the caches made before it are reproducible:
    the timelines below are what make_clip drew before turn_rate existed (commit 4c3d601)."""
    import framepack_rt.demo.world as W

    rng, fresh = np.random.default_rng(5), np.random.default_rng(5)
    states = np.array([[30.0, 30.0, 6.0]])
    assert W._turn(rng, [(0, 0, "moves right")], states, W._Limits(WorldConfig()), WorldConfig()) is None
    assert rng.random() == fresh.random()
    assert make_clip(3, frames_for_latents(60)).timeline == [
        (0, "a blue square bounces"), (53, "the blue square moves right"), (89, "the blue square moves up"),
        (133, "a green square moves down"), (217, "a red ball moves right")]
    assert make_clip(11, frames_for_latents(60)).timeline == [
        (0, "the blue square stays still"), (29, "a blue square moves down"), (101, "the blue square moves up"),
        (193, "a blue square moves left")]


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_turn_rate_is_a_probability(rate):
    with pytest.raises(ValueError, match="turn_rate is a probability"):
        WorldConfig(turn_rate=rate)


def test_deterministic_and_seed_dependent():
    a, b = make_clip(7, 61), make_clip(7, 61)
    assert np.array_equal(a.frames, b.frames) and a.timeline == b.timeline
    c = make_clip(8, 61)
    assert not np.array_equal(a.frames, c.frames)


def test_render_is_antialiased_and_uses_the_palette():
    objects = [WorldObject("ball", "red"), WorldObject("square", "blue")]
    centers = np.array([[[20.3, 20.7], [45.0, 40.0]]], np.float32)
    frames = render(objects, (25, 25, 30), centers, np.array([[7.0, 6.5]], np.float32), 64)
    f = frames[0]
    assert tuple(f[20, 20]) == COLOURS["red"] and tuple(f[40, 45]) == COLOURS["blue"] and tuple(f[0, 0]) == (25, 25, 30)
    colours = {tuple(p) for p in f.reshape(-1, 3)}
    assert len(colours) > 4  # edge pixels blend: anti-aliased, not 3 hard colours
    # A square with half-side 6.5 centred on a pixel centre covers exactly 13 x 13 pixels' worth of blue.
    cover = (f[..., 2].astype(np.float32) - 30) / (230 - 30)
    assert cover[30:51, 35:56].sum() == pytest.approx(169.0, abs=0.5)


def test_vocabulary_and_prompts():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 2 * 4 * 2 * len(MOTIONS)
    assert {"red", "ball", "square", "bounces", "still", "left"} <= set(vocabulary())
    assert parse_prompt("The Blue square stays still") == ("blue", "square", "stays still")
    with pytest.raises(ValueError):
        parse_prompt("a purple ball moves right")


def test_start_image_places_the_named_object():
    image, clip = start_image(3, "a red ball moves right", x=0.25, y=0.5)
    assert image.shape == (64, 64, 3) and clip.objects[0] == WorldObject("ball", "red")
    c = red_centroid(image[None])[0]
    assert c == pytest.approx([16.0, 32.0], abs=0.6)
