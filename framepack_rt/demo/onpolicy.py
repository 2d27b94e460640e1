"""On-policy training windows for the demo transformer: its own history in, the world's continuation out.

Why (issue 19): with the world's history (teacher forcing) the shipped transformer keeps 72% of frames intact,
running on its own history 42%. Trained only on encoded world clips, it never saw its own sections, whose
errors are a ball turned yellow or gone, not Gaussian noise; so one bad section makes the next worse
(exposure bias). This is DAgger (Ross et al., 2011) with the world as the expert:

1. a world scene whose prompt changes only at section boundaries (as a stream's does) is run by the model,
   free, through the pipeline's sampling and decoder (:func:`evaluate.engine_run`);
2. at every section boundary the objects are found by colour in the decoded history (:func:`track_objects`);
3. the world carries them on from *there* with the next section's prompt, drawn clean: right colour, count and
   size, continuous position (:func:`expert_section`), and that is encoded by the VAE as the target;
4. the training window is (the model's own latents as history, that target).

The VAE encodes clips in temporal tiles of 17 frames at a stride of 12 (GroupNorm statistics span a tile), so
a section's latents depend only on the 12 frames before it and the 4 after: the target is encoded from those 12
lead-in frames (the tracked objects, drawn clean), the section and a 4-frame tail (its motion carried on), and
equals what encoding a longer clip gives there (tests/demo/test_onpolicy.py).

    python -m framepack_rt.demo.onpolicy --model framepack_rt/demo/weights --out runs/op/onpolicy.pt --scenes 300
        [--only-found]     # only the boundaries where the model still has every object: continuation, not repair
        [--wall-turns [--one-object]]  # a subject pressed into a wall, then turned back (the stream's turn)
        [--backgrounds dark,green]  # only these backgrounds: more windows where the model is weakest
    python -m framepack_rt.demo.train transformer ... --onpolicy runs/op/onpolicy.pt --onpolicy-fraction 0.5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from framepack_rt.demo.data import encode_prompts, encode_video, history_before
from framepack_rt.demo.fidelity import foreground
from framepack_rt.demo.world import (
    ARTICLES,
    BACKGROUND_NAMES,
    BACKGROUNDS,
    REVERSE,
    Clip,
    WorldConfig,
    WorldObject,
    _Limits,
    _pick_motion,
    _step,
    _turn,
    all_prompts,
    make_prompt,
    make_scene,
    render,
    simulate,
)

RECIPE = ("model", "seed", "sections", "window", "size", "turn_rate", "change", "wall_turns", "one_object",
          "only_found", "backgrounds")  # what a recording's windows depend on: a continued recording must keep them
RECIPE_SINCE = {"backgrounds": ",".join(BACKGROUND_NAMES)}  # what recordings made before a key existed used
LEAD_IN = 12  # frames before a section that its latents depend on (the VAE's temporal tile stride)
TAIL = 4  # and after it: the last tile holding the section then has all its 17 frames
TRACK_COLOUR_DISTANCE = 60.0  # a pixel belongs to an object within this RGB distance of its colour (as fidelity.py)
TRACK_AREA_BAND = (0.5, 2.0)  # a found object is believed when its area is within this band of the drawn one's


@dataclass
class SectionScene:
    """A world scene and a plan whose prompt changes only at section boundaries: ``prompts[k]`` is section k's.
    ``clip`` is the world's own run of the plan (its centres, radii and frames: what a perfect model draws)."""

    clip: Clip
    plan: list[tuple[int, int, str]]
    prompts: list[str]
    window: int

    @property
    def frames_per_section(self) -> int:
        return 4 * self.window


def section_scene(seed: int, sections: int, window: int = 9, cfg: WorldConfig = WorldConfig(),
                  change: float = 0.5, backgrounds: Sequence[tuple[int, int, int]] = BACKGROUNDS) -> SectionScene:
    """A random scene (1-3 objects, as the training clips) run for ``sections`` sections; at each boundary the
    prompt changes with probability ``change``: with ``cfg.turn_rate`` the subject turns back (world._turn),
    where that has room, else to a motion that has room to show (world._pick_motion)."""
    if sections < 2:
        raise ValueError(f"an on-policy scene needs 2 or more sections (the first has no own history), got {sections}")
    rng = np.random.default_rng(seed)
    objects, background, states = make_scene(rng, cfg, backgrounds=backgrounds)
    lim, per = _Limits(cfg), 4 * window
    plan: list[tuple[int, int, str]] = []
    prompts: list[str] = []
    current = states.copy()
    for k in range(sections):
        if k == 0 or rng.random() < change:
            turn = _turn(rng, plan, current, lim, cfg) if k else None
            subject, motion = turn or _pick_motion(rng, current, lim, cfg)
            plan.append((0 if k == 0 else 1 + per * k, subject, motion))
            obj = objects[subject]
            prompts.append(make_prompt(obj.colour, obj.shape, motion, ARTICLES[int(rng.integers(len(ARTICLES)))]))
        else:
            prompts.append(prompts[-1])
        centers, radii, _ = simulate(objects, states, plan, 1 + per * (k + 1), cfg)
        current = np.concatenate([centers[-1], radii[-1][:, None]], axis=1).astype(np.float64)
    return _run_plan(objects, background, states, plan, prompts, window, cfg)


