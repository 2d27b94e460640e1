"""Varlen flash attention (interpreted) against dense attention, segment by segment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framepack_rt.kernels import packed_attention as pa
from framepack_rt.kernels._common import SM90_MAX_SHARED_BYTES
from framepack_rt.model.packing import cu_seqlens_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Interpreter blocks are 64 x 64: 37 and 130 leave partial query and key blocks, 64 is exact, 1 is one token.
LENGTHS = {
    "one-token": [1],
    "len37": [37],
    "ragged-1-37-64-130": [1, 37, 64, 130],
    "equal-70-70": [70, 70],
}


def qkv(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [(torch.randn(total, heads, head_dim, generator=g) * 2).to(dtype) for _ in range(3)]


def dense(q, k, v, dtype, scale=None) -> torch.Tensor:
    """One segment, (L, H, D): torch SDPA computed in ``dtype``."""
    q, k, v = (t.transpose(0, 1).to(dtype) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1)


def check_segments(check, out, q, k, v, lengths, scale=None):
    start = 0
    for n in lengths:
        seg = slice(start, start + n)
        ref32 = dense(q[seg], k[seg], v[seg], torch.float32, scale)
        lowp = None if q.dtype == torch.float32 else dense(q[seg], k[seg], v[seg], q.dtype, scale)
        check(out[seg], ref32, lowp)
        start += n


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_matches_dense_attention_per_segment(check, lengths, dtype):
    q, k, v = qkv(lengths, heads=2, head_dim=16, dtype=dtype)
    out = pa.packed_attention(q, k, v, cu_seqlens_of(lengths, q.device), max(lengths))
    assert out.dtype == dtype and out.shape == q.shape
    check_segments(check, out, q, k, v, lengths)


@pytest.mark.parametrize("head_dim", [32, 64, 128], ids=lambda d: f"head_dim{d}")
def test_head_dims(check, head_dim):
    lengths = [5, 70]
    q, k, v = qkv(lengths, heads=1, head_dim=head_dim, dtype=torch.bfloat16, seed=1)
    out = pa.packed_attention(q, k, v, cu_seqlens_of(lengths, q.device), max(lengths))
    check_segments(check, out, q, k, v, lengths)


def test_custom_scale_and_strided_inputs(check):
    """q/k/v as views of one (T, 3, H, D) projection (token stride 3*H*D), and a non-default scale."""
    lengths = [20, 75]
    g = torch.Generator().manual_seed(2)
    packed = torch.randn(sum(lengths), 3, 2, 16, generator=g).to(torch.float16)
    q, k, v = packed.unbind(1)
    assert not q.is_contiguous()
    out = pa.packed_attention(q, k, v, cu_seqlens_of(lengths, q.device), max(lengths), scale=0.3)
    check_segments(check, out, q, k, v, lengths, scale=0.3)


def test_max_seqlen_larger_than_needed_only_costs_idle_blocks(check):
    lengths = [3, 10]
    q, k, v = qkv(lengths, heads=2, head_dim=16, dtype=torch.float32)
    out = pa.packed_attention(q, k, v, cu_seqlens_of(lengths, q.device), max_seqlen=100)
    check_segments(check, out, q, k, v, lengths)


def test_torch_reference_matches_sdpa(check):
    lengths = [1, 37, 9]
    q, k, v = qkv(lengths, heads=2, head_dim=16, dtype=torch.float32)
    ref = pa.packed_attention_reference(q, k, v, cu_seqlens_of(lengths, q.device))
    check_segments(check, ref, q, k, v, lengths)


def test_rejects_bad_inputs():
    q = torch.zeros(4, 1, 24)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        pa.packed_attention(q, q, q, cu, 4)
    q = torch.zeros(4, 1, 16)
    with pytest.raises(ValueError, match="int32"):
        pa.packed_attention(q, q, q, cu.long(), 4)


def test_pruning_fits_hopper_and_the_sequence():
    at_13b = pa.prune_configs(pa.CONFIGS, 128, 32768, 2, SM90_MAX_SHARED_BYTES)
    assert at_13b, "no config survives at the 13B shape"
    for c in at_13b:
        smem = pa.shared_bytes_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, 128, 2)
        assert smem <= SM90_MAX_SHARED_BYTES
    short = pa.prune_configs(pa.CONFIGS, 128, 32, 2, SM90_MAX_SHARED_BYTES)
    assert short and all(c.kwargs["BLOCK_M"] <= 32 for c in short)
    # fp32 (4-byte) tiles at head_dim 128 need more shared memory: the biggest pipelines drop out.
    wide = pa.prune_configs(pa.CONFIGS, 128, 32768, 4, SM90_MAX_SHARED_BYTES)
    assert len(wide) < len(at_13b)
    # Nothing fits: the smallest config is kept rather than none.
    assert len(pa.prune_configs(pa.CONFIGS, 128, 32768, 2, 1)) == 1


def test_flops_formula():
    assert pa.attention_flops([10, 20], heads=2, head_dim=8) == 4 * (100 + 400) * 2 * 8
