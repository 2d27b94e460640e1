"""Section schedules as data: which frame indices and which history latents feed each section.

FramePack denoises ``window`` latent frames per section (default 9), conditioned on already known latents
that are compressed more the older they are (1x / 2x / 4x patchify kernels). Where those latents sit on the
model's time axis (the RoPE frame indices) and which history latent goes to which scale is described here as
plain frozen dataclasses, so a packing schedule is a value, not a code path:

* :class:`CompressionPattern` -- how many history latents at each scale and whether the start frame keeps a
  full-resolution slot of its own.
* :class:`SectionLayout` -- one section: the named segments of the index axis in order, which segments feed
  ``indices_latents`` (noisy) / ``indices_latents_clean`` / ``indices_latents_history_2x`` /
  ``indices_latents_history_4x``, and which part of the history window feeds each scale.
* :class:`Schedule` -- a whole generation: order (forward or inverted), pattern, window, number of sections,
  the per-section layouts and the video-frame bookkeeping.

Conventions (those of the released FramePack demos, ``w = window``):

* F1 forward / streaming: index axis split ``[1, 16, 2, 1, w]`` = start | 4x | 2x | 1x | noisy. The history
  window is the newest ``K = 19`` latents in clip order (oldest first); 4x = window[0:16], 2x =
  window[16:18], 1x = window[18:19]; clean = cat(start latent, 1x) with indices cat([0], [19]). History starts
  as 19 zeros followed by the start latent, generated latents are appended. Indices never change.
* Inverted anti-drifting (fixed-length clip, the first section generated is the END of the clip): index axis
  split ``[1, pad, w, 1, 2, 16]`` = start | blank | noisy | 1x ("post") | 2x | 4x with ``pad =
  latent_padding * w``. The history window is the FIRST ``K`` latents of a history kept in clip order, to
  which new sections are prepended: 1x = window[0:1], 2x = window[1:3], 4x = window[3:19]. History starts as
  zeros, with an optional end latent at window[0]. The section with ``latent_padding == 0`` is the last one;
  there the start latent is prepended to that section's output.
* Vanilla: forward order with the start frame treated as ordinary history (no start slot): split
  ``[16, 2, 1, w]``.

All index tensors are int64 and 1-D (diffusers' ``HunyuanVideoFramepackTransformer3DModel`` meshgrids them, so
1-D is what its forward takes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

__all__ = [
    "Order",
    "CompressionPattern",
    "F1_PATTERN",
    "VANILLA_PATTERN",
    "GEOMETRIC_PATTERN",
    "Segment",
    "SectionLayout",
    "Schedule",
    "DEFAULT_WINDOW",
    "VIDEO_FPS",
    "VAE_TEMPORAL_FACTOR",
    "latent_paddings",
    "num_sections",
    "video_frames_for_latents",
    "forward_layout",
    "f1_layout",
    "vanilla_layout",
    "inverted_layout",
    "f1_schedule",
    "vanilla_schedule",
    "inverted_schedule",
    "custom_schedule",
]

DEFAULT_WINDOW = 9
"""Default ``latent_window_size`` of the release."""

VIDEO_FPS = 30
"""Frame rate the release assumes when it turns seconds into sections."""

VAE_TEMPORAL_FACTOR = 4
"""HunyuanVideo's causal 3D VAE: one latent frame = 4 video frames, except the first (1 frame)."""

# Segment names (the index axis of one section is a sequence of these, in an order set by the layout).
START = "start"
BLANK = "blank"
NOISY = "noisy"
CLEAN_1X = "clean_1x"
HISTORY_2X = "history_2x"
HISTORY_4X = "history_4x"


class Order(str, enum.Enum):
    """In which temporal direction sections are generated."""

    FORWARD = "forward"
    """Causal: each section continues the clip (F1, vanilla). New latents are appended."""

    INVERTED = "inverted"
    """Inverted anti-drifting: the first section is the end of the clip. New latents are prepended."""


