"""Constant-length context: a preallocated ring buffer of the newest K latents plus the start latent.

The released demos keep the whole history and grow it with ``torch.cat`` every section (then slice the K
latents they need). :class:`ContextRing` keeps only what the model can see -- the start latent and the K
history latents of the compression pattern -- in buffers allocated once, and packs the model inputs of each
section into buffers that are also allocated once. Memory and tensor addresses therefore do not depend on how
many sections came before (and stay valid for CUDA graphs).

History convention (both orders): the K-latent window is kept in clip time order, oldest first.

* forward (F1, vanilla): ``push`` appends; the window is the LAST K latents of the clip so far. ``reset``
  fills it with zeros and puts the start latent at the newest position (the demo's
  ``cat(zeros(19), start)``).
* inverted: ``push`` prepends; the window is the FIRST K latents of the part generated so far. ``reset``
  fills it with zeros, and puts the end latent (if any) at position 0.

Which window positions feed which scale is :attr:`SectionLayout.history_slices`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from framepack_rt.engine.schedules import (
    CLEAN_1X,
    F1_PATTERN,
    HISTORY_2X,
    HISTORY_4X,
    CompressionPattern,
    Order,
    Schedule,
    SectionLayout,
    _check_window,
)

__all__ = ["ContextInputs", "ContextRing", "LATENT_CHANNELS"]

LATENT_CHANNELS = 16
"""HunyuanVideo VAE latent channels."""


@dataclass
class ContextInputs:
    """The packed context inputs of one section, named exactly as the transformer's forward() keywords.

    Shapes (B batch, C = 16 channels, H x W latent size, w window):

    * ``latents_clean``: (B, C, n_clean, H, W), n_clean = start slot + num_1x; ``indices_latents_clean``:
      (n_clean,)
    * ``latents_history_2x``: (B, C, num_2x, H, W); ``indices_latents_history_2x``: (num_2x,)
    * ``latents_history_4x``: (B, C, num_4x, H, W); ``indices_latents_history_4x``: (num_4x,)
    * ``indices_latents``: (w,) frame indices of the noisy window

    Index tensors are int64, 1-D. An input whose segment has 0 frames (custom patterns) is None, with its
    indices. When handed out by :meth:`ContextRing.inputs` the tensors are the ring's own buffers: read-only,
    and overwritten by the next ``inputs`` call on that ring (use :meth:`clone` to keep them).
    """

    latents_clean: Optional[torch.Tensor]
    indices_latents_clean: Optional[torch.Tensor]
    latents_history_2x: Optional[torch.Tensor]
    indices_latents_history_2x: Optional[torch.Tensor]
    latents_history_4x: Optional[torch.Tensor]
    indices_latents_history_4x: Optional[torch.Tensor]
    indices_latents: torch.Tensor

    def as_kwargs(self) -> dict[str, Optional[torch.Tensor]]:
        """``model(hidden_states, ..., **inputs.as_kwargs())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clone(self) -> "ContextInputs":
        """A copy that owns its tensors (for callers that must keep a section's inputs)."""
        return ContextInputs(**{k: (None if v is None else v.clone()) for k, v in self.as_kwargs().items()})


