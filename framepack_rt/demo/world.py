"""A synthetic world for the demo model: plain shapes on a plain background, moving as a prompt says.

A scene holds one to three objects (balls or squares, each its own colour) on a plain background. One object
at a time is the *subject* and does what the prompt in force says ("a red ball moves right", "the blue square
bounces", ...); the others stay where they are. A clip is a long run of frames whose prompt changes at random
times; each change may pick another subject and another motion, or (``WorldConfig.turn_rate``) turn the
subject back the way it came. Everything is deterministic from a seed.

Motion rules (sizes are fractions of the frame side, so any resolution gives the same clip, only sharper):

* ``moves right/left/up/down``: constant speed; the object stops where it touches the frame edge.
* ``bounces``: hops in place, ``|sin|``-shaped, from the height it had when the prompt began.
* ``grows`` / ``shrinks``: the radius (half-side for squares) changes at a constant rate, within limits.
* ``stays still``: nothing moves.

Prompt changes land on latent boundaries of the causal VAE (frames 1, 5, 9, ... = ``4j - 3``), so each latent
frame has exactly one prompt; ``Clip.prompt_at_latent`` gives it.

    clip = make_clip(seed=3, num_frames=frames_for_latents(40))
    clip.frames            # (T, H, W, 3) uint8
    clip.timeline          # [(frame, prompt), ...], first at frame 0
    clip.centers[t, i]     # (x, y) of object i in pixels at frame t; clip.radii[t, i]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (50, 90, 230),
    "green": (40, 180, 70),
    "yellow": (235, 200, 40),
}
BACKGROUND_NAMES: dict[str, tuple[int, int, int]] = {
    "dark": (25, 25, 30),
    "grey": (110, 110, 115),
    "light": (225, 225, 215),
    "green": (30, 60, 50),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = tuple(BACKGROUND_NAMES.values())
SHAPES = ("ball", "square")
MOTIONS = ("moves right", "moves left", "moves up", "moves down", "bounces", "grows", "shrinks", "stays still")
ARTICLES = ("a", "the")
LATENT_FRAMES = 4  # the causal VAE: one latent = 4 frames (the first latent: 1 frame)


def frames_for_latents(num_latents: int) -> int:
    """Frames of a clip that encodes to ``num_latents`` latents: ``4 N - 3``."""
    if num_latents < 1:
        raise ValueError(f"num_latents must be >= 1, got {num_latents}")
    return LATENT_FRAMES * num_latents - 3


def first_frame_of_latent(latent: int) -> int:
    """The first frame latent ``latent`` holds: 0, 1, 5, 9, ... (``4 j - 3`` for j >= 1)."""
    return 0 if latent == 0 else LATENT_FRAMES * latent - 3


def latent_of_frame(frame: int) -> int:
    """The latent that holds ``frame``: 0 for frame 0, then 4 frames each (1-4 -> 1, 5-8 -> 2, ...)."""
    return 0 if frame == 0 else (frame + 3) // LATENT_FRAMES


def make_prompt(colour: str, shape: str, motion: str, article: str = "a") -> str:
    """'a red ball moves right'. Raises ValueError for words outside the vocabulary."""
    if colour not in COLOURS or shape not in SHAPES or motion not in MOTIONS or article not in ARTICLES:
        raise ValueError(f"not in the world's vocabulary: {article!r} {colour!r} {shape!r} {motion!r}")
    return f"{article} {colour} {shape} {motion}"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """'the blue square bounces' -> ('blue', 'square', 'bounces'). Raises ValueError if not a world prompt."""
    words = prompt.strip().lower().split()
    if len(words) >= 4 and words[0] in ARTICLES and words[1] in COLOURS and words[2] in SHAPES:
        motion = " ".join(words[3:])
        if motion in MOTIONS:
            return words[1], words[2], motion
    raise ValueError(f"{prompt!r} is not '<a|the> <colour> <ball|square> <motion>' in the world's vocabulary")


def all_prompts() -> list[str]:
    """Every prompt the world can produce (articles x colours x shapes x motions), in a fixed order."""
    return [make_prompt(c, s, m, a) for a in ARTICLES for c in COLOURS for s in SHAPES for m in MOTIONS]


def vocabulary() -> list[str]:
    """Every word a world prompt uses (for the demo tokenizers)."""
    words = list(ARTICLES) + list(COLOURS) + list(SHAPES) + [w for m in MOTIONS for w in m.split()]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and speeds as fractions of the frame side (``size`` px); times in frames at ``fps``."""

    size: int = 64
    fps: int = 30
    speed: float = 0.01  # per frame: 0.3 frame widths per second
    grow_rate: float = 0.0025  # radius change per frame
    min_radius: float = 0.07
    max_radius: float = 0.17
    hop_height: float = 0.2
    hop_frames: int = 24  # one hop, up and down
    margin: float = 0.02  # objects stop this far from the edge
    min_segment_latents: int = 8  # a prompt lasts 8..30 latents (about 1.1 s .. 4 s)
    max_segment_latents: int = 30
    still_weight: float = 0.4  # "stays still" is drawn less often than a motion
    # The chance that a prompt change turns the subject back ("moves right" -> "moves left", "grows" ->
    # "shrinks"), as someone steering one object does, where the reverse has room; otherwise a random subject
    # and motion. 0: every change random (and the random stream is exactly the one before this setting);
    # 1: the subject goes back and forth while it has room.
    turn_rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.turn_rate <= 1.0:  # (also refuses NaN)
            raise ValueError(f"turn_rate is a probability in [0, 1], got {self.turn_rate}: pass --turn-rate "
                             "between 0 and 1")
        if not -self.min_radius < self.margin < 0.25:  # below: the smallest ball could stop centred off the frame
            raise ValueError(f"margin is a fraction of the side in ({-self.min_radius}, 0.25), got {self.margin}: "
                             "pass --world-margin within it (below 0 objects stop partly outside the frame)")