def wall_turn_scene(seed: int, sections: int, window: int = 9, cfg: WorldConfig = WorldConfig(),
                    num_objects: int | None = None, backgrounds: Sequence[tuple[int, int, int]] = BACKGROUNDS
                    ) -> SectionScene:
    """A random scene whose subject moves toward a wall until the world stops it there, stays pressed for 0-1
    more sections, then turns back for the sections left: the stream's hardest moment (the evaluation's turn,
    with 1-3 objects of any colour and shape (or ``num_objects``), in any of the four directions)."""
    if sections < 2:
        raise ValueError(f"a wall-turn scene needs 2 or more sections (one each way), got {sections}")
    rng = np.random.default_rng(seed)
    objects, background, states = make_scene(rng, cfg, num_objects, backgrounds)
    lim, per = _Limits(cfg), 4 * window
    subject = int(rng.integers(len(objects)))
    rooms = {m: lim.room(*states[subject], m) for m in ("moves right", "moves left", "moves up", "moves down")}
    motion = str(rng.choice([m for m, room in rooms.items() if room >= max(rooms.values()) / 2]))
    to_wall = int(np.ceil(rooms[motion] / (lim.speed * per)))  # sections until the world stops it
    hold = int(np.clip(to_wall + rng.integers(2), 1, sections - 1))
    obj, article = objects[subject], ARTICLES[int(rng.integers(len(ARTICLES)))]
    plan = [(0, subject, motion), (1 + per * hold, subject, REVERSE[motion])]
    prompts = [make_prompt(obj.colour, obj.shape, plan[k >= hold][2], article) for k in range(sections)]
    return _run_plan(objects, background, states, plan, prompts, window, cfg)


