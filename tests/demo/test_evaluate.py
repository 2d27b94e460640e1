"""The demo evaluation on frame sequences with known motion (world renders), never on a model's output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from framepack_rt.demo import evaluate as E
from framepack_rt.demo.world import COLOURS, WorldConfig, WorldObject, make_clip, parse_prompt, render, simulate
from framepack_rt.engine.sampling import GuidanceConfig

CFG = WorldConfig()
BG = (25, 25, 30)


def ball_clip(timeline: list[tuple[int, str]], frames: int, x: float = 20.0, y: float = 32.0, bg=BG) -> np.ndarray:
    objects = [WorldObject("ball", "red")]
    plan = [(f, 0, m) for f, m in timeline]
    centers, radii, _ = simulate(objects, np.array([[x, y, 6.0]]), plan, frames, CFG)
    return render(objects, bg, centers, radii, CFG.size)


def test_track_recovers_the_true_centres_among_other_shapes():
    clip = make_clip(4, 61, num_objects=3, first_prompt="a red ball moves right")
    centroids, area = E.track(clip.frames)
    assert np.abs(centroids - clip.centers[:, 0]).max() < 0.3  # red is drawn first: others may not cover it here
    assert area[0] == pytest.approx(np.pi * clip.radii[0, 0] ** 2, rel=0.1)  # edges count partly
    blank = np.full((2, 64, 64, 3), 30, np.uint8)
    assert np.isnan(E.track(blank)[0]).all()


def test_moved_right_left_and_still():
    right = E.track(ball_clip([(0, "moves right")], 61))[0]
    left = E.track(ball_clip([(0, "moves left")], 61, x=44.0))[0]
    still = E.track(ball_clip([(0, "stays still")], 61))[0]
    assert E.moved(right, "right", 64) and not E.moved(right, "left", 64)
    assert E.moved(left, "left", 64) and not E.moved(left, "right", 64)
    assert not any(E.moved(still, d, 64) for d in ("right", "left", "up", "down"))
    down = E.track(ball_clip([(0, "moves down")], 61, y=20.0))[0]
    assert E.moved(down, "down", 64) and not E.moved(down, "right", 64)


def test_reversal_is_found_with_its_lag():
    change = 72
    frames = ball_clip([(0, "moves right"), (change + 1, "moves left")], change + 73, x=12.0)
    ok, lag = E.reversed_after(E.track(frames)[0], change, 72, 64)
    # 10% of 64 px at 0.64 px per frame: 10 frames
    assert ok and lag == pytest.approx(10, abs=1)
    keeps_going = ball_clip([(0, "moves right")], change + 73, x=4.0)
    assert E.reversed_after(E.track(keeps_going)[0], change, 72, 64) == (False, None)
    late = ball_clip([(0, "moves right"), (change + 70, "moves left")], change + 150, x=12.0)
    assert not E.reversed_after(E.track(late)[0], change, 72, 64)[0]  # turned, but after the horizon


def test_palette_error_grows_with_noise_blur_and_colour_shift():
    frames = ball_clip([(0, "moves right")], 31)
    palette = [BG, COLOURS["red"]]
    clean = E.palette_error(frames, palette)
    rng = np.random.default_rng(0)
    noisy = np.clip(frames + rng.normal(0, 20, frames.shape), 0, 255).astype(np.uint8)
    shifted = np.clip(frames.astype(int) + (30, -10, 20), 0, 255).astype(np.uint8)
    blurred = ((frames[:, :-1, :-1].astype(int) + frames[:, 1:, 1:]) // 2).astype(np.uint8)
    assert clean.max() < 2.0
    for bad in (noisy, shifted):
        assert E.palette_error(bad, palette).min() > 5 * clean.max()
    assert E.palette_error(blurred, palette).mean() > 1.5 * clean.mean()
    curve = E.drift_curve(np.concatenate([frames, noisy]), palette)
    assert len(curve["palette_error"]) == 3 and curve["palette_error"][2] > 5 * curve["palette_error"][0]
    assert curve["red_area"][0] == pytest.approx(1.0, abs=0.03)  # sub-pixel positions shade the edges


# ------------------------------------------------------------------------- the runners, on a world-driven fake
@dataclass
class FakeSection:
    first_frame: int
    frames: np.ndarray


class FakeStream:
    """Sections of 36 frames (the first with the start frame in front) that move as the prompt says
    (or the opposite way when ``contrary``), rendered by the world from the start image's red ball."""

    OPPOSITE: ClassVar[dict[str, str]] = {"moves right": "moves left", "moves left": "moves right"}

    def __init__(self, image: np.ndarray, prompt: str, contrary: bool) -> None:
        c, area = E.track(image[None])
        self.state = np.array([[c[0, 0], c[0, 1], np.sqrt(area[0] / np.pi)]])
        self.bg, self.prompt, self.contrary, self.emitted = tuple(int(v) for v in image[0, 0]), prompt, contrary, 0
        self.first, self.sections = image, 0

    def set_prompt(self, text: str) -> int:
        self.prompt = text
        return self.sections


    def stop(self) -> None:
        pass

    def __next__(self) -> FakeSection:
        motion = parse_prompt(self.prompt)[2]
        motion = self.OPPOSITE.get(motion, motion) if self.contrary else motion
        objects = [WorldObject("ball", "red")]
        centers, radii, _ = simulate(objects, self.state, [(0, 0, motion)], 37, CFG)
        self.state = np.array([[centers[-1, 0, 0], centers[-1, 0, 1], radii[-1, 0]]])
        frames = render(objects, self.bg, centers, radii, CFG.size)
        frames = frames if self.emitted == 0 else frames[1:]
        section = FakeSection(self.emitted, frames)
        self.emitted += len(frames)
        self.sections += 1
        return section


