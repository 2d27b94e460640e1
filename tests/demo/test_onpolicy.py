"""On-policy windows (demo/onpolicy.py): section-aligned scenes, tracking by colour, the world carrying objects
on from where the model left them, targets encoded exactly as whole clips are, and the trainer reading them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framepack_rt.demo import DEMO_SIZE
from framepack_rt.demo import onpolicy as O
from framepack_rt.demo import train as T
from framepack_rt.demo.data import encode_video
from framepack_rt.demo.world import BACKGROUND_NAMES, BACKGROUNDS, MOTIONS, REVERSE, WorldConfig, _Limits, parse_prompt


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prompts_change_only_at_section_boundaries(seed):
    scene = O.section_scene(seed, 4, window=9)
    per = scene.frames_per_section
    assert len(scene.prompts) == 4 and len(scene.clip.frames) == 1 + 4 * per
    assert [f for f, _, _ in scene.plan][0] == 0
    assert all((f - 1) % per == 0 for f, _, _ in scene.plan[1:])
    for f, subject, motion in scene.plan:  # each prompt names its subject and motion
        section = 0 if f == 0 else (f - 1) // per
        colour, shape, said = parse_prompt(scene.prompts[section])
        assert said == motion in MOTIONS and scene.clip.objects[subject].colour == colour
    assert scene.clip.prompt_at(per * 2 + 1) == scene.prompts[2]


def test_tracking_finds_the_worlds_objects_at_its_size_and_the_decoders():
    errors = []
    for seed in range(6):
        clip = O.section_scene(seed, 3).clip
        big = np.repeat(np.repeat(clip.frames, 2, axis=1), 2, axis=2)  # a 2x decoder's frame of the same scene
        for frames in (clip.frames, big):
            errors.append(np.linalg.norm(O.track_objects(frames, clip.objects, clip.radii, 64) - clip.centers, axis=-1))
    assert np.median(np.concatenate([e.ravel() for e in errors])) < 0.3  # px, where nothing overlaps


def test_an_object_that_vanishes_or_changes_colour_keeps_its_last_centre():
    clip = O.section_scene(1, 2).clip
    frames = clip.frames.copy()
    frames[10:20] = np.asarray(clip.background, np.uint8)  # gone
    shapes = np.any(frames[20:30] != np.asarray(clip.background, np.uint8), axis=-1)
    frames[20:30][shapes] = (150, 0, 150)  # every object turned purple, a colour the world has not
    tracked = O.track_objects(frames, clip.objects, clip.radii, 64)
    assert np.allclose(tracked[10:30], tracked[9], equal_nan=True)
    assert np.abs(tracked[40] - clip.centers[40]).max() < 1.0  # found again when it is back


def test_against_the_background_a_recoloured_object_is_still_found_where_it_is():
    scene = O.wall_turn_scene(4, 3, num_objects=1)
    clip = scene.clip
    frames = clip.frames.copy()
    shapes = np.any(frames[20:30] != np.asarray(clip.background, np.uint8), axis=-1)
    frames[20:30][shapes] = (230, 140, 20)  # the model turned it orange
    by_colour = O.find_objects(frames, clip.objects, clip.radii, 64)
    by_shape = O.find_objects(frames, clip.objects, clip.radii, 64, clip.background)
    assert np.isnan(by_colour[20:30]).all()
    assert np.abs(by_shape - clip.centers).max() < 0.5  # px (rasterised), every frame, the orange ones too
    frames[40:45] = np.asarray(clip.background, np.uint8)
    assert np.isnan(O.find_objects(frames, clip.objects, clip.radii, 64, clip.background)[40:45]).all()  # gone
    two = O.wall_turn_scene(0, 3, num_objects=2).clip
    with pytest.raises(ValueError, match="one-object"):
        O.find_objects(two.frames, two.objects, two.radii, 64, two.background)


def test_only_boundaries_where_every_object_is_found_through_the_lead_in_are_kept():
    clip = O.section_scene(1, 2).clip
    frames = clip.frames.copy()
    frames[30:33] = np.asarray(clip.background, np.uint8)  # every object gone for 3 frames
    found = O.find_objects(frames, clip.objects, clip.radii, 64)
    assert np.isnan(found[30:33]).all() and not np.isnan(found[:30]).any() and not np.isnan(found[33:]).any()
    assert O.found_through_lead_in(found, 29) and O.found_through_lead_in(found, 33 + O.LEAD_IN)
    for boundary in (30, 36, 32 + O.LEAD_IN):  # the gap inside [boundary - LEAD_IN, boundary]
        assert not O.found_through_lead_in(found, boundary)


@pytest.mark.parametrize("seed", [0, 2, 3])  # 0 and 3: bounces that carry on over a boundary; 2: growing
def test_with_the_worlds_own_centres_the_expert_draws_the_world(seed):
    scene = O.section_scene(seed, 4)
    per, clip = scene.frames_per_section, scene.clip
    for section in range(1, 4):
        drawn = O.expert_section(scene, section, clip.centers.astype(np.float64))
        world = clip.frames[per * section - O.LEAD_IN : per * (section + 1) + 1]  # the tail may be the next prompt
        assert len(drawn) == O.LEAD_IN + 1 + per + O.TAIL and np.array_equal(drawn[: len(world)], world)


def test_the_expert_carries_objects_on_from_where_the_model_left_them():
    scene = next(s for s in (O.section_scene(seed, 3) for seed in range(40))
                 if s.prompts[1].endswith("moves right") and s.prompts[1] != s.prompts[0]
                 and 16 < s.clip.centers[36, s.plan[1][1], 0] < 32)  # room on both sides
    clip, per = scene.clip, scene.frames_per_section
    subject = scene.plan[1][1]
    tracked = clip.centers.astype(np.float64).copy()
    tracked[per - 20 :, subject, 0] -= 4.0  # the model drew it 4 px short of the world
    tracked[per - 20 :, subject, 1] += 1.5
    drawn = O.expert_section(scene, 1, tracked)
    found = O.track_objects(drawn, clip.objects, clip.radii[per - O.LEAD_IN : 2 * per + 1 + O.TAIL], 64)[:, subject]
    assert np.abs(found[O.LEAD_IN] - tracked[per, subject]).max() < 0.3  # the lead-in ends where the model was
    step = np.diff(found[O.LEAD_IN:, 0])
    assert abs(step[:20].mean() - 0.01 * 64) < 0.05 and step.max() < 1.0  # on at the world's speed, no jump
    assert np.abs(found[O.LEAD_IN:, 1] - tracked[per, subject, 1]).max() < 0.3  # and only right


def test_with_a_turn_rate_changes_turn_the_subject_back_and_without_one_nothing_changes():
    turns = 0
    for seed in range(30):
        plain, turning = O.section_scene(seed, 6), O.section_scene(seed, 6, cfg=WorldConfig(turn_rate=1.0))
        assert plain.prompts == O.section_scene(seed, 6, cfg=WorldConfig(turn_rate=0.0)).prompts  # the old stream
        for (_, was_subject, was), (_, subject, motion) in zip(turning.plan, turning.plan[1:]):
            if motion == REVERSE.get(was) and subject == was_subject:
                turns += 1
    assert turns >= 20  # at rate 1 most changes after a reversible motion turn back (where it has room)


def test_scenes_are_drawn_on_the_chosen_backgrounds_and_by_default_on_all_of_them():
    dark, green = BACKGROUND_NAMES["dark"], BACKGROUND_NAMES["green"]
    free, chosen = set(), set()
    for seed in range(12):
        scene = O.wall_turn_scene(seed, 4, 9, WorldConfig(), 1, [dark, green])
        assert (scene.clip.frames[0, 0, 0] == scene.clip.background).all()  # a corner shows the background
        free.add(O.wall_turn_scene(seed, 4, num_objects=1).clip.background)
        chosen.add(scene.clip.background)
        assert O.section_scene(seed, 3, backgrounds=[dark]).clip.background == dark
    assert free == set(BACKGROUNDS) and chosen == {dark, green}
    with pytest.raises(ValueError, match="at least one background"):
        O.wall_turn_scene(0, 3, backgrounds=[])


@pytest.mark.parametrize("seed", range(8))
def test_a_wall_turn_scene_stops_its_subject_at_a_wall_then_turns_it_back(seed):
    scene = O.wall_turn_scene(seed, 6)
    lim, per = _Limits(WorldConfig()), scene.frames_per_section
    (_, subject, motion), (turn, again, back) = scene.plan
    hold = (turn - 1) // per
    assert again == subject and back == REVERSE[motion] and motion.startswith("moves") and 1 <= hold <= 5
    assert scene.prompts[:hold] == [scene.prompts[0]] * hold and set(scene.prompts[hold:]) == {scene.prompts[-1]}
    assert parse_prompt(scene.prompts[-1])[2] == back
    x, y = scene.clip.centers[turn - 1, subject]
    r = scene.clip.radii[turn - 1, subject]
    to_stop = {"moves right": lim.hi(r) - x, "moves left": x - lim.lo(r), "moves down": lim.hi(r) - y,
               "moves up": y - lim.lo(r)}[motion]
    assert abs(to_stop) < 1e-3  # pressed against the world's stop when it turns


@pytest.mark.parametrize("motion", ["moves right", "moves left"])
def test_the_expert_brings_an_object_pushed_past_the_worlds_stop_back_at_the_worlds_speed(motion):
    scene = next(s for s in (O.wall_turn_scene(seed, 3) for seed in range(60)) if s.plan[0][2] == "moves right"
                 and s.prompts[0] == s.prompts[1] != s.prompts[2] and len(s.clip.objects) == 1)
    section = 1 if motion == "moves right" else 2  # section 1 goes on pressing; section 2 turns back
    clip, per, lim = scene.clip, scene.frames_per_section, _Limits(WorldConfig())
    boundary = per * section
    tracked = clip.centers.astype(np.float64).copy()
    stop = lim.hi(float(clip.radii[boundary, 0]))
    tracked[boundary - 20 : boundary + 1, 0, 0] = stop + 3.0  # the model pushed it 3 px past the stop
    drawn = O.expert_section(scene, section, tracked)
    radii = np.repeat(clip.radii[boundary : boundary + 1], len(drawn), axis=0)  # a move keeps its radius
    x = O.track_objects(drawn, clip.objects, radii, 64)[O.LEAD_IN:, 0, 0]
    step = np.diff(x)
    assert abs(x[0] - (stop + 3.0)) < 0.3 and np.all(step < 0.05) and np.all(step > -0.64 - 0.1)  # never faster
    if motion == "moves right":
        assert abs(x[-1] - stop) < 0.3 and abs(step[:4].mean() + 0.64) < 0.1  # back to the stop, then held
    else:
        assert abs(step[:20].mean() + 0.64) < 0.1  # leftward at the world's speed, not twice it


@pytest.fixture(scope="module")
def demo_pipe():
    from framepack_rt.demo.evaluate import load_pipeline

    return load_pipeline("demo")


def test_a_section_encoded_from_its_lead_in_and_tail_equals_the_whole_clips_encode(demo_pipe):
    vae = demo_pipe.parts.vae()
    clip = O.section_scene(7, 4).clip
    whole = encode_video(vae.live, clip.frames, vae.scaling_factor)
    per = 36
    for section in (1, 2):
        part = encode_video(vae.live, clip.frames[per * section - O.LEAD_IN : per * (section + 1) + 1 + O.TAIL],
                            vae.scaling_factor)
        assert torch.equal(part[-10:-1], whole[1 + 9 * section : 1 + 9 * (section + 1)])
    short = encode_video(vae.live, clip.frames[per - O.LEAD_IN : 2 * per + 1], vae.scaling_factor)
    assert not torch.equal(short[-9:], whole[10:19])  # without the tail the last tile is cut short


def test_windows_hold_the_models_own_history_and_the_experts_target(demo_pipe):
    from framepack_rt.demo.evaluate import engine_run
    from framepack_rt.engine.schedules import f1_schedule

    scene = O.section_scene(11, 3, cfg=WorldConfig(size=DEMO_SIZE))  # scenes at the size the model generates
    with torch.no_grad():
        windows = O.scene_windows(demo_pipe, scene, seed=5)
        frames, latents = engine_run(demo_pipe, scene.clip.frames[0], scene.prompts, 5, None, f1_schedule(9),
                                     finish=True)
    assert len(windows) == 2 and [w.prompt for w in windows] == scene.prompts[1:]
    second = windows[1]
    assert second.history.shape == (16, 19, 12, 12) and second.target.shape == (16, 9, 12, 12)
    assert torch.equal(second.history, latents[:, :19].half())  # the start latent + 2 sections: its own
    assert not windows[0].history[:, :9].any() and torch.equal(windows[0].history[:, 9:], latents[:, :10].half())
    assert torch.equal(second.start, latents[:, :1].half())
    tracked = O.track_objects(frames[: len(scene.clip.frames)], scene.clip.objects, scene.clip.radii, DEMO_SIZE)
    vae = demo_pipe.parts.vae()
    target = encode_video(vae.live, O.expert_section(scene, 2, tracked), vae.scaling_factor)[-10:-1]
    assert torch.equal(second.target, target.transpose(0, 1).half())
    # only_found keeps exactly the boundaries where the model still had every object
    found = O.find_objects(frames[: len(scene.clip.frames)], scene.clip.objects, scene.clip.radii, DEMO_SIZE)
    want = [w for k, w in enumerate(windows, 1) if O.found_through_lead_in(found, scene.frames_per_section * k)]
    with torch.no_grad():
        kept = O.scene_windows(demo_pipe, scene, seed=5, only_found=True)
    assert [w.prompt for w in kept] == [w.prompt for w in want]
    assert all(torch.equal(a.target, b.target) and torch.equal(a.history, b.history) for a, b in zip(kept, want))


def test_mixed_dataset_lists_on_policy_windows_as_the_fraction_asked():
    base, extra = list(range(900)), ["x"] * 30
    mixed = O.MixedDataset(base, extra, 0.5)
    assert len(mixed) == 1800 and mixed[0] == 0 and mixed[899] == 899 and mixed[900] == mixed[1799] == "x"
    assert len(O.MixedDataset(base, extra, 0.25)) == 900 + 300
    with pytest.raises(ValueError, match="onpolicy-fraction"):
        O.MixedDataset(base, extra, 1.0)
    with pytest.raises(ValueError, match="no windows"):
        O.MixedDataset(base, [], 0.5)


def test_the_trainer_reads_on_policy_windows(tmp_path):
    from tests.demo.test_train import _args, _tiny_cache

    _tiny_cache(tmp_path)
    cache = torch.load(tmp_path / "latents.pt", weights_only=True)
    clip = cache["clips"][0]
    c, h, w = clip["latents"].shape[1:]
    windows = [O.OnPolicyWindow(target=torch.randn(c, 9, h, w).half(), history=torch.randn(c, 19, h, w).half(),
                                start=torch.randn(c, 1, h, w).half(), image_embeds=clip["image_embeds"],
                                prompt=clip["prompts"][0]) for _ in range(3)]
    O.OnPolicyDataset(windows, cache["prompts"]).save(tmp_path / "own.pt", done_scenes=1)
    assert len(O.OnPolicyDataset.load(tmp_path / "own.pt")) == 3
    T.train_transformer(_args(tmp_path, "--steps", "2", "--onpolicy", str(tmp_path / "own.pt")))
    log = [json.loads(line) for line in (tmp_path / "transformer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)


def test_the_command_refuses_one_object_without_wall_turns_and_a_change_rate_outside_0_1(tmp_path, capsys):
    for flags, said in ((["--one-object"], "--one-object goes with --wall-turns"),
                        (["--change", "1.5"], "--change is a probability in [0, 1], got 1.5"),
                        (["--backgrounds", "dark,blue"], "unknown background 'blue': choose from dark, grey, light")):
        with pytest.raises(SystemExit):
            O.main(["--out", str(tmp_path / "own.pt"), *flags])
        assert said in capsys.readouterr().err


def test_the_command_records_windows_and_continues_where_it_stopped(tmp_path):
    out = tmp_path / "own.pt"
    args = ["--model", "demo", "--out", str(out), "--sections", "2", "--save-every", "1", "--seed", "9"]
    O.main([*args, "--scenes", "1"])
    first = O.OnPolicyDataset.load(out)
    assert len(first) == 1 and torch.load(out, weights_only=True)["scenes"] == 1
    assert set(first.prompts) >= {w.prompt for w in first.windows}  # the trainer finds every window's text
    O.main([*args, "--scenes", "2"])
    both = O.OnPolicyDataset.load(out)
    assert len(both) == 2 and torch.equal(both.windows[0].target, first.windows[0].target)  # scene 0 kept, not redone
    assert not out.with_suffix(".tmp").exists()
    assert both.recipe["seed"] == 9 and both.recipe["wall_turns"] is False
    assert both.recipe["backgrounds"] == "dark,grey,light,green"
    with pytest.raises(ValueError, match=r"--seed 9 \(now 10\).*--wall-turns False \(now True\)"):
        O.main([*args[:-2], "--seed", "10", "--scenes", "3", "--wall-turns"])  # other scenes would be appended
    with pytest.raises(ValueError, match=r"--backgrounds 'dark,grey,light,green' \(now 'dark'\)"):
        O.main([*args, "--scenes", "3", "--backgrounds", "dark"])
    saved = torch.load(out, weights_only=True)
    del saved["recipe"]["backgrounds"]  # as recorded before --backgrounds existed: on all of them
    torch.save(saved, out)
    with pytest.raises(ValueError, match=r"--backgrounds 'dark,grey,light,green' \(now 'dark'\)"):
        O.main([*args, "--scenes", "3", "--backgrounds", "dark"])
    assert len(O.OnPolicyDataset.load(out)) == 2


def test_the_command_generates_at_the_size_it_draws_its_scenes_at(tmp_path):
    """--size 32: the model runs at 32 px (4x4 latents) like the world and the expert, not fitted to the demo's
    bucket (before, the pipeline kept its own size and the windows mixed two)."""
    out = tmp_path / "small.pt"
    O.main(["--model", "demo", "--out", str(out), "--sections", "2", "--scenes", "1", "--seed", "9", "--size", "32"])
    window = O.OnPolicyDataset.load(out).windows[0]
    assert window.target.shape[-2:] == (4, 4) and window.history.shape[-2:] == (4, 4)

