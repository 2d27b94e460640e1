"""Packed (varlen) layout of a batch: video tokens dense, context tokens packed, joined only for attention.

Every sample has the same number of video tokens (its latents share one shape) but its own number of
context tokens (image tokens + the prompt's real text tokens). The model keeps

  * video  as (B, Lv, C): no padding exists;
  * context as (Tc, C):   all samples' real context tokens back to back, padding dropped;

and joins them per sample, [video_0; ctx_0; video_1; ctx_1; ...], only for the attention call, which then runs
over ``cu_seqlens`` with no work spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cu_seqlens_of(lengths: list[int], device: torch.device) -> torch.Tensor:
    """int32 (len(lengths) + 1,) cumulative lengths, the flash-attn convention."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


@dataclass
class Segments:
    """A packed sequence of ``len(lengths)`` segments."""

    lengths: list[int]
    cu_seqlens: torch.Tensor  # int32 (n + 1,), on the model's device

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> "Segments":
        return cls(list(lengths), cu_seqlens_of(lengths, device))

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)


class JointPacking:
    """Joins (B, Lv, ...) video and (Tc, ...) context tensors into one packed sequence, and splits back.

    Built on the host from Python lengths (once per section: the transformer's prepare), so joining and
    splitting are index_selects with no host sync."""

    def __init__(self, batch: int, video_len: int, context_lengths: list[int], device: torch.device) -> None:
        if len(context_lengths) != batch:
            raise ValueError(f"{len(context_lengths)} context lengths for a batch of {batch}")
        self.batch = batch
        self.video_len = video_len
        self.context = Segments.of(context_lengths, device)
        self.joint = Segments.of([video_len + n for n in context_lengths], device)
        # Sample id of each context token: per-sample modulation vectors are gathered with it.
        self.context_sample = torch.repeat_interleave(torch.arange(batch), torch.tensor(context_lengths)).to(device)
        self._order = self._inverse = None
        if batch > 1:
            # order[j] = row of cat([video.flatten(0, 1), context]) that lands at joint position j.
            pieces, ctx_start = [], batch * video_len
            for i, n in enumerate(context_lengths):
                pieces.append(torch.arange(i * video_len, (i + 1) * video_len))
                pieces.append(torch.arange(ctx_start, ctx_start + n))
                ctx_start += n
            order = torch.cat(pieces).to(device)
            self._order = order
            self._inverse = torch.argsort(order)

    def per_context_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(B, C) -> a tensor that broadcasts against (Tc, C): one row per context token."""
        if self.batch == 1:
            return per_sample
        return per_sample.index_select(0, self.context_sample)

    def join(self, video: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """video (B, Lv, *rest), context (Tc, *rest) -> joint (B*Lv + Tc, *rest)."""
        stacked = torch.cat([video.flatten(0, 1), context], dim=0)
        return stacked if self._order is None else stacked.index_select(0, self._order)

    def split(self, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`join`."""
        stacked = joint if self._inverse is None else joint.index_select(0, self._inverse)
        n_video = self.batch * self.video_len
        return stacked[:n_video].unflatten(0, (self.batch, self.video_len)), stacked[n_video:]