class FakePipe:
    default_steps = 8
    default_guidance = GuidanceConfig(cfg=2.0)
    default_solver = "euler_stochastic"

    def __init__(self, contrary: bool = False) -> None:
        self.contrary = contrary

    def stream(self, image, prompt, seed=0, steps=None, decode_overlap=None):
        return FakeStream(image, prompt, self.contrary)


def test_runners_pass_a_model_that_follows_prompts_and_fail_one_that_does_not():
    good, bad = FakePipe(), FakePipe(contrary=True)
    direction = E.eval_direction(good, runs=4)
    assert direction.rate == 1.0
    # A red ball that stays a red ball: its area and a clean palette at the end of every run.
    assert all(0.8 < d["red_area_end"] < 1.2 and d["palette_error_end"] < 2.0 for d in direction.details)
    assert "1.00, " in E.table([direction], None)
    assert E.eval_direction(bad, runs=4).rate == 0.0
    change = E.eval_prompt_change(good, runs=4)
    assert change.rate == 1.0 and all(d["frames_to_reverse"] <= 72 for d in change.details)
    assert E.eval_prompt_change(bad, runs=4).rate == 0.0


def test_drift_summary_and_table(monkeypatch):
    def noisy_vanilla(pipe, image, prompts, seed, steps):
        frames = E.stream_f1(pipe, image, prompts, seed, steps)
        ramp = np.linspace(0, 40, len(frames))[:, None, None, None]  # noise that grows with time
        noise = np.random.default_rng(seed).normal(0, 1, frames.shape) * ramp
        return np.clip(frames + noise, 0, 255).astype(np.uint8)

    monkeypatch.setattr(E, "stream_vanilla", noisy_vanilla)
    drift = E.eval_drift(FakePipe(), seconds=6, runs=1)
    f1, van = drift["f1"], drift["vanilla"]
    assert len(f1["palette_error_per_s"]) == 6 and f1["palette_error_last5s"] < 2.0
    assert van["palette_error_last5s"] > 5 * f1["palette_error_last5s"]
    text = E.table([E.Result("direction", 45, 50, 0.9, []), E.Result("prompt_change", 40, 50, 0.9, [])], drift)
    assert "45/50" in text and "yes" in text and "NO" in text and "vanilla" in text


def test_main_reports_rates_and_the_guidance_it_sampled_with(tmp_path, capsys):
    out = tmp_path / "eval.json"
    report = E.main(["--runs", "3", "--drift-seconds", "0", "--json", str(out)], pipe_factory=FakePipe)
    saved = json.loads(out.read_text())
    assert saved["cfg"] == 2.0 and saved["steps"] == 8 and saved["drift"] is None
    assert saved["direction"]["passed"] == 3 and saved["prompt_change"]["rate"] == 1.0 == report["prompt_change"]["rate"]
    assert saved["solver"] == "euler_stochastic"
    assert saved["size"] == 64  # a fake without buckets is scored in the world's default scenes
    assert "euler_stochastic, cfg 2" in capsys.readouterr().out


def test_stream_f1_samples_each_section_with_its_own_prompt(monkeypatch):
    """With decode overlap (the CPU default) section k + 1 is already sampling when k comes out, so a prompt
    set then applied a section late: the turns ran 4 sections right and 2 left instead of 3 and 3."""
    pipe, prompts, seen = E.load_pipeline("demo"), [E.RIGHT, E.RIGHT, E.LEFT, E.LEFT], []
    frames_of = E._frames
    monkeypatch.setattr(E, "_frames", lambda sections: seen.extend(s.prompt for s in sections) or frames_of(sections))
    image, _ = E.fidelity_scene(0)[1:]
    frames = E.stream_f1(pipe, image, prompts, seed=0, steps=1)
    assert seen == prompts and len(frames) == 1 + 4 * 36


def test_load_pipeline_samples_with_the_demo_solver_unless_told():
    from framepack_rt.demo import DEMO_SOLVER

    assert E.load_pipeline("demo").default_solver == DEMO_SOLVER
    assert E.load_pipeline("demo", solver="unipc_bh1").default_solver == "unipc_bh1"
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        E.load_pipeline("demo", solver="rk4")


def test_a_size_sets_the_bucket_the_model_generates_at_and_the_scenes_drawn_for_it():
    """evaluate --size N (and onpolicy --size): frames generated and scenes drawn at N, the start object at the
    same place as a fraction of the side; the default is the demo's bucket."""
    from framepack_rt.demo import DEMO_SIZE
    from framepack_rt.demo.world import WorldConfig

    default, large = E.load_pipeline("demo"), E.load_pipeline("demo", size=96)
    assert default.buckets == ((DEMO_SIZE, DEMO_SIZE),) and E.scene_world(default).size == DEMO_SIZE
    assert large.buckets == ((96, 96),) and E.scene_world(large) == WorldConfig(size=96)
    assert large.default_steps == default.default_steps and large.example is not None
    (_, small_image, small), (_, image, clip) = E.fidelity_scene(3), E.fidelity_scene(3, E.scene_world(large))
    assert small_image.shape == (64, 64, 3) and image.shape == (96, 96, 3)
    assert np.allclose(clip.centers[0] / 96, small.centers[0] / 64, atol=0.5 / 64)
    frames = E.stream_f1(large, image, [E.RIGHT], seed=0, steps=1)
    assert frames.shape[1:3] == large.frame_size(image) == (96 * large._fast_scale,) * 2
    large.buckets = ((96, 96), (64, 64))
    with pytest.raises(ValueError, match=r"square scenes of one size.*evaluate --size N"):
        E.scene_world(large)
    assert E.scene_world(FakePipe()) == WorldConfig()  # a pipeline without buckets: the world's default
