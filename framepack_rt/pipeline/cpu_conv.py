"""A faster CPU path for the VAE's stride-1 Conv3d layers.

Measured reason: torch 2.13's CPU Conv3d runs ``slow_conv3d`` (about 2 GFLOP/s on 2 cores for the tiny VAE's
8-16 channel layers), while Conv2d has a fast oneDNN path. A (kt, kh, kw) convolution with stride 1 is kt
conv2d calls over all frames at once, one per temporal tap, summed with a shift; measured 2-3.5x faster on
the tiny VAE's layers and equal to fp32 rounding. Only the VAE's modules are switched, only on the CPU.

``channels_last``: the frames go to conv2d in NHWC memory order (oneDNN's native layout; NCHW inputs are
reordered inside every call), and the output keeps that order, so the next layer's input is NHWC already and
the whole decoder runs without reorders. Set per module by :func:`use_tap_convs`; see there for the measure.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3d_as_conv2d_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          padding: tuple[int, int, int], channels_last: bool = False) -> torch.Tensor:
    """Stride-1, dilation-1, ungrouped conv3d. x (B, C, T, H, W), weight (O, C, kt, kh, kw). With
    ``channels_last`` the result is the same numbers in (B, T, H, W, C) memory order."""
    pt, ph, pw = padding
    if pt:
        x = F.pad(x, (0, 0, 0, 0, pt, pt))
    b, c, t, h, w = x.shape
    out_ch, _, kt, _, _ = weight.shape
    t_out = t - kt + 1
    if channels_last:  # (B, T, H, W, C) in memory: a no-op when x is in that order already (the previous
        # tap conv's output, and what GroupNorm, SiLU and padding keep); contiguous() is the fast reorder
        x = x.contiguous(memory_format=torch.channels_last_3d)
        frames = x.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        weight = weight.permute(2, 0, 3, 4, 1).contiguous().permute(0, 1, 4, 2, 3)  # (kt, O, C, kh, kw), NHWC taps
        taps = [weight[k] for k in range(kt)]
    else:
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        taps = [weight[:, :, k] for k in range(kt)]
    out = None
    for k in range(kt):
        y = F.conv2d(frames, taps[k], None, padding=(ph, pw))
        y = y.unflatten(0, (b, t))[:, k : k + t_out]
        out = y if out is None else out + y
    if bias is not None:
        out = out + bias.view(1, 1, out_ch, 1, 1)
    return out.transpose(1, 2)


class TapConv3d(nn.Conv3d):
    """nn.Conv3d with the same parameters, computed by :func:`conv3d_as_conv2d_taps` on the CPU."""

    channels_last = False  # set per instance by use_tap_convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return conv3d_as_conv2d_taps(x, self.weight, self.bias, self.padding, self.channels_last)


def use_tap_convs(module: nn.Module, channels_last: bool = False) -> int:
    """Switch every eligible Conv3d under ``module`` to :class:`TapConv3d` in place; returns how many.

    ``channels_last``: the convolutions run in NHWC memory order, measured 0.77-0.79x the decode time on the demo
    VAE (README, Benchmarks) and equal to fp32 rounding, but oneDNN's NHWC results then depend on the thread
    count (a pixel off by one, which the MP4 encoder turns into larger differences): off by default, so that a
    seed gives the same video whatever the threads (tests/commands/test_seeds.py)."""
    switched = 0
    for m in module.modules():
        eligible = (
            type(m) is nn.Conv3d and m.stride == (1, 1, 1) and m.dilation == (1, 1, 1) and m.groups == 1
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
        )
        if eligible:
            m.__class__ = TapConv3d  # same parameters and state dict; only forward changes
        if isinstance(m, TapConv3d):
            m.channels_last = channels_last
            switched += 1
    return switched
