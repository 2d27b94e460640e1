"""The numbers of ``framepack-rt bench``: statistics helpers, what one run's records come to, the printed table,
the JSON and the plot. Pure functions over plain records, so they are tested without a server.

Definitions (also written into the JSON's ``config.definitions``):

* frame interval: time between consecutive frames arriving (decoded) at a viewer; every paced tick counts,
  new or held (a held frame repeats the last picture when generation is slower than playback);
* jitter: mean absolute deviation of the intervals from the nominal 1/fps;
* deadline miss: an interval longer than 1.5/fps (the frame came later than halfway into the next slot);
* glass-to-glass: a stamped frame's first decoded arrival at a viewer minus the server's send time of it
  (when its track handed it to the encoders), same machine and clock (time.monotonic);
* prompt-to-effect: from sending the prompt message to the first frame at the viewer that was generated
  under the new prompt, matched exactly (frame number in the pixels -> its section -> that section's prompt).
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

METRICS = ("ttff_ms", "section_ms_p50", "section_ms_p95", "gen_fps", "play_fps", "frame_interval_ms_p50",
           "frame_interval_ms_p95", "frame_interval_ms_p99", "jitter_ms", "deadline_miss_rate",
           "prompt_to_effect_ms", "glass_to_glass_ms_p50", "glass_to_glass_ms_p95", "encode_ms_p50")
MISS_FACTOR = 1.5
DEFINITIONS = {
    "frame_interval": "time between consecutive decoded frames at a viewer (all paced ticks, new or held)",
    "jitter": "mean absolute deviation of frame intervals from 1/fps, ms",
    "deadline_miss": f"frame interval > {MISS_FACTOR}/fps; rate = misses / intervals",
    "glass_to_glass": "first decoded arrival of a stamped frame minus the server's send time (track -> encoders)",
    "prompt_to_effect": "prompt message sent -> first frame generated under it decoded, matched by stamp",
    "ttff": "POST /offer sent -> first decoded frame (median over viewers)",
    "gen_fps": "frames generated per second of generation (section frames / section ms)",
    "play_fps": "distinct generated frames decoded per second at the first viewer",
}


# -- statistics ---------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation between samples, numpy's default); None if empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def intervals_ms(arrivals: Sequence[float]) -> list[float]:
    """Gaps between consecutive arrival times (seconds in), in milliseconds."""
    return (np.diff(np.asarray(arrivals, dtype=np.float64)) * 1000).tolist()


def jitter_ms(intervals: Sequence[float], fps: float) -> float | None:
    """Mean absolute deviation of the intervals (ms) from the nominal 1000/fps."""
    if not len(intervals):
        return None
    return float(np.mean(np.abs(np.asarray(intervals, dtype=np.float64) - 1000 / fps)))


def deadline_miss_rate(intervals: Sequence[float], fps: float, factor: float = MISS_FACTOR) -> float | None:
    """Fraction of intervals (ms) longer than ``factor`` frame periods."""
    if not len(intervals):
        return None
    return float(np.mean(np.asarray(intervals, dtype=np.float64) > factor * 1000 / fps))


def first_arrivals(arrivals: Sequence[float], stamps: Sequence[int | None]) -> list[tuple[int, float]]:
    """(frame number, time) of the first arrival of each stamped frame; held repeats and unread ones skipped."""
    seen: set[int] = set()
    out = []
    for t, n in zip(arrivals, stamps):
        if n is not None and n not in seen:
            seen.add(n)
            out.append((n, t))
    return out


def glass_to_glass(arrivals: Sequence[float], stamps: Sequence[int | None],
                   sent: dict[int, float]) -> list[tuple[float, float]]:
    """(arrival time, latency ms) of each stamped frame whose send time is known."""
    return [(t, (t - sent[n]) * 1000) for n, t in first_arrivals(arrivals, stamps) if n in sent]


def section_of_frame(sections: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Frame number -> the server's "section" message it belongs to (from each message's "frames" range)."""
    table: dict[int, dict[str, Any]] = {}
    for s in sections:
        first, last = s["frames"]
        for n in range(first, last + 1):
            table[n] = s
    return table


def prompt_to_effect_ms(arrivals: Sequence[float], stamps: Sequence[int | None],
                        sections: Iterable[dict[str, Any]], prompt: str, sent_at: float,
                        from_section: int = 0) -> float | None:
    """ms from ``sent_at`` to the first frame decoded after it that was generated under ``prompt``.

    Exact: a frame's number (read from its pixels) gives its section, the section message gives its prompt.
    ``from_section`` (the ack's section) excludes earlier sections that happened to use the same text.
    """
    owner = section_of_frame(sections)
    for t, n in zip(arrivals, stamps):
        s = owner.get(n) if n is not None else None
        if t >= sent_at and s is not None and s["prompt"] == prompt and s["index"] >= from_section:
            return (t - sent_at) * 1000
    return None