class ContextRing:
    """Start latent + the newest K history latents in a fixed ring, packed per section without allocation.

    Storage (allocated once in ``__init__``, written in place only):

    * ``history``: (B, C, K, H, W) ring; logical window position ``i`` (clip order, oldest first) lives in
      physical slot ``(head + i) % K``. A push of m latents writes m slots and moves ``head`` -- nothing is
      shifted and nothing is concatenated.
    * ``start``: (B, C, 1, H, W).
    * output buffers ``latents_clean`` (B, C, n_clean, H, W), ``latents_history_2x`` (B, C, num_2x, H, W),
      ``latents_history_4x`` (B, C, num_4x, H, W) and the four int64 index buffers, refilled by every
      :meth:`inputs` call with ``copy_`` / ``arange(out=)``.

    :meth:`inputs` hands out those output buffers themselves, not clones: a clone per section would allocate
    ~K latents of fresh memory every section, and the stable addresses are what make the context usable from a
    captured CUDA graph. So callers must treat them as read-only and must not keep them across sections (the
    next ``inputs`` overwrites them); use :meth:`ContextInputs.clone` to keep a copy. Not thread-safe.

    ``dtype`` is the storage dtype. Storing in the model's dtype (e.g. bf16) gives the same model inputs as
    the demo's fp32 history cast at use time (the same single rounding), at half the memory.
    """

    def __init__(
        self,
        pattern: CompressionPattern = F1_PATTERN,
        order: Order | str = Order.FORWARD,
        *,
        window: int,
        height: int,
        width: int,
        batch_size: int = 1,
        channels: int = LATENT_CHANNELS,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> None:
        """Allocate every buffer.

        Args:
            pattern: compression pattern (fixes K and the output shapes).
            order: ``"forward"`` (append) or ``"inverted"`` (prepend).
            window: latent frames per section (w), the length of ``indices_latents``.
            height, width: latent height and width (pixels / 8).
            batch_size, channels: B and C of every latent.
            dtype, device: of the latent buffers (index buffers are int64 on ``device``).
        """
        _check_window(window)
        self.pattern = pattern
        self.order = Order(order)
        self.window = window
        # Validates pattern x order (e.g. the inverted order needs the start slot).
        self._reference_layout = SectionLayout(self.order, pattern, window)
        self.shape = (batch_size, channels, height, width)
        K = pattern.num_history
        self.num_history = K
        kw = dict(dtype=dtype, device=device)
        self.history = torch.zeros(batch_size, channels, K, height, width, **kw)
        self.start = torch.zeros(batch_size, channels, 1, height, width, **kw)
        self.head = 0
        self.sections_seen = 0
        """Number of :meth:`push` calls since the last :meth:`reset`."""
        self.latents_seen = 0
        """Latents pushed since the last :meth:`reset`."""
        self._ready = False

        def out(n: int) -> Optional[torch.Tensor]:
            return torch.zeros(batch_size, channels, n, height, width, **kw) if n else None

        def idx(n: int) -> Optional[torch.Tensor]:
            return torch.zeros(n, dtype=torch.int64, device=device) if n else None

        self._latents_clean = out(pattern.num_clean)
        self._latents_2x = out(pattern.num_2x)
        self._latents_4x = out(pattern.num_4x)
        self._indices_clean = idx(pattern.num_clean)
        self._indices_2x = idx(pattern.num_2x)
        self._indices_4x = idx(pattern.num_4x)
        self._indices_noisy = torch.zeros(window, dtype=torch.int64, device=device)

        # Copy plan, fixed for the ring's life: (destination view, window start, length). The destination
        # views are made once here, so a section only slices the ring.
        s = int(pattern.start_full_resolution)
        slices = self._reference_layout.history_slices
        plan = []
        for dst, key, offset in (
            (self._latents_clean, CLEAN_1X, s),
            (self._latents_2x, HISTORY_2X, 0),
            (self._latents_4x, HISTORY_4X, 0),
        ):
            sl = slices[key]
            n = sl.stop - sl.start
            if n:
                assert dst is not None
                plan.append((dst[:, :, offset : offset + n], sl.start, n))
        self._plan = tuple(plan)
        self._clean_start_view = self._latents_clean[:, :, 0:1] if s else None

    # ---------------------------------------------------------------------------------------- creation
    @classmethod
    def for_schedule(
        cls,
        schedule: Schedule,
        *,
        height: int,
        width: int,
        batch_size: int = 1,
        channels: int = LATENT_CHANNELS,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> "ContextRing":
        """A ring matching ``schedule``'s pattern, order and window."""
        return cls(
            schedule.pattern,
            schedule.order,
            window=schedule.window,
            height=height,
            width=width,
            batch_size=batch_size,
            channels=channels,
            dtype=dtype,
            device=device,
        )

    # ------------------------------------------------------------------------------------------ state
    def _as_frames(self, latent: torch.Tensor, what: str) -> torch.Tensor:
        """(B, C, H, W) or (B, C, m, H, W) -> (B, C, m, H, W), checking B, C, H, W."""
        if latent.dim() == 4:
            latent = latent.unsqueeze(2)
        B, C, H, W = self.shape
        if latent.dim() != 5 or (latent.shape[0], latent.shape[1], latent.shape[3], latent.shape[4]) != (B, C, H, W):
            raise ValueError(f"{what}: expected (B={B}, C={C}, m, H={H}, W={W}), got {tuple(latent.shape)}")
        return latent

    def reset(self, start_latent: torch.Tensor, end_latent: Optional[torch.Tensor] = None) -> None:
        """Start a new clip.

        Args:
            start_latent: (B, C, 1, H, W) or (B, C, H, W), the encoded start image.
            end_latent: inverted order only: (B, C, 1, H, W) or (B, C, H, W), put at window position 0 so the
                first section (the clip's end) is conditioned on it.
        """
        start_latent = self._as_frames(start_latent, "start_latent")
        if start_latent.shape[2] != 1:
            raise ValueError("start_latent must hold exactly one latent frame")
        if end_latent is not None:
            if self.order is not Order.INVERTED:
                raise ValueError("an end latent only exists for the inverted order")
            end_latent = self._as_frames(end_latent, "end_latent")
            if end_latent.shape[2] != 1:
                raise ValueError("end_latent must hold exactly one latent frame")
        self.history.zero_()
        self.start.copy_(start_latent)
        self.head = 0
        K = self.num_history
        if K:
            if self.order is Order.FORWARD:
                self.history[:, :, K - 1 : K].copy_(start_latent)  # cat(zeros(K), start)[-K:]
            elif end_latent is not None:
                self.history[:, :, 0:1].copy_(end_latent)
        self.sections_seen = 0
        self.latents_seen = 0
        self._ready = True

    def push(self, new_latents: torch.Tensor) -> None:
        """Add a generated section's latents, (B, C, m, H, W) in clip time order (any m >= 1).

        Forward: appended (the oldest m window latents drop out). Inverted: prepended (the m window latents
        latest in clip time drop out). With m >= K only the K that stay in the window are copied. On the
        inverted last section, push ``cat(start, new)`` or just ``new``: no section follows either way.
        """
        if not self._ready:
            raise RuntimeError("call reset() before push()")
        new_latents = self._as_frames(new_latents, "new_latents")
        m = new_latents.shape[2]
        if m < 1:
            raise ValueError("push needs at least one latent frame")
        self.sections_seen += 1
        self.latents_seen += m
        K = self.num_history
        if K == 0:
            return
        if m >= K:
            kept = new_latents[:, :, m - K :] if self.order is Order.FORWARD else new_latents[:, :, :K]
            self.head = 0
            self.history.copy_(kept)
            return
        if self.order is Order.FORWARD:
            first = self.head  # the m oldest slots are overwritten; the new latents become the newest
            self.head = (self.head + m) % K
        else:
            self.head = (self.head - m) % K  # the new latents become logical 0..m-1
            first = self.head
        self._ring_copy(new_latents, first, m, to_ring=True)

    def _ring_copy(self, other: torch.Tensor, first: int, n: int, to_ring: bool) -> None:
        """Copy between ``other[:, :, 0:n]`` and ring slots ``first, first+1, ... (mod K)`` (<= 2 runs)."""
        K = self.num_history
        run = min(n, K - first)
        pieces = [(first, 0, run)]
        if n > run:
            pieces.append((0, run, n - run))
        for slot, off, length in pieces:
            ring = self.history[:, :, slot : slot + length]
            part = other[:, :, off : off + length]
            if to_ring:
                ring.copy_(part)
            else:
                part.copy_(ring)

    # ------------------------------------------------------------------------------------------ output
    def inputs(self, layout: SectionLayout) -> ContextInputs:
        """Pack the model inputs of the next section into the ring's output buffers (see the class doc).

        Args:
            layout: the section's layout; its order, pattern and window must be the ring's.
        Returns:
            :class:`ContextInputs` whose tensors are the ring's preallocated buffers (not clones).
        """
        if not self._ready:
            raise RuntimeError("call reset() before inputs()")
        if layout.order is not self.order or layout.pattern != self.pattern or layout.window != self.window:
            raise ValueError(
                f"layout ({layout.order.value}, {layout.pattern}, w={layout.window}) does not match the ring "
                f"({self.order.value}, {self.pattern}, w={self.window})"
            )
        K = self.num_history
        if self._clean_start_view is not None:
            self._clean_start_view.copy_(self.start)
        for dst, start, n in self._plan:
            self._ring_copy(dst, (self.head + start) % K, n, to_ring=False)
        ranges = layout.index_ranges
        for buf, key in (
            (self._indices_noisy, "indices_latents"),
            (self._indices_clean, "indices_latents_clean"),
            (self._indices_2x, "indices_latents_history_2x"),
            (self._indices_4x, "indices_latents_history_4x"),
        ):
            if buf is None:
                continue
            offset = 0
            for r in ranges[key]:
                if len(r):
                    torch.arange(r.start, r.stop, out=buf[offset : offset + len(r)])
                    offset += len(r)
        return ContextInputs(
            latents_clean=self._latents_clean,
            indices_latents_clean=self._indices_clean,
            latents_history_2x=self._latents_2x,
            indices_latents_history_2x=self._indices_2x,
            latents_history_4x=self._latents_4x,
            indices_latents_history_4x=self._indices_4x,
            indices_latents=self._indices_noisy,
        )

    def window_latents(self) -> torch.Tensor:
        """A fresh (B, C, K, H, W) copy of the history window in clip order, oldest first (for inspection)."""
        out = torch.empty_like(self.history)
        if self.num_history:
            self._ring_copy(out, self.head, self.num_history, to_ring=False)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by all the ring's buffers (constant for the ring's life)."""
        tensors = [self.history, self.start, self._indices_noisy]
        tensors += [
            t
            for t in (
                self._latents_clean,
                self._latents_2x,
                self._latents_4x,
                self._indices_clean,
                self._indices_2x,
                self._indices_4x,
            )
            if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in tensors)
