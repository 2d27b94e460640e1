"""3D rotary position tables from explicit frame indices.

Positions come from the section schedule (``indices_*`` inputs), not from token order: that is how FramePack
places a clean latent 20 frames back, or the end frame of an inverted clip, in time. Tables are fp32, laid out
as [cos_t, cos_y, cos_x] / [sin_t, sin_y, sin_x], each axis repeat-interleaved for rotation of interleaved pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def axis_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(dim/2,) inverse frequencies 1 / theta^(2i/dim), fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _axis_table(positions: torch.Tensor, dim: int, theta: float, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (n, dim) for one axis; with ``pool`` > 1, edge-replicated to a multiple of pool and averaged."""
    angles = torch.outer(positions.to(torch.float32), axis_frequencies(dim, theta, positions.device))
    cos, sin = angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)
    if pool == 1:
        return cos, sin
    pad = (-positions.numel()) % pool
    out = []
    for table in (cos, sin):
        if pad:
            table = torch.cat([table, table[-1:].expand(pad, -1)])
        out.append(table.unflatten(0, (-1, pool)).mean(dim=1))
    return out[0], out[1]


def rope_table(
    frame_indices: torch.Tensor,
    grid_height: int,
    grid_width: int,
    axes_dim: tuple[int, int, int],
    theta: float,
    pool: tuple[int, int, int] = (1, 1, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every token of a (T, grid_height, grid_width) token grid: (tokens, head_dim) fp32 each.

    ``frame_indices`` (T,) gives the time position of each latent frame; y/x positions are 0..grid-1.
    ``pool`` (in token units: (2, 2, 2) for 2x latents, (4, 4, 4) for 4x) gives the table of a compressed
    latent: the full-resolution table replicate-padded and average-pooled over each (pt, ph, pw) cell, in the
    token order of the matching Conv3d patch embedding. Each axis's angle depends on its own coordinate only,
    so the cell average is the average along that axis alone: the table is separable and costs O(T + H + W).
    """
    device = frame_indices.device
    positions = (
        frame_indices,
        torch.arange(grid_height, dtype=torch.float32, device=device),
        torch.arange(grid_width, dtype=torch.float32, device=device),
    )
    axes = [_axis_table(pos, dim, theta, k) for pos, dim, k in zip(positions, axes_dim, pool)]
    t, h, w = (a[0].shape[0] for a in axes)
    out = []
    for part in (0, 1):  # cos, then sin
        tt, yy, xx = (a[part] for a in axes)
        grid = torch.cat(
            [
                tt[:, None, None, :].expand(t, h, w, -1),
                yy[None, :, None, :].expand(t, h, w, -1),
                xx[None, None, :, :].expand(t, h, w, -1),
            ],
            dim=-1,
        )
        out.append(grid.reshape(t * h * w, -1))
    return out[0], out[1]


def replicate_pad_to_multiple(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Pad (B, C, T, H, W) at the far end of T/H/W by repeating the edge, up to multiples of ``kernel``."""
    pads = [(-size) % k for size, k in zip(x.shape[-3:], kernel)]
    if not any(pads):
        return x
    pad_t, pad_h, pad_w = pads
    return F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (..., tokens, heads, head_dim) in fp32; cos/sin (..., tokens, head_dim)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