# -- one run ------------------------------------------------------------------------------------------------

@dataclass
class ViewerRecord:
    """What one viewer saw: arrival times (time.monotonic() s), the stamp read from each frame, its offer."""

    name: str
    offer: float
    arrivals: list[float]
    stamps: list[int | None]

    def window(self, start: float, end: float) -> "ViewerRecord":
        keep = [i for i, t in enumerate(self.arrivals) if start <= t <= end]
        return ViewerRecord(self.name, self.offer, [self.arrivals[i] for i in keep], [self.stamps[i] for i in keep])

    @property
    def ttff_ms(self) -> float | None:
        """Offer sent -> first frame, None if either is unknown."""
        if not self.arrivals or not math.isfinite(self.offer):
            return None
        return (self.arrivals[0] - self.offer) * 1000


@dataclass
class RunRecord:
    """Everything a run measured, before statistics. Times are time.monotonic() seconds."""

    fps: float
    viewers: list[ViewerRecord]
    sections: list[dict[str, Any]]  # the server's "section" messages, as the first viewer got them
    sent: dict[int, float] = field(default_factory=dict)  # frame number -> server send time; {} if unknown
    start: float = 0.0  # the measured window: first generated frame at the first viewer ...
    end: float = float("inf")  # ... to the end of streaming
    prompt: str | None = None  # the prompt change: its text, when it was sent, the ack's section
    prompt_sent: float | None = None
    ack_section: int = 0
    encode_ms: list[float] = field(default_factory=list)
    plotted_only: list[ViewerRecord] = field(default_factory=list)  # e.g. the browser: plotted, not pooled


def summarize(run: RunRecord) -> dict[str, float | None]:
    """The 14 metrics of :data:`METRICS` for one run (None where not measurable)."""
    views = [v.window(run.start, run.end) for v in run.viewers]
    intervals = [i for v in views for i in intervals_ms(v.arrivals)]
    g2g = [ms for v in views for _, ms in glass_to_glass(v.arrivals, v.stamps, run.sent)]
    ttffs = [t for t in (v.ttff_ms for v in run.viewers) if t is not None]
    section_ms = [float(s["ms"]) for s in run.sections]
    frames = sum(s["frames"][1] - s["frames"][0] + 1 for s in run.sections)
    first = views[0] if views else None
    play_fps = None
    if first is not None and first.arrivals:
        distinct = len(first_arrivals(first.arrivals, first.stamps))
        span = first.arrivals[-1] - first.arrivals[0]
        play_fps = distinct / span if span > 0 and distinct else None
    effect = None
    if run.prompt is not None and run.prompt_sent is not None and run.viewers:
        v = run.viewers[0]
        effect = prompt_to_effect_ms(v.arrivals, v.stamps, run.sections, run.prompt, run.prompt_sent,
                                     run.ack_section)
    return {
        "ttff_ms": float(np.median(ttffs)) if ttffs else None,
        "section_ms_p50": percentile(section_ms, 50),
        "section_ms_p95": percentile(section_ms, 95),
        "gen_fps": frames / (sum(section_ms) / 1000) if section_ms and sum(section_ms) > 0 else None,
        "play_fps": play_fps,
        "frame_interval_ms_p50": percentile(intervals, 50),
        "frame_interval_ms_p95": percentile(intervals, 95),
        "frame_interval_ms_p99": percentile(intervals, 99),
        "jitter_ms": jitter_ms(intervals, run.fps),
        "deadline_miss_rate": deadline_miss_rate(intervals, run.fps),
        "prompt_to_effect_ms": effect,
        "glass_to_glass_ms_p50": percentile(g2g, 50),
        "glass_to_glass_ms_p95": percentile(g2g, 95),
        "encode_ms_p50": percentile(run.encode_ms, 50),
    }


def held_fraction(viewer: ViewerRecord) -> float | None:
    """Share of stamped frames that repeated the previous picture (generation slower than playback)."""
    pairs = [(a, b) for a, b in zip(viewer.stamps, viewer.stamps[1:]) if a is not None and b is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def rounded(values: dict[str, Any], digits: int = 2) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


# -- machine, table, JSON, plot -----------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU model, cores, library versions, GPU if any, and the load average (a shared machine skews timings)."""
    import aiortc
    import av
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "aiortc": aiortc.__version__, "av": av.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}{unit}" if abs(value) < 1 and unit == "" else f"{value:.1f}{unit}"
    return f"{value}{unit}"