@dataclass(frozen=True)
class WorldObject:
    shape: str  # "ball" or "square"
    colour: str  # a key of COLOURS

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass
class Clip:
    """A rendered clip with its prompt timeline and the ground-truth object tracks.

    frames (T, H, W, 3) uint8; centers (T, n, 2) float32 pixel (x, y) of each object's centre; radii (T, n)
    float32 (ball radius / square half-side, px); subjects (T,) int: which object the prompt in force names.
    """

    frames: np.ndarray
    timeline: list[tuple[int, str]]
    objects: list[WorldObject]
    background: tuple[int, int, int]
    centers: np.ndarray
    radii: np.ndarray
    subjects: np.ndarray
    config: WorldConfig = field(default_factory=WorldConfig)

    @property
    def num_latents(self) -> int:
        return latent_of_frame(len(self.frames) - 1) + 1

    def prompt_at(self, frame: int) -> str:
        """The prompt in force at ``frame``."""
        current = self.timeline[0][1]
        for start, prompt in self.timeline:
            if start <= frame:
                current = prompt
        return current

    def prompt_at_latent(self, latent: int) -> str:
        """The prompt of latent ``latent`` (changes land on latent boundaries, so it is unique)."""
        return self.prompt_at(first_frame_of_latent(latent))

    def change_latents(self) -> list[int]:
        """Latent indices where a new prompt begins (the first is 0)."""
        return [latent_of_frame(f) for f, _ in self.timeline]