def _run_plan(objects: list[WorldObject], background: tuple[int, int, int], states: np.ndarray,
              plan: list[tuple[int, int, str]], prompts: list[str], window: int, cfg: WorldConfig) -> SectionScene:
    per = 4 * window
    centers, radii, subjects = simulate(objects, states, plan, 1 + per * len(prompts), cfg)
    frames = render(objects, background, centers, radii, cfg.size)
    timeline = [(f, prompts[0 if f == 0 else (f - 1) // per]) for f, _, _ in plan]
    return SectionScene(Clip(frames, timeline, objects, background, centers, radii, subjects, cfg), plan, prompts,
                        window)


def object_area(shape: str, radius: np.ndarray) -> np.ndarray:
    """Drawn area in pixels of a ball (radius) or square (half-side)."""
    return np.pi * radius**2 if shape == "ball" else 4.0 * radius**2


def find_objects(frames: np.ndarray, objects: list[WorldObject], radii: np.ndarray, size: int,
                 background: tuple[int, int, int] | None = None) -> np.ndarray:
    """Each object's centre per frame, found by its colour in ``frames`` (T, H, W, 3) of any side, in world
    pixels (side ``size``): (T, n, 2). radii (T, n) are the drawn ones (world pixels). NaN where an object is not
    found with an area in TRACK_AREA_BAND of its drawn area (gone, changed colour, split into a smear).
    With ``background`` (one-object scenes only) the object is what differs from the background, whatever its
    colour (as fidelity.py segments it): a ball the model turned orange is still found where it is."""
    if background is not None and len(objects) != 1:
        raise ValueError(f"finding objects against the background needs a one-object scene, got {len(objects)}")
    scale = frames.shape[2] / size
    pixels = frames.astype(np.float32)
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]].astype(np.float32)
    out = np.full((len(frames), len(objects), 2), np.nan)
    for i, obj in enumerate(objects):
        if background is None:
            mask = np.linalg.norm(pixels - np.asarray(obj.rgb, np.float32), axis=-1) <= TRACK_COLOUR_DISTANCE
        else:
            mask = foreground(frames, background)
        area = mask.sum(axis=(1, 2)) / scale**2
        drawn = object_area(obj.shape, radii[:, i])
        found = (area >= TRACK_AREA_BAND[0] * drawn) & (area <= TRACK_AREA_BAND[1] * drawn)
        for t in np.nonzero(found)[0]:
            n = mask[t].sum()
            # pixel j covers [j - 0.5, j + 0.5]: centres map back by (p + 0.5) / scale - 0.5
            out[t, i] = ((xs[mask[t]].sum() / n + 0.5) / scale - 0.5, (ys[mask[t]].sum() / n + 0.5) / scale - 0.5)
    return out


def carry_forward(found: np.ndarray) -> np.ndarray:
    """(T, n, 2) centres with NaN where not found -> the last centre found kept there (NaN before the first)."""
    out = found.copy()
    for t in range(1, len(out)):
        lost = np.isnan(out[t, :, 0])
        out[t, lost] = out[t - 1, lost]
    return out


def track_objects(frames: np.ndarray, objects: list[WorldObject], radii: np.ndarray, size: int) -> np.ndarray:
    """:func:`find_objects`, with the last centre an object was found at kept where it is not found."""
    return carry_forward(find_objects(frames, objects, radii, size))


def found_through_lead_in(found: np.ndarray, boundary: int) -> bool:
    """Whether every object was found (:func:`find_objects`) in each frame the expert's lead-in follows, up to
    ``boundary``: the window then teaches carrying on from the model's own history, not repairing it."""
    return not np.isnan(found[max(0, boundary - LEAD_IN) : boundary + 1]).any()


def back_inside(state: np.ndarray, before: np.ndarray, lim: _Limits) -> None:
    """Objects of ``state`` (n, 3: x, y, r, just stepped from ``before``) that stand past the world's stop (nearer
    an edge than its margin, where the model pushes a ball it moves into a wall) move back toward it, at most
    the world's speed a frame from where they were: the world never draws an object there, so its continuation
    does not either. In place; objects within the limits are left as they are."""
    for obj, prev in zip(state, before):
        lo, hi = lim.lo(obj[2]), lim.hi(obj[2])
        for axis in (0, 1):
            if not lo <= obj[axis] <= hi:
                obj[axis] = np.clip(np.clip(obj[axis], lo, hi), prev[axis] - lim.speed, prev[axis] + lim.speed)


def expert_section(scene: SectionScene, section: int, tracked: np.ndarray) -> np.ndarray:
    """What the world draws for section ``section`` (>= 1) when the objects stand where the model left them:
    frames (LEAD_IN + 1 + frames_per_section + TAIL, H, W, 3): the lead-in along the tracked centres, then the
    section's motion carried on from the last tracked state (into the tail). tracked (>= boundary + 1, n, 2),
    NaN where an object was never found (the world's own centre is used there). Radii are the world's. Objects
    the model left past the world's stop are brought back to it (:func:`back_inside`)."""
    clip, per = scene.clip, scene.frames_per_section
    boundary = per * section  # the last frame of the history
    lim = _Limits(clip.config)
    first = boundary - LEAD_IN
    seen = tracked[first : boundary + 1]
    lead = np.where(np.isnan(seen), clip.centers[first : boundary + 1], seen)
    state = np.concatenate([lead[-1], clip.radii[boundary][:, None]], axis=1).astype(np.float64)
    began, subject, motion = next((f - 1, s, m) for f, s, m in reversed(scene.plan) if f <= boundary + 1)
    began = max(began, 0)
    # A bounce hops from the height it had when it began: shift the world's hop to where the model has the object.
    anchor = (clip.centers[began, subject, 1] - clip.centers[boundary, subject, 1] + state[subject, 1]
              if motion == "bounces" else state[subject, 1])
    centers = np.empty((per + TAIL, len(clip.objects), 2))
    radii = np.empty((per + TAIL, len(clip.objects)))
    for t in range(per + TAIL):
        before = state.copy()
        _step(state[subject], motion, boundary + 1 + t - began, anchor, lim)
        back_inside(state, before, lim)
        centers[t], radii[t] = state[:, :2], state[:, 2]
    all_centers = np.concatenate([lead, centers]).astype(np.float32)
    all_radii = np.concatenate([clip.radii[first : boundary + 1], radii]).astype(np.float32)
    return render(clip.objects, clip.background, all_centers, all_radii, clip.config.size)


@dataclass
class OnPolicyWindow:
    """One training window: history (C, K, h, w) the model's own latents, target (C, w, h, w) the world's."""

    target: torch.Tensor
    history: torch.Tensor
    start: torch.Tensor
    image_embeds: torch.Tensor
    prompt: str


def scene_windows(pipe, scene: SectionScene, seed: int, num_history: int = 19, only_found: bool = False,
                  any_colour: bool = False) -> list[OnPolicyWindow]:
    """Run ``scene`` with the model (free) and return one window per section boundary (sections 1..n-1); with
    ``only_found``, only at the boundaries where the model still has every object (:func:`found_through_lead_in`);
    with ``any_colour`` (one-object scenes) the object is found against the background, whatever its colour, so
    the expert also takes over where the model has recoloured it (its target draws the right colour)."""
    from framepack_rt.demo.evaluate import engine_run
    from framepack_rt.engine.schedules import f1_schedule

    image = scene.clip.frames[0]
    frames, latents = engine_run(pipe, image, scene.prompts, seed, None, f1_schedule(scene.window), finish=True)
    clip, per = scene.clip, scene.frames_per_section
    found = find_objects(frames[: len(clip.frames)], clip.objects, clip.radii, clip.config.size,
                         clip.background if any_colour else None)
    tracked = carry_forward(found)
    _, embeds, _ = pipe.encode_image(image)
    vae = pipe.parts.vae()
    lat = latents.transpose(0, 1)  # (N, C, h, w): start latent, then the sections
    windows = []
    for section in range(1, len(scene.prompts)):
        if only_found and not found_through_lead_in(found, per * section):
            continue
        drawn = expert_section(scene, section, tracked)
        target = encode_video(vae.live, drawn, vae.scaling_factor)[-1 - scene.window : -1]  # the tail's latent off
        s = 1 + scene.window * section
        windows.append(OnPolicyWindow(
            target=target.transpose(0, 1).half(), history=history_before(lat, s, num_history).transpose(0, 1).half(),
            start=lat[0:1].transpose(0, 1).half(), image_embeds=embeds[0].float().cpu(),
            prompt=scene.prompts[section]))
    return windows


class OnPolicyDataset(Dataset):
    """Windows written by this module's command: items shaped as data.WindowDataset's (fp32). ``scenes``: how
    many scenes the files recorded (a stopped recording continues after them); ``recipe``: the command's
    settings that made them (empty for files from before it was kept, or files recorded differently)."""

    def __init__(self, windows: list[OnPolicyWindow], prompts: dict, scenes: int = 0,
                 recipe: dict | None = None) -> None:
        self.windows, self.prompts, self.scenes, self.recipe = windows, prompts, scenes, recipe or {}

    @classmethod
    def load(cls, *paths: str | Path) -> OnPolicyDataset:
        windows, prompts, scenes, recipes = [], {}, 0, []
        for path in paths:
            data = torch.load(Path(path), weights_only=True)
            windows += [OnPolicyWindow(**w) for w in data["windows"]]
            prompts.update(data["prompts"])
            scenes += data["scenes"]
            recipes.append(data.get("recipe", {}))
        return cls(windows, prompts, scenes, recipes[0] if all(r == recipes[0] for r in recipes) else {})

    def save(self, path: str | Path, done_scenes: int) -> None:
        tmp = Path(path).with_suffix(".tmp")
        torch.save({"windows": [vars(w) for w in self.windows], "prompts": self.prompts, "scenes": done_scenes,
                    "recipe": self.recipe}, tmp)
        tmp.replace(path)  # a run stopped mid-write keeps the last whole file

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        w = self.windows[i]
        return {"target": w.target.float(), "start": w.start.float(), "history": w.history.float(),
                "image_embeds": w.image_embeds.float(), "prompt": w.prompt}


class MixedDataset(Dataset):
    """``extra``'s items as about ``fraction`` of an epoch of ``base`` + them: each is listed
    round(fraction / (1 - fraction) * len(base) / len(extra)) times (at least once)."""

    def __init__(self, base: Dataset, extra: Dataset, fraction: float) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"--onpolicy-fraction must be in (0, 1), got {fraction}")
        if not len(extra):
            raise ValueError("the on-policy file holds no windows")
        repeat = max(1, round(fraction / (1.0 - fraction) * len(base) / len(extra)))
        self.base, self.extra, self.repeat = base, extra, repeat

    def __len__(self) -> int:
        return len(self.base) + self.repeat * len(self.extra)

    def __getitem__(self, i: int) -> dict:
        return self.base[i] if i < len(self.base) else self.extra[(i - len(self.base)) % len(self.extra)]