@dataclass(frozen=True)
class CompressionPattern:
    """How the history window is packed: latent frames per scale and the start frame's treatment.

    Counts are per scale, newest -> oldest: the ``num_1x`` newest history latents are patchified at full
    resolution (kernel (1,2,2)), the next ``num_2x`` with (2,4,4), the ``num_4x`` oldest with (4,8,8). The
    history window therefore holds ``num_history = num_1x + num_2x + num_4x`` latents (K).

    ``start_full_resolution``: the start latent gets a 1x slot of its own at frame index 0 in every section
    (F1 and the inverted demo: the start frame is "equally important" as the newest frame). When False it is
    just another history latent (it enters the window as its newest latent before section 1 and scrolls out).
    """

    num_1x: int = 1
    num_2x: int = 2
    num_4x: int = 16
    start_full_resolution: bool = True

    def __post_init__(self) -> None:
        for name in ("num_1x", "num_2x", "num_4x"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    @property
    def num_history(self) -> int:
        """K: history latents the window holds (19 for the released pattern)."""
        return self.num_1x + self.num_2x + self.num_4x

    @property
    def num_clean(self) -> int:
        """Latent frames in ``latents_clean``: the start slot (if any) plus the 1x history latents."""
        return self.num_1x + int(self.start_full_resolution)


F1_PATTERN = CompressionPattern(1, 2, 16, start_full_resolution=True)
"""The released pattern (F1 and inverted): 1x:1, 2x:2, 4x:16, start frame at full resolution."""

VANILLA_PATTERN = CompressionPattern(1, 2, 16, start_full_resolution=False)
"""Same counts, no start anchor: the start frame is ordinary history (the drifting baseline)."""

GEOMETRIC_PATTERN = CompressionPattern(2, 4, 8, start_full_resolution=True)
"""A geometric example (1x:2, 2x:4, 4x:8, K = 14)."""


@dataclass(frozen=True)
class Segment:
    """A named run of consecutive frame indices of one section's index axis."""

    name: str
    size: int


def _check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")


@dataclass(frozen=True)
class SectionLayout:
    """The index layout of one section.

    The index axis ``0 .. length-1`` is cut into :attr:`segments` (named splits, in order):

    * forward: ``start(s) | history_4x(n4) | history_2x(n2) | clean_1x(n1) | noisy(w)``
    * inverted: ``start(s) | blank(latent_padding * w) | noisy(w) | clean_1x(n1) | history_2x(n2) |
      history_4x(n4)``

    with ``s = 1`` if ``pattern.start_full_resolution`` else 0. The model inputs take their indices from:
    ``indices_latents`` = noisy; ``indices_latents_clean`` = cat(start, clean_1x); ``indices_latents_history_2x``
    = history_2x; ``indices_latents_history_4x`` = history_4x. The blank segment feeds nothing (it is the gap
    the not-yet-generated middle of the clip will fill).

    The history window (K latents, clip order, oldest first -- see :attr:`history_slices`) feeds the scales:
    forward 4x = [0, n4), 2x = [n4, n4+n2), 1x = [n4+n2, K) (newest at 1x); inverted 1x = [0, n1),
    2x = [n1, n1+n2), 4x = [n1+n2, K) (the latents right after the noisy window, in clip time, at 1x).
    """

    order: Order
    pattern: CompressionPattern = F1_PATTERN
    window: int = DEFAULT_WINDOW
    latent_padding: int = 0
    """Blank gap in windows (the demo's ``latent_padding``); inverted only. ``0`` marks the last section."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", Order(self.order))
        _check_window(self.window)
        if not isinstance(self.latent_padding, int) or self.latent_padding < 0:
            raise ValueError(f"latent_padding must be a non-negative int, got {self.latent_padding!r}")
        if self.order is Order.FORWARD and self.latent_padding != 0:
            raise ValueError("latent_padding only exists for the inverted order")
        if self.order is Order.INVERTED and not self.pattern.start_full_resolution:
            raise ValueError(
                "the inverted order needs start_full_resolution=True: its history never contains the start "
                "frame (the start frame is the target), so without the start slot it would not condition at all"
            )

    # ----------------------------------------------------------------------------------------- segments
    @property
    def segments(self) -> tuple[Segment, ...]:
        """The named splits of the index axis, in index order (zero-size segments included)."""
        p = self.pattern
        start = Segment(START, int(p.start_full_resolution))
        if self.order is Order.FORWARD:
            return (
                start,
                Segment(HISTORY_4X, p.num_4x),
                Segment(HISTORY_2X, p.num_2x),
                Segment(CLEAN_1X, p.num_1x),
                Segment(NOISY, self.window),
            )
        return (
            start,
            Segment(BLANK, self.blank),
            Segment(NOISY, self.window),
            Segment(CLEAN_1X, p.num_1x),
            Segment(HISTORY_2X, p.num_2x),
            Segment(HISTORY_4X, p.num_4x),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Segment names in index order."""
        return tuple(s.name for s in self.segments)

    @property
    def splits(self) -> tuple[int, ...]:
        """Segment sizes in index order: what ``torch.arange(length).split(splits)`` cuts."""
        return tuple(s.size for s in self.segments)

    @property
    def length(self) -> int:
        """Total length of the index axis (``sum(splits)``)."""
        return sum(self.splits)

    @property
    def blank(self) -> int:
        """Blank latent frames (``latent_padding * window``)."""
        return self.latent_padding * self.window

    @property
    def num_history(self) -> int:
        """K: history latents this section reads."""
        return self.pattern.num_history

    def segment(self, name: str) -> range:
        """Frame indices of segment ``name`` (an empty range for a zero-size or absent segment)."""
        offset = 0
        for seg in self.segments:
            if seg.name == name:
                return range(offset, offset + seg.size)
            offset += seg.size
        if name in (START, BLANK, NOISY, CLEAN_1X, HISTORY_2X, HISTORY_4X):
            return range(offset, offset)
        raise KeyError(f"unknown segment {name!r}")

    # ------------------------------------------------------------------------------ model-input mapping
    @property
    def index_ranges(self) -> dict[str, tuple[range, ...]]:
        """For each model index input, the index ranges that are concatenated to form it."""
        return {
            "indices_latents": (self.segment(NOISY),),
            "indices_latents_clean": (self.segment(START), self.segment(CLEAN_1X)),
            "indices_latents_history_2x": (self.segment(HISTORY_2X),),
            "indices_latents_history_4x": (self.segment(HISTORY_4X),),
        }

    @property
    def history_slices(self) -> dict[str, slice]:
        """Which positions of the K-latent history window (clip order, oldest first) feed each scale.

        Keys: ``"clean_1x"`` (appended after the start latent in ``latents_clean``), ``"history_2x"``,
        ``"history_4x"``. Depends only on order and pattern, never on the section.
        """
        p = self.pattern
        if self.order is Order.FORWARD:
            a, b = p.num_4x, p.num_4x + p.num_2x
            return {HISTORY_4X: slice(0, a), HISTORY_2X: slice(a, b), CLEAN_1X: slice(b, p.num_history)}
        a, b = p.num_1x, p.num_1x + p.num_2x
        return {CLEAN_1X: slice(0, a), HISTORY_2X: slice(a, b), HISTORY_4X: slice(b, p.num_history)}

    # ------------------------------------------------------------------------------------ index tensors
    def _cat(self, key: str, device: Optional[torch.device | str]) -> torch.Tensor:
        values = [i for r in self.index_ranges[key] for i in r]
        return torch.tensor(values, dtype=torch.int64, device=device)

    def indices_latents(self, device: Optional[torch.device | str] = None) -> torch.Tensor:
        """Frame indices of the noisy window, shape (w,), int64."""
        return self._cat("indices_latents", device)

    def indices_latents_clean(self, device: Optional[torch.device | str] = None) -> Optional[torch.Tensor]:
        """cat(start index, 1x indices), shape (pattern.num_clean,), or None when that is empty."""
        return self._cat("indices_latents_clean", device) if self.pattern.num_clean else None

    def indices_latents_history_2x(self, device: Optional[torch.device | str] = None) -> Optional[torch.Tensor]:
        """Indices of the 2x latents, shape (num_2x,), or None when num_2x == 0."""
        return self._cat("indices_latents_history_2x", device) if self.pattern.num_2x else None

    def indices_latents_history_4x(self, device: Optional[torch.device | str] = None) -> Optional[torch.Tensor]:
        """Indices of the 4x latents, shape (num_4x,), or None when num_4x == 0."""
        return self._cat("indices_latents_history_4x", device) if self.pattern.num_4x else None

    def indices(self, device: Optional[torch.device | str] = None) -> dict[str, Optional[torch.Tensor]]:
        """All four index tensors keyed by the model's forward() keyword names (fresh tensors)."""
        return {
            "indices_latents": self.indices_latents(device),
            "indices_latents_clean": self.indices_latents_clean(device),
            "indices_latents_history_2x": self.indices_latents_history_2x(device),
            "indices_latents_history_4x": self.indices_latents_history_4x(device),
        }


# ------------------------------------------------------------------------------------ layout constructors
def forward_layout(pattern: CompressionPattern = F1_PATTERN, window: int = DEFAULT_WINDOW) -> SectionLayout:
    """Forward-order layout for any pattern."""
    return SectionLayout(Order.FORWARD, pattern, window)


def f1_layout(window: int = DEFAULT_WINDOW) -> SectionLayout:
    """The F1 layout: split [1, 16, 2, 1, w]; the same for every section."""
    return SectionLayout(Order.FORWARD, F1_PATTERN, window)


def vanilla_layout(window: int = DEFAULT_WINDOW) -> SectionLayout:
    """Vanilla (no start anchor): split [16, 2, 1, w]; the same for every section."""
    return SectionLayout(Order.FORWARD, VANILLA_PATTERN, window)


def inverted_layout(
    latent_padding: int, window: int = DEFAULT_WINDOW, pattern: CompressionPattern = F1_PATTERN
) -> SectionLayout:
    """Inverted layout: split [1, latent_padding * w, w, 1, 2, 16] for the released pattern."""
    return SectionLayout(Order.INVERTED, pattern, window, latent_padding)


# -------------------------------------------------------------------------------------- section counting
def latent_paddings(n: int) -> list[int]:
    """The inverted demo's padding sequence for ``n`` sections (in generation order).

    ``list(reversed(range(n)))``, and for ``n > 4``: ``[3] + [2] * (n - 3) + [1, 0]`` (the gap is capped at
    3 windows; the release notes this works better than the plain countdown). The last entry is always 0.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n > 4:
        return [3] + [2] * (n - 3) + [1, 0]
    return list(reversed(range(n)))


def num_sections(seconds: float, window: int = DEFAULT_WINDOW, fps: int = VIDEO_FPS) -> int:
    """Sections for a clip of ``seconds``: ``max(round(seconds * fps / (4 * window)), 1)``.

    Python's ``round`` (half to even), exactly as the released demos (inverted and F1) compute it:
    5 s, w = 9 -> round(4.17) = 4; 3 s -> round(2.5) = 2.
    """
    _check_window(window)
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
    return int(max(round(seconds * fps / (VAE_TEMPORAL_FACTOR * window)), 1))


def video_frames_for_latents(num_latents: int) -> int:
    """Video frames a contiguous run of latents decodes to: ``4 * L - 3`` (0 for 0 latents).

    The causal VAE maps the first latent to 1 frame and every later one to 4.
    """
    if num_latents < 0:
        raise ValueError("num_latents must be >= 0")
    return 0 if num_latents == 0 else VAE_TEMPORAL_FACTOR * (num_latents - 1) + 1


# ---------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """A whole generation: order, pattern, window, number of sections, per-section layouts.

    ``num_sections=None`` means an open-ended stream (forward order only). ``has_end_frame`` (inverted only)
    says the history window starts with the end latent at position 0.

    Frame bookkeeping (the rule implemented by :meth:`output_latents`, :meth:`section_frames`,
    :meth:`total_frames`): the output after sections ``0..k`` is one contiguous latent run of length
    ``L_k`` decoded by the causal VAE to ``4 * L_k - 3`` frames, and section ``k`` contributes
    ``frames(L_k) - frames(L_{k-1})`` new video frames (``frames(L_{-1}) = 0``).

    * forward: ``L_k = (k + 1) * w``, plus 1 when ``include_start_frame`` (the start latent decoded in front,
      which is what the F1 demo writes). w = 9: 33, 36, 36, ... (with the start frame: 37, 36, 36, ...).
    * inverted: ``L_k = (k + 1) * w``, plus 1 on the last section, where the start latent is prepended (always
      part of the clip). w = 9, 4 sections (5 s): 33, 36, 36, 40 = 145 = 4 * n * w + 1 frames.

    In the inverted order section ``k``'s frames land in front of the earlier ones (it is earlier in clip time).
    """

    name: str
    order: Order
    pattern: CompressionPattern = F1_PATTERN
    window: int = DEFAULT_WINDOW
    num_sections: Optional[int] = None
    has_end_frame: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", Order(self.order))
        _check_window(self.window)
        if self.num_sections is not None and (not isinstance(self.num_sections, int) or self.num_sections < 1):
            raise ValueError(f"num_sections must be a positive int or None, got {self.num_sections!r}")
        if self.order is Order.INVERTED:
            if self.num_sections is None:
                raise ValueError("the inverted order needs the number of sections up front")
            SectionLayout(Order.INVERTED, self.pattern, self.window)  # validates the pattern for this order
        elif self.has_end_frame:
            raise ValueError("an end frame only exists for the inverted order")

    @property
    def num_history(self) -> int:
        """K: history latents every section reads."""
        return self.pattern.num_history

    @property
    def latent_paddings(self) -> Optional[tuple[int, ...]]:
        """Inverted: the padding of each section (generation order). Forward: None."""
        if self.order is Order.FORWARD:
            return None
        assert self.num_sections is not None
        return tuple(latent_paddings(self.num_sections))

    def _check_k(self, k: int) -> None:
        if k < 0 or (self.num_sections is not None and k >= self.num_sections):
            raise IndexError(f"section {k} out of range for {self.num_sections} sections")

    def layout(self, k: int) -> SectionLayout:
        """Layout of section ``k`` (0-based, generation order)."""
        self._check_k(k)
        if self.order is Order.FORWARD:
            return SectionLayout(Order.FORWARD, self.pattern, self.window)
        paddings = self.latent_paddings
        assert paddings is not None
        return SectionLayout(Order.INVERTED, self.pattern, self.window, paddings[k])

    def layouts(self) -> Iterator[SectionLayout]:
        """All layouts in generation order (endless for an open-ended stream)."""
        k = 0
        while self.num_sections is None or k < self.num_sections:
            yield self.layout(k)
            k += 1

    def is_last(self, k: int) -> bool:
        """Whether section ``k`` is the last one (never, for an open-ended stream)."""
        self._check_k(k)
        return self.num_sections is not None and k == self.num_sections - 1

    def prepends_start(self, k: int) -> bool:
        """Inverted only: section ``k`` has padding 0, so its output gets the start latent in front."""
        return self.order is Order.INVERTED and self.is_last(k)

    def output_latents(self, k: int, include_start_frame: bool = False) -> int:
        """``L_k``: latents of the output once sections ``0..k`` are done (see the class docstring).

        ``include_start_frame`` only matters for the forward order; the inverted clip always includes it.
        """
        self._check_k(k)
        latents = (k + 1) * self.window
        if self.order is Order.INVERTED:
            return latents + int(self.is_last(k))
        return latents + int(include_start_frame)

    def section_frames(self, k: int, include_start_frame: bool = False) -> int:
        """New video frames section ``k`` adds: ``frames(L_k) - frames(L_{k-1})``."""
        now = video_frames_for_latents(self.output_latents(k, include_start_frame))
        before = video_frames_for_latents(self.output_latents(k - 1, include_start_frame)) if k > 0 else 0
        return now - before

    def total_frames(self, include_start_frame: bool = False) -> int:
        """Video frames of the finished clip (finite schedules only). Inverted: ``4 * n * w + 1``."""
        if self.num_sections is None:
            raise ValueError("an open-ended stream has no total length")
        return video_frames_for_latents(self.output_latents(self.num_sections - 1, include_start_frame))


# ---------------------------------------------------------------------------------- schedule constructors
def f1_schedule(window: int = DEFAULT_WINDOW, num_sections: Optional[int] = None) -> Schedule:
    """F1 forward streaming (the released pattern, start anchored); open-ended unless ``num_sections``."""
    return Schedule("f1", Order.FORWARD, F1_PATTERN, window, num_sections)


def vanilla_schedule(window: int = DEFAULT_WINDOW, num_sections: Optional[int] = None) -> Schedule:
    """Vanilla causal baseline: forward, no start-frame slot (the start frame is ordinary history)."""
    return Schedule("vanilla", Order.FORWARD, VANILLA_PATTERN, window, num_sections)


def inverted_schedule(
    num_sections: int,
    window: int = DEFAULT_WINDOW,
    has_end_frame: bool = False,
    pattern: CompressionPattern = F1_PATTERN,
) -> Schedule:
    """Inverted anti-drifting over ``num_sections`` sections (see :func:`num_sections` for seconds)."""
    return Schedule("inverted", Order.INVERTED, pattern, window, num_sections, has_end_frame)


def custom_schedule(
    pattern: CompressionPattern,
    window: int = DEFAULT_WINDOW,
    order: Order | str = Order.FORWARD,
    num_sections: Optional[int] = None,
    has_end_frame: bool = False,
) -> Schedule:
    """Any compression pattern in either order."""
    return Schedule("custom", Order(order), pattern, window, num_sections, has_end_frame)
