"""Picture fidelity of generated demo video: is the object still one object, of its colour and size, moving
continuously? (issue 19). The direction and prompt-change criteria follow the centroid of red pixels, which a
ball that splits into a smear and a second blob does not disturb; these measures do.

Per frame the object is segmented against the scene's plain background (pixels farther than
``BACKGROUND_DISTANCE`` from it in RGB), split into 4-connected blobs, and blobs smaller than
``SPECK_FRACTION`` of the start object's area are ignored as specks. Then:

* ``one_object``: exactly one blob;
* ``colour_ok``: that blob's mean colour within ``COLOUR_DISTANCE`` of the start object's colour;
* ``area_ok``: its area within ``AREA_BAND`` times the start object's area;
* ``intact``: all three;
* the centroid's largest jump between consecutive frames, as a fraction of the width (over frames where the
  object is intact in both);
* the largest jump across gaps: the same between consecutive *intact* frames however far apart, less what the
  world's top speed (``WorldConfig.speed`` a frame) covers over the frames between. A ball that fades out and
  comes back on the other side has no jump between consecutive frames, yet the eye sees it teleport.

    report = fidelity(frames, clip)          # frames (T, H, W, 3) uint8, clip from world.start_image
    per_section([report["intact_per_frame"], ...], sections=6, frames_per_section=36)   # where runs fail
"""

from __future__ import annotations

import numpy as np

BACKGROUND_DISTANCE = 60.0  # the world's backgrounds are dark and its colours bright: far more than this apart
SPECK_FRACTION = 0.1
COLOUR_DISTANCE = 60.0
AREA_BAND = (0.5, 2.0)
JUMP_LIMIT = 0.08  # issue 19's target for the largest jump, as a fraction of the width


def label_blobs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a (H, W) bool mask: (labels (H, W) int, 0 = background; count).

    Minimum-label propagation with array shifts until nothing changes (the frames are small: a few dozen
    passes), then the labels renumbered 1..count."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        before = labels
        shifted = labels.copy()
        shifted[1:] = np.minimum(shifted[1:], labels[:-1])
        shifted[:-1] = np.minimum(shifted[:-1], labels[1:])
        shifted[:, 1:] = np.minimum(shifted[:, 1:], labels[:, :-1])
        shifted[:, :-1] = np.minimum(shifted[:, :-1], labels[:, 1:])
        labels = np.where(mask, shifted, big)
        if np.array_equal(labels, before):
            break
    roots = np.unique(labels[mask])
    renumbered = np.zeros((h, w), np.int64)
    renumbered[mask] = np.searchsorted(roots, labels[mask]) + 1
    return renumbered, len(roots)