def generate(args: argparse.Namespace) -> Path:
    """Scenes seeds ``args.seed * 1_000_003 + i`` for i < args.scenes, appended to ``args.out`` (resumable)."""
    from framepack_rt.demo.evaluate import load_pipeline

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = {key: getattr(args, key) for key in RECIPE}
    data = OnPolicyDataset.load(out) if out.is_file() else None  # continue a run that stopped, as it was recorded
    if data is not None:
        was = {**RECIPE_SINCE, **data.recipe}
        changed = [f"--{k.replace('_', '-')} {was[k]!r} (now {recipe[k]!r})" for k in RECIPE
                   if k in was and was[k] != recipe[k]]
        if changed:
            raise ValueError(f"{out} was recorded with {', '.join(changed)}: continue it with the same settings, "
                             "or record into a new --out")
        data.recipe = recipe
    pipe = load_pipeline(args.model, size=args.size)  # generate at the size the scenes are drawn at
    if data is None:
        data = OnPolicyDataset([], encode_prompts(pipe.parts, all_prompts()), recipe=recipe)
    backgrounds = [BACKGROUND_NAMES[name] for name in args.backgrounds.split(",")]
    began = time.perf_counter()
    for i in range(data.scenes, args.scenes):
        seed = args.seed * 1_000_003 + i
        cfg = WorldConfig(size=args.size, turn_rate=args.turn_rate)
        scene = (wall_turn_scene(seed, args.sections, args.window, cfg, 1 if args.one_object else None, backgrounds)
                 if args.wall_turns else section_scene(seed, args.sections, args.window, cfg, args.change, backgrounds))
        with torch.no_grad():
            data.windows += scene_windows(pipe, scene, seed, only_found=args.only_found, any_colour=args.one_object)
        if (i + 1) % args.save_every == 0 or i + 1 == args.scenes:
            data.save(out, i + 1)
            print(f"{i + 1}/{args.scenes} scenes, {len(data)} windows, {time.perf_counter() - began:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from framepack_rt.demo import DEMO_SIZE

    p = argparse.ArgumentParser(prog="python -m framepack_rt.demo.onpolicy", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="the weights whose own histories to record (a folder or demo)")
    p.add_argument("--out", required=True, help="windows file (.pt); an existing one is continued")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--sections", type=int, default=6, help="sections per scene: sections - 1 windows each")
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--seed", type=int, default=3, help="scene seed family (training clips use 1 and 2, the "
                   "evaluation 0-49 and its fidelity scenes their own)")
    p.add_argument("--size", type=int, default=DEMO_SIZE, help="side of the scenes and of the frames the model "
                   f"generates (default: the demo's, {DEMO_SIZE})")
    p.add_argument("--turn-rate", dest="turn_rate", type=float, default=0.0,
                   help="the chance that a prompt change turns the subject back (as encode's --turn-rate)")
    p.add_argument("--change", type=float, default=0.5, help="the chance that the prompt changes at a boundary")
    p.add_argument("--wall-turns", dest="wall_turns", action="store_true",
                   help="every scene a subject moving into a wall and turning back there (wall_turn_scene)")
    p.add_argument("--one-object", dest="one_object", action="store_true",
                   help="with --wall-turns: one object a scene, found against the background whatever its colour")
    p.add_argument("--only-found", dest="only_found", action="store_true",
                   help="windows only where the model still has every object through the lead-in (continuation, "
                   "not repair)")
    p.add_argument("--backgrounds", default=",".join(BACKGROUND_NAMES),
                   help="comma-separated backgrounds to draw the scenes on, chosen evenly (a name given twice counts "
                   f"twice; default: all of {', '.join(BACKGROUND_NAMES)})")
    p.add_argument("--save-every", dest="save_every", type=int, default=10)
    args = p.parse_args(argv)
    unknown = [name for name in args.backgrounds.split(",") if name not in BACKGROUND_NAMES]
    if unknown:
        p.error(f"unknown background {', '.join(map(repr, unknown))}: choose from {', '.join(BACKGROUND_NAMES)}")
    if args.one_object and not args.wall_turns:
        p.error("--one-object goes with --wall-turns")
    if not 0.0 <= args.change <= 1.0:
        p.error(f"--change is a probability in [0, 1], got {args.change}")
    generate(args)


if __name__ == "__main__":
    main()
