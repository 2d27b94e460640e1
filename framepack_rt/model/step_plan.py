"""StepPlan: what a section's transformer calls share, built once per section on the host.

Within one section every sampling step calls the transformer with the same prompt, the same clean context
latents and the same frame indices; only the noisy latents, the timestep and (for CFG) the branch change. So
the packed layout (cu_seqlens, segment lengths, index maps), the RoPE tables, the patch embeddings of the
clean latents, the image projection, the text tokens' input projection, the fp32 output head's weights, and
the choice of kernels and attention backend are all made here, once. A step then makes no data-dependent host
sync and no per-call dispatch (``FramePackTransformer.step``), which is also what lets it trace as one graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from framepack_rt.kernels.dispatch import KernelPlan
from framepack_rt.model.packing import JointPacking, Segments

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1 or B, Lv, head_dim) fp32
AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, cu_seqlens, max_seqlen, seqlens, scale) -> out


@dataclass(frozen=True)
class TextPlan:
    """The prompt's real tokens, packed (padding dropped), with what the token refiner needs per step."""

    tokens: torch.Tensor  # (Tt, C): proj_in of the real text tokens, back to back
    pooled: torch.Tensor  # (B, text_dim): masked mean of the text features, the refiner's conditioning input
    token_sample: torch.Tensor  # (Tt,) int64: the sample each token belongs to
    segments: Segments  # per-sample real-token counts (host) and cu_seqlens (device)


@dataclass(frozen=True)
class StepPlan:
    """One section's constant inputs and decisions for ``FramePackTransformer.step``."""

    batch: int
    frames: int  # noisy latent frames, height and width (the step's hidden_states must have this shape)
    height: int
    width: int
    noisy_len: int  # noisy video tokens (the last ones of the video stream)
    clean_tokens: torch.Tensor | None  # (B, Lc, C) patch embeddings of the [4x | 2x | clean 1x] latents
    rope: RopeTables  # over the whole video stream [clean | noisy]
    pooled: torch.Tensor  # (B, 768) CLIP pooled, in the model dtype
    text: TextPlan
    image_tokens: torch.Tensor | None  # (B, Li, C) projected SigLIP features
    context_order: torch.Tensor | None  # cat([image.flatten(0, 1), text]) -> [img_0; txt_0; img_1; txt_1; ...]
    packing: JointPacking  # video + context per sample, for the joint attention
    ops: KernelPlan  # fused or torch, per op
    attention: AttentionFn  # the joint attention's backend
    text_attention: AttentionFn  # the token refiner's backend (shorter sequences: its own length class)
    head_fp32: tuple[torch.Tensor, ...] | None  # norm_out / proj_out weights and biases in fp32, cast once

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.frames, self.height, self.width)
