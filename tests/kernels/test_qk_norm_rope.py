"""Fused q/k RMSNorm + RoPE (interpreted) against the model's RMSNorm then apply_rope."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from framepack_rt.model.layers import RMSNorm
from framepack_rt.model.rope import apply_rope, rope_table

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AXES = {16: (4, 6, 6), 64: (16, 24, 24), 128: (16, 56, 56)}


def tables(frame_lists, grid=(3, 5), head_dim=16):
    """(len(frame_lists), T*3*5, head_dim) cos/sin from real frame indices (one table per sample)."""
    pairs = [rope_table(torch.tensor(f, dtype=torch.float32), *grid, AXES[head_dim], 256.0) for f in frame_lists]
    cos, sin = zip(*pairs)
    return torch.stack(cos), torch.stack(sin)


def inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, seq_len, heads * head_dim, generator=g) * 3 + 0.5).to(dtype).unflatten(-1, (heads, -1))
    weight = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype)
    return x, weight


# 4 frames of 3 x 5 tokens: 60 tokens; 2 samples x 60 x 3 heads = 360 rows, past one 256-row block.
CASES = {
    "video-shared-table": dict(batch=2, heads=3, frames=[[20, 21, 22, 23]]),
    "video-per-sample-tables": dict(batch=2, heads=3, frames=[[20, 21, 22, 23], [0, 5, 9, 30]]),
    "context-norm-only": dict(batch=1, heads=3, frames=None),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_rmsnorm_then_rope(check, case, dtype):
    x, weight = inputs(case["batch"], 60, case["heads"], 16, dtype)
    cos, sin = tables(case["frames"]) if case["frames"] else (None, None)
    if case["frames"] is None:
        x = x[0]  # context q/k: (tokens, heads, head_dim)
    out = qk_norm_rope(x, weight, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    ref32 = qk_norm_rope_reference(x.float(), weight.float(), cos, sin)
    check(out, ref32, None if dtype == torch.float32 else qk_norm_rope_reference(x, weight, cos, sin))


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"head_dim{d}")
def test_wide_heads_and_partial_row_block(check, head_dim):
    x, weight = inputs(1, 15, 3, head_dim, torch.bfloat16)  # 45 rows: not a multiple of the row block
    cos, sin = tables([[7]], head_dim=head_dim)
    out = qk_norm_rope(x, weight, cos, sin)
    ref32 = qk_norm_rope_reference(x.float(), weight.float(), cos, sin)
    check(out, ref32, qk_norm_rope_reference(x, weight, cos, sin))


def test_strided_heads(check):
    """q as the first heads of a wider (fused qkv-style) projection: head and token strides are not dense."""
    wide, weight = inputs(2, 15, 6, 16, torch.float32)
    x = wide[:, :, :3]
    assert not x.is_contiguous()
    cos, sin = tables([[1]])
    check(qk_norm_rope(x, weight, cos, sin), qk_norm_rope_reference(x, weight, cos, sin))


def test_reference_is_the_model_path():
    """The reference must be exactly what the blocks compute: the RMSNorm module, then apply_rope."""
    x, weight = inputs(2, 15, 3, 16, torch.bfloat16)
    norm = RMSNorm(16).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(weight)
    cos, sin = tables([[3]])
    assert torch.equal(qk_norm_rope_reference(x, weight, cos, sin), apply_rope(norm(x), cos, sin))
    assert torch.equal(qk_norm_rope_reference(x, weight), norm(x))


def test_rejects_mismatched_tables():
    x, weight = inputs(1, 15, 2, 16, torch.float32)
    cos, sin = tables([[1]])
    with pytest.raises(ValueError, match="do not fit"):
        qk_norm_rope(x[:, :10], weight, cos, sin)