def table(result: dict[str, Any], extras: dict[str, Any] | None = None) -> str:
    """The printed summary: the metrics, ``extras`` (context, not in the JSON) and any scaling series."""
    units = {"gen_fps": " fps", "play_fps": " fps", "deadline_miss_rate": ""}
    lines = [f"{'metric':<24} value"]
    for key in METRICS:
        lines.append(f"{key:<24} {_fmt(result[key], units.get(key, ' ms'))}")
    for key, value in (extras or {}).items():
        lines.append(f"  {key:<22} {_fmt(value, ' ms' if key == 'first generated frame' else '')}")
    browser = result.get("browser")
    if browser:
        lines.append("headless Chromium viewer (display times from requestVideoFrameCallback):")
        lines += [f"  {key:<22} {_fmt(value)}" for key, value in browser.items()]
    scaling = result.get("scaling") or {}
    rows = (scaling.get("sections") or {}).get("rows")
    if rows:
        lines.append(f"\n{'section':>7} {'packed ms':>10} {'naive ms':>10}   (context_scaling, tiny transformer)")
        lines += [f"{r['section']:>7} {r['packed_ms']:>10.1f} {r['naive_ms']:>10.1f}" for r in rows]
    sweep = scaling.get("viewers")
    if sweep:
        lines.append(f"\n{'viewers':>7} {'ttff ms':>9} {'interval p95':>13} {'g2g p50':>9}")
        lines += [f"{r['viewers']:>7} {_fmt(r['ttff_ms']):>9} {_fmt(r['frame_interval_ms_p95']):>13} "
                  f"{_fmt(r['glass_to_glass_ms_p50']):>9}" for r in sweep]
    m = result["machine"]
    lines.append(f"\nmachine: {m['cpu']}, {m['cores']} cores, gpu {m['gpu'] or 'none'}, torch {m['torch']}, "
                 f"aiortc {m['aiortc']}, load avg {m['load_avg_1m']}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def plot(run: RunRecord, result: dict[str, Any], path: str | Path) -> None:
    """Per-frame latency over time (glass-to-glass, or the frame interval without stamps), prompt marked;
    panels for the scaling series when measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    scaling = result.get("scaling") or {}
    panels = 1 + bool((scaling.get("sections") or {}).get("rows")) + bool(scaling.get("viewers"))
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.4 * panels), squeeze=False)
    ax = axes[0][0]
    stamped = bool(run.sent)
    for v in run.viewers + run.plotted_only:
        w = v.window(run.start, run.end)
        if stamped:
            pts = glass_to_glass(w.arrivals, w.stamps, run.sent)
            xs, ys = [t - run.start for t, _ in pts], [ms for _, ms in pts]
        else:
            xs, ys = [t - run.start for t in w.arrivals[1:]], intervals_ms(w.arrivals)
        ax.plot(xs, ys, ".", markersize=3, label=v.name)
    if run.prompt_sent is not None:
        ax.axvline(run.prompt_sent - run.start, color="red", linestyle="--", label="prompt sent")
        if result.get("prompt_to_effect_ms") is not None:
            ax.axvline(run.prompt_sent - run.start + result["prompt_to_effect_ms"] / 1000, color="green",
                       linestyle="--", label="new prompt on screen")
    ax.set_xlabel("seconds since the first generated frame")
    ax.set_ylabel("glass-to-glass ms" if stamped else "frame interval ms")
    ax.set_title("per-frame latency at the viewers" if stamped else "frame intervals at the viewers")
    ax.legend(loc="upper right", fontsize=8)
    row = 1
    rows = (scaling.get("sections") or {}).get("rows")
    if rows:
        ax = axes[row][0]
        ax.plot([r["section"] for r in rows], [r["packed_ms"] for r in rows], "o-", label="packed (framepack-rt)")
        ax.plot([r["section"] for r in rows], [r["naive_ms"] for r in rows], "s-", label="naive full history")
        ax.set_xlabel("section index")
        ax.set_ylabel("section ms")
        ax.legend(fontsize=8)
        row += 1
    sweep = scaling.get("viewers")
    if sweep:
        ax = axes[row][0]
        ns = [r["viewers"] for r in sweep]
        for key in ("ttff_ms", "frame_interval_ms_p95", "glass_to_glass_ms_p50"):
            ax.plot(ns, [r[key] if r[key] is not None else np.nan for r in sweep], "o-", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("viewers of one session")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