def foreground(frames: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Which pixels of (..., 3) ``frames`` belong to an object: farther than BACKGROUND_DISTANCE from ``background``."""
    return np.linalg.norm(frames.astype(np.float32) - np.asarray(background, np.float32), axis=-1) > BACKGROUND_DISTANCE


def blobs(frame: np.ndarray, background: tuple[int, int, int], min_area: float) -> list[dict]:
    """The blobs of one (H, W, 3) frame that differ from ``background``, largest first: area (px), mean colour,
    centroid (x, y) in pixels."""
    labels, count = label_blobs(foreground(frame, background))
    out = []
    for k in range(1, count + 1):
        ys, xs = np.nonzero(labels == k)
        if len(xs) < min_area:
            continue
        out.append({"area": int(len(xs)), "colour": frame[ys, xs].astype(np.float32).mean(axis=0),
                    "centroid": (float(xs.mean()), float(ys.mean()))})
    return sorted(out, key=lambda b: -b["area"])


def fidelity(frames: np.ndarray, clip) -> dict:
    """The measures of the module docstring over (T, H, W, 3) frames of ``clip``'s scene (its first object is
    the one to keep): per-frame flags and their rates, and the largest centroid jump."""
    start = blobs(frames[0], clip.background, 1)
    if not start:
        raise ValueError("the start frame holds no object against its background")
    start_area, start_colour = start[0]["area"], np.asarray(clip.objects[0].rgb, np.float32)
    one, colour, area, centroids = [], [], [], []
    for frame in frames:
        found = blobs(frame, clip.background, SPECK_FRACTION * start_area)
        single = len(found) == 1
        blob = found[0] if found else None
        one.append(single)
        colour.append(bool(blob is not None and np.linalg.norm(blob["colour"] - start_colour) <= COLOUR_DISTANCE))
        area.append(bool(blob is not None and AREA_BAND[0] <= blob["area"] / start_area <= AREA_BAND[1]))
        centroids.append(blob["centroid"] if single else (np.nan, np.nan))
    intact = np.array(one) & np.array(colour) & np.array(area)
    kept = np.flatnonzero(intact)
    xy = np.asarray(centroids, np.float64)[kept]
    moved = np.linalg.norm(np.diff(xy, axis=0), axis=1) / frames.shape[2]  # between consecutive intact frames
    missing = np.diff(kept) - 1  # frames between them: 0 where the two are consecutive frames
    steps = moved[missing == 0]
    across = np.maximum(moved - missing * clip.config.speed, 0.0)  # a ball slower than the world did not jump
    return {"frames": len(frames), "one_object": float(np.mean(one)), "colour_ok": float(np.mean(colour)),
            "area_ok": float(np.mean(area)), "intact": float(intact.mean()),
            "largest_jump": float(steps.max()) if len(steps) else float("nan"),
            "largest_jump_across_gaps": float(across.max()) if len(across) else float("nan"),
            "intact_per_frame": intact}


def per_section(intact_runs: list[np.ndarray], sections: int, frames_per_section: int) -> list[float]:
    """The intact rate of each section over several runs, frame-weighted. Frame 0 (the start image) is in no
    section; section k is frames 1 + n k .. n (k + 1) for n = ``frames_per_section`` (a stream emits 4 window
    frames a section), so a run whose decoder holds back its last frames has a shorter last section, not
    shifted ones. Shows where a run fails: the turn, the first section, or the end."""
    if sections < 1 or frames_per_section < 1:
        raise ValueError(f"sections and frames_per_section must be >= 1, got {sections} and {frames_per_section}")
    kept, seen = np.zeros(sections), np.zeros(sections)
    for intact in intact_runs:
        intact = np.asarray(intact, bool)
        if len(intact) > 1 + sections * frames_per_section:
            raise ValueError(f"a run has {len(intact)} frames, more than {sections} sections of "
                             f"{frames_per_section} after the start: pass the run's own section count and length")
        for k in range(sections):
            part = intact[1 + frames_per_section * k : 1 + frames_per_section * (k + 1)]
            kept[k] += part.sum()
            seen[k] += len(part)
    if not seen.all():
        raise ValueError(f"no run reaches section {int(np.argmin(seen > 0))}: its frames are missing (did the "
                         "stream stop early?)")
    return (kept / seen).tolist()


def turns_over(details: list[dict], limit: float = JUMP_LIMIT) -> int:
    """Turns (per-turn reports) whose largest jump across gaps exceeds ``limit`` or that have no two intact
    frames to measure it between (NaN: the worst turns, not the best)."""
    return sum(not d["largest_jump_across_gaps"] <= limit for d in details)


def summarize(reports: list[dict]) -> dict:
    """Frame-weighted rates over several runs and the largest jump of any."""
    frames = sum(r["frames"] for r in reports)
    rates = {k: sum(r[k] * r["frames"] for r in reports) / frames
             for k in ("one_object", "colour_ok", "area_ok", "intact")}

    def largest(key: str) -> float:
        values = [r[key] for r in reports if not np.isnan(r[key])]
        return max(values) if values else float("nan")

    return {"runs": len(reports), "frames": frames, **rates, "largest_jump": largest("largest_jump"),
            "largest_jump_across_gaps": largest("largest_jump_across_gaps")}