# ----------------------------------------------------------------------------------------------- rendering
def _coverage_ball(xs: np.ndarray, ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Anti-aliased disc coverage in [0, 1]: 1 px wide linear ramp across the edge. Args broadcast to (T, H, W)."""
    d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    return np.clip(r - d + 0.5, 0.0, 1.0)


def _coverage_square(xs: np.ndarray, ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Exact box-filter coverage of the square [cx - r, cx + r] x [cy - r, cy + r] over each unit pixel."""
    ox = np.clip(np.minimum(xs + 0.5, cx + r) - np.maximum(xs - 0.5, cx - r), 0.0, 1.0)
    oy = np.clip(np.minimum(ys + 0.5, cy + r) - np.maximum(ys - 0.5, cy - r), 0.0, 1.0)
    return ox * oy


def render(objects: list[WorldObject], background: tuple[int, int, int], centers: np.ndarray, radii: np.ndarray,
           size: int) -> np.ndarray:
    """centers (T, n, 2), radii (T, n) in pixels -> frames (T, size, size, 3) uint8; later objects on top.

    Pixel (i, j) covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]: its centre is at x = j, y = i.
    """
    t = centers.shape[0]
    img = np.empty((t, size, size, 3), np.float32)
    img[:] = np.asarray(background, np.float32)
    grid = np.arange(size, dtype=np.float32)
    xs, ys = grid[None, None, :], grid[None, :, None]
    for i, obj in enumerate(objects):
        cx, cy, r = (a[:, None, None] for a in (centers[:, i, 0], centers[:, i, 1], radii[:, i]))
        cover = (_coverage_ball if obj.shape == "ball" else _coverage_square)(xs, ys, cx, cy, r)[..., None]
        img += cover * (np.asarray(obj.rgb, np.float32) - img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- motion
class _Limits:
    """Pixel limits of a world of side ``size``."""

    def __init__(self, cfg: WorldConfig) -> None:
        s = cfg.size
        self.size, self.margin = float(s), cfg.margin * s
        self.speed, self.grow = cfg.speed * s, cfg.grow_rate * s
        self.rmin, self.rmax, self.hop = cfg.min_radius * s, cfg.max_radius * s, cfg.hop_height * s
        self.hop_frames = cfg.hop_frames

    def lo(self, r: float) -> float:
        return r + self.margin

    def hi(self, r: float) -> float:
        return self.size - 1 - r - self.margin

    def room(self, x: float, y: float, r: float, motion: str) -> float:
        """Pixels the motion can still move (or grow) from this state: 0 means it would do nothing."""
        if motion == "moves right":
            return self.hi(r) - x
        if motion == "moves left":
            return x - self.lo(r)
        if motion == "moves down":
            return self.hi(r) - y
        if motion == "moves up":
            return y - self.lo(r)
        if motion == "bounces":
            return min(self.hop, y - self.lo(r))
        if motion == "grows":
            return min(self.rmax, x - self.margin, self.size - 1 - self.margin - x, y - self.margin,
                       self.size - 1 - self.margin - y) - r
        if motion == "shrinks":
            return r - self.rmin
        return float("inf")  # stays still


def _step(state: np.ndarray, motion: str, k: int, anchor_y: float, lim: _Limits) -> None:
    """Advance one object's (x, y, r) in place by one frame; k = frames since the motion began (>= 1)."""
    x, y, r = state
    if motion == "moves right":
        x = min(x + lim.speed, max(lim.hi(r), x))
    elif motion == "moves left":
        x = max(x - lim.speed, min(lim.lo(r), x))
    elif motion == "moves down":
        y = min(y + lim.speed, max(lim.hi(r), y))
    elif motion == "moves up":
        y = max(y - lim.speed, min(lim.lo(r), y))
    elif motion == "bounces":
        height = max(0.0, min(lim.hop, anchor_y - lim.lo(r)))
        y = anchor_y - height * abs(np.sin(np.pi * k / lim.hop_frames))
    elif motion == "grows":
        r = max(r, min(r + lim.grow, lim.rmax, x - lim.margin, lim.size - 1 - lim.margin - x, y - lim.margin,
                       lim.size - 1 - lim.margin - y))
    elif motion == "shrinks":
        r = max(r - lim.grow, min(lim.rmin, r))
    state[:] = (x, y, r)


REVERSE: dict[str, str] = {"moves right": "moves left", "moves left": "moves right", "moves up": "moves down",
                           "moves down": "moves up", "grows": "shrinks", "shrinks": "grows"}


def _motion_need(motion: str, lim: _Limits) -> float:
    """Room a motion needs to show for about half a second at least."""
    return {"bounces": 0.5 * lim.hop, "grows": 12 * lim.grow, "shrinks": 12 * lim.grow}.get(motion, 16 * lim.speed)


def _pick_motion(rng: np.random.Generator, states: np.ndarray, lim: _Limits, cfg: WorldConfig) -> tuple[int, str]:
    """A subject and a motion that visibly does something from the current states (or 'stays still')."""
    weights = np.array([cfg.still_weight if m == "stays still" else 1.0 for m in MOTIONS])
    for _ in range(100):
        i = int(rng.integers(len(states)))
        motion = MOTIONS[int(rng.choice(len(MOTIONS), p=weights / weights.sum()))]
        if lim.room(*states[i], motion) >= _motion_need(motion, lim):
            return i, motion
    return int(rng.integers(len(states))), "stays still"


def _turn(rng: np.random.Generator, plan: list[tuple[int, int, str]], states: np.ndarray, lim: _Limits,
          cfg: WorldConfig) -> tuple[int, str] | None:
    """With probability ``cfg.turn_rate``, the last segment's subject and the reverse of its motion, if that
    has room to show; else None (draws nothing from ``rng`` when the rate is 0 or there is no last segment)."""
    if not plan or cfg.turn_rate <= 0 or rng.random() >= cfg.turn_rate:
        return None
    _, subject, motion = plan[-1]
    reverse = REVERSE.get(motion)
    if reverse is None or lim.room(*states[subject], reverse) < _motion_need(reverse, lim):
        return None
    return subject, reverse


def _place(rng: np.random.Generator, n: int, lim: _Limits) -> np.ndarray:
    """(n, 3) initial (x, y, r), not overlapping, inside the margins."""
    states = np.zeros((n, 3), np.float64)
    for i in range(n):
        for _ in range(200):
            r = rng.uniform(lim.rmin, 0.75 * lim.rmax + 0.25 * lim.rmin)
            x, y = rng.uniform(lim.lo(r), lim.hi(r)), rng.uniform(lim.lo(r), lim.hi(r))
            if all(np.hypot(x - sx, y - sy) > 1.5 * (r + sr) + 2 for sx, sy, sr in states[:i]):
                break
        states[i] = (x, y, r)
    return states


def make_scene(rng: np.random.Generator, cfg: WorldConfig, num_objects: int | None = None,
               backgrounds: Sequence[tuple[int, int, int]] = BACKGROUNDS
               ) -> tuple[list[WorldObject], tuple[int, int, int], np.ndarray]:
    """Random objects (distinct colours), background (one of ``backgrounds``) and initial (n, 3) states (x, y, r
    in px)."""
    n = int(rng.integers(1, 4)) if num_objects is None else num_objects
    if not 1 <= n <= len(COLOURS):
        raise ValueError(f"a scene holds 1 to {len(COLOURS)} objects, got {n}")
    colours = rng.permutation(list(COLOURS))[:n]
    objects = [WorldObject(str(rng.choice(SHAPES)), str(c)) for c in colours]
    if not backgrounds:
        raise ValueError("make_scene needs at least one background to choose from")
    background = tuple(backgrounds[int(rng.integers(len(backgrounds)))])
    return objects, background, _place(rng, n, _Limits(cfg))


def simulate(objects: list[WorldObject], states: np.ndarray, timeline: list[tuple[int, int, str]], num_frames: int,
             cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run a timeline [(start frame, subject index, motion)] from (n, 3) states.

    Returns centers (T, n, 2), radii (T, n) float32 and subjects (T,) int. Frame 0 is the initial state;
    frame t > 0 is frame t - 1 advanced by the motion in force at t.
    """
    lim, state = _Limits(cfg), states.astype(np.float64).copy()
    centers = np.zeros((num_frames, len(objects), 2), np.float32)
    radii = np.zeros((num_frames, len(objects)), np.float32)
    subjects = np.zeros(num_frames, np.int64)
    seg, began, anchor = 0, 0, state[timeline[0][1], 1]
    for t in range(num_frames):
        if seg + 1 < len(timeline) and timeline[seg + 1][0] <= t:
            seg += 1
            began, anchor = timeline[seg][0] - 1, state[timeline[seg][1], 1]
        _, subject, motion = timeline[seg]
        if t > 0:
            _step(state[subject], motion, t - began, anchor, lim)
        centers[t], radii[t], subjects[t] = state[:, :2], state[:, 2], subject
    return centers, radii, subjects


def make_clip(seed: int, num_frames: int, cfg: WorldConfig = WorldConfig(), *, num_objects: int | None = None,
              first_prompt: str | None = None) -> Clip:
    """A random clip of ``num_frames`` frames; the same seed and config give the same clip.

    ``first_prompt`` (e.g. 'a red ball moves right') forces the scene to contain that object (made the first
    object) and the first motion; later changes stay random.
    """
    rng = np.random.default_rng(seed)
    objects, background, states = make_scene(rng, cfg, num_objects)
    lim = _Limits(cfg)
    first: tuple[int, str] | None = None
    if first_prompt is not None:
        colour, shape, motion = parse_prompt(first_prompt)
        others = [o for o in objects if o.colour != colour]
        objects = [WorldObject(shape, colour)] + others[: len(objects) - 1]
        first = (0, motion)

    # Timeline, simulated segment by segment so each new motion is chosen from the state it starts in.
    plan: list[tuple[int, int, str]] = []
    frame, current = 0, states.copy()
    while frame < num_frames:
        if first is not None and not plan:
            subject, motion = first
        else:
            subject, motion = _turn(rng, plan, current, lim, cfg) or _pick_motion(rng, current, lim, cfg)
        plan.append((frame, subject, motion))
        latents = int(rng.integers(cfg.min_segment_latents, cfg.max_segment_latents + 1))
        start_latent = latent_of_frame(frame)
        frame = first_frame_of_latent(start_latent + latents)
        # The state the next motion starts from: frame - 1 is the last frame of this segment.
        centers, radii, _ = simulate(objects, states, plan, min(frame, num_frames), cfg)
        current = np.concatenate([centers[-1], radii[-1][:, None]], axis=1).astype(np.float64)
    centers, radii, subjects = simulate(objects, states, plan, num_frames, cfg)
    articles = rng.integers(len(ARTICLES), size=len(plan))
    timeline = [(f, make_prompt(objects[i].colour, objects[i].shape, m, ARTICLES[int(a)]))
                for (f, i, m), a in zip(plan, articles)]
    frames = render(objects, background, centers, radii, cfg.size)
    return Clip(frames, timeline, objects, background, centers, radii, subjects, cfg)


def start_image(seed: int, prompt: str, cfg: WorldConfig = WorldConfig(), *, num_objects: int | None = None,
                x: float | None = None, y: float | None = None) -> tuple[np.ndarray, Clip]:
    """A start frame (H, W, 3) uint8 holding the object a prompt names, for generation and evaluation.

    ``x``/``y`` (fractions of the side) move the named object there. Also returns the one-frame Clip (tracks).
    """
    clip = make_clip(seed, 1, cfg, num_objects=num_objects, first_prompt=prompt)
    if x is not None or y is not None:
        lim = _Limits(cfg)
        r = float(clip.radii[0, 0])
        cx = clip.centers[0, 0, 0] if x is None else np.clip(x * cfg.size, lim.lo(r), lim.hi(r))
        cy = clip.centers[0, 0, 1] if y is None else np.clip(y * cfg.size, lim.lo(r), lim.hi(r))
        clip.centers[0, 0] = (cx, cy)
        clip.frames = render(clip.objects, clip.background, clip.centers, clip.radii, cfg.size)
    return clip.frames[0], clip
