"""RoPE tables and patch embedding against their literal definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framepack_rt.model.transformer import patchify
from framepack_rt.model.rope import replicate_pad_to_multiple, rope_table

AXES, THETA = (16, 56, 56), 256.0


def literal_pooled_table(indices, gh, gw, pool):
    """The published rule: full-resolution table, replicate-padded, then avg_pool3d with kernel = stride."""
    cos, sin = rope_table(indices, gh, gw, AXES, THETA)
    out = []
    for table in (cos, sin):
        grid = table.T.reshape(1, -1, indices.numel(), gh, gw)
        grid = F.avg_pool3d(replicate_pad_to_multiple(grid, pool), pool, stride=pool)
        out.append(grid.flatten(2)[0].T)
    return out


def direct_table(indices, gh, gw):
    """cos/sin of position * 1/theta^(2i/d), axis by axis, repeat-interleaved, [t | y | x]."""
    t, y, x = torch.meshgrid(indices.float(), torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    parts = []
    for pos, d in zip((t, y, x), AXES):
        freqs = 1.0 / THETA ** (torch.arange(0, d, 2).float() / d)
        parts.append(pos.reshape(-1, 1) * freqs)
    angles = torch.cat([p.repeat_interleave(2, dim=1) for p in parts], dim=1)
    return angles.cos(), angles.sin()


def test_full_resolution_table_is_the_direct_formula():
    indices = torch.tensor([0, 19, 20, 27])
    cos, sin = rope_table(indices, 3, 5, AXES, THETA)
    ref_cos, ref_sin = direct_table(indices, 3, 5)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)


@pytest.mark.parametrize("pool", [(2, 2, 2), (4, 4, 4)], ids=["2x", "4x"])
@pytest.mark.parametrize("grid", [(4, 6), (5, 7), (1, 3)], ids=["even", "odd-needs-padding", "thin"])
@pytest.mark.parametrize("frames", [2, 16, 3], ids=["t2", "t16", "t3-padded"])
def test_pooled_table_equals_pad_then_average(pool, grid, frames):
    indices = torch.arange(1, 1 + frames) * 3  # non-contiguous positions
    cos, sin = rope_table(indices, *grid, AXES, THETA, pool)
    ref_cos, ref_sin = literal_pooled_table(indices, *grid, pool)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", [(1, 2, 2), (2, 4, 4), (4, 8, 8)], ids=["1x", "2x", "4x"])
@pytest.mark.parametrize("shape", [(9, 8, 12), (3, 5, 7), (1, 2, 2)], ids=["even", "odd", "single"])
def test_patchify_equals_padded_conv3d(kernel, shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 24, kernel_size=kernel, stride=kernel)
    latents = torch.randn(2, 16, *shape)
    expected = conv(replicate_pad_to_multiple(latents, kernel)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify(conv, latents), expected, atol=1e-5, rtol=1e-5)
