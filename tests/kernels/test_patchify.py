"""Fused multi-scale patchify (interpreted) against the model's per-scale patchify + torch.cat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framepack_rt.kernels.patchify import fused_patchify, fused_patchify_reference, token_count
from framepack_rt.model.rope import replicate_pad_to_multiple

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (kernel, frames) per scale, in packed order [4x | 2x | 1x | noisy].
LAYOUTS = {
    "noisy-only": [((1, 2, 2), 3)],
    "2x-and-noisy": [((2, 4, 4), 3), ((1, 2, 2), 2)],
    "f1-all-scales": [((4, 8, 8), 5), ((2, 4, 4), 3), ((1, 2, 2), 1), ((1, 2, 2), 3)],
}
# (H, W): 6 x 10 is no multiple of 4 or 8, so the 2x / 4x patches replicate the edge; 8 x 16 needs no padding.
SIZES = {"hw6x10-padded": (6, 10), "hw8x16": (8, 16)}


def make_scales(layout, height, width, dtype, c_in=3, c_out=40, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = []
    for kernel, frames in layout:
        latents = torch.randn(batch, c_in, frames, height, width, generator=g)
        weight = (torch.randn(c_out, c_in, *kernel, generator=g) / (c_in * kernel[0] * kernel[1] * kernel[2]) ** 0.5)
        bias = torch.randn(c_out, generator=g)
        scales.append((latents, weight.to(dtype), bias.to(dtype)))
    return scales


def fp32(scales):
    return [(x.float(), w.float(), None if b is None else b.float()) for x, w, b in scales]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_matches_per_scale_patchify_and_cat(check, layout, size, dtype):
    scales = make_scales(layout, *size, dtype)
    out = fused_patchify(scales)
    assert out.dtype == dtype
    assert out.shape == (2, sum(token_count(x.shape, w.shape[2:]) for x, w, _ in scales), 40)
    ref32 = fused_patchify_reference(fp32(scales))
    check(out, ref32, None if dtype == torch.float32 else fused_patchify_reference(scales))


def test_equals_replicate_padded_conv3d(check):
    """Independent of the model's patchify: each scale's slice of the buffer is the strided Conv3d."""
    scales = make_scales(LAYOUTS["f1-all-scales"], 6, 10, torch.float32, c_in=16, c_out=24)
    out = fused_patchify(scales)
    start = 0
    for latents, weight, bias in scales:
        kernel = tuple(weight.shape[2:])
        conv = F.conv3d(replicate_pad_to_multiple(latents, kernel), weight, bias, stride=kernel)
        tokens = conv.flatten(2).transpose(1, 2)  # (B, t*y*x, C) in raster order
        check(out[:, start : start + tokens.shape[1]], tokens)
        start += tokens.shape[1]
    assert start == out.shape[1]


def test_strided_latents_and_no_bias(check):
    """Context latents are often views (a window of a ring buffer): any strides, and a bias-free conv."""
    g = torch.Generator().manual_seed(3)
    ring = torch.randn(1, 4, 9, 8, 12, generator=g)
    latents = ring[:, :, 2:7]  # 5 frames, non-contiguous
    weight = torch.randn(20, 4, 2, 4, 4, generator=g) * 0.1
    scales = [(latents, weight, None), (ring[:, :, :1], torch.randn(20, 4, 1, 2, 2, generator=g), None)]
    check(fused_patchify(scales), fused_patchify_reference(scales))


def test_rejects_mismatched_scales():
    x = torch.zeros(1, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="C_out"):
        fused_patchify([(x, torch.zeros(8, 3, 1, 2, 2), None), (x, torch.zeros(9, 3, 1, 2, 2), None)])
    with pytest.raises(ValueError, match="do not fit"):
        fused_patchify([(x, torch.zeros(8, 4, 1, 2, 2), None)])
