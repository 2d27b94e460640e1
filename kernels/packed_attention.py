"""Varlen (packed) non-causal flash-attention forward, flash-attn layout, and its torch reference.

q, k, v are (total_tokens, heads, head_dim); int32 ``cu_seqlens`` (batch + 1) marks where each segment starts.
One program computes one BLOCK_M block of queries of one (segment, head) against every key of that segment:
online softmax in fp32, ``exp2`` with log2(e) folded into the scale, two tensor-core dots per key block.
The grid is (query blocks of the longest segment, segments * heads); blocks past a shorter segment's end exit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_rt.kernels._common import INTERPRET, dot_in_fp32, finish, max_shared_bytes, output_buffer

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs,  # pointers to this key block's (BLOCK_N, HEAD_DIM) K and V tiles
    key_start, seqlen, qk_scale,
    offs_n,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    if MASKED:  # only the segment's last, partial key block pays for the bounds check
        valid = (key_start + offs_n) < seqlen
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    # Every key block holds at least one valid key, so m_new is finite and alpha well defined.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _packed_attention_fwd(
    Q, K, V, Out,  # pointers: (total_tokens, heads, HEAD_DIM), last dim contiguous
    cu_seqlens,  # pointer: int32 (batch + 1,)
    qk_scale,  # fp32: softmax scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads,
    seqlen_bucket,  # next_power_of_2(max_seqlen): autotune key and pruning only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,  # keep dot operands fp32 (bf16 under the interpreter)
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs; ignored for 16-bit ones
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    seg = pid_bh // num_heads
    head = pid_bh % num_heads
    start_i32 = tl.load(cu_seqlens + seg)
    seqlen = tl.load(cu_seqlens + seg + 1) - start_i32  # int32: the key loop's bounds stay 32-bit
    start = start_i32.to(tl.int64)  # token offsets are 64-bit: total_tokens * heads * head_dim may pass 2**31
    if pid_m * BLOCK_M >= seqlen:  # this segment is shorter than the longest one
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seqlen
    q_ptrs = Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_ptrs = K + (start + offs_n)[:, None] * stride_kt + head * stride_kh + offs_d[None, :]
    v_ptrs = V + (start + offs_n)[:, None] * stride_vt + head * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    for key_start in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, key_start, seqlen, qk_scale, offs_n,
            MASKED=False, DOT_FP32=DOT_FP32, PRECISION=PRECISION,
        )
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    if full_end < seqlen:
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, full_end, seqlen, qk_scale, offs_n,
            MASKED=True, DOT_FP32=DOT_FP32, PRECISION=PRECISION,
        )

    out = acc / l_i[:, None]
    o_ptrs = Out + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None])


# -- configurations ------------------------------------------------------------------------------------------
def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidates (head_dim 128): wide query blocks with 8 warps for long sequences, small ones for the text
# refiner's short segments. Shared memory (bf16, head_dim 128, shared_bytes_estimate) runs from 36 KiB to
# 224 KiB: Hopper (227 KiB a block) can take them all, A100 (163 KiB) most, Ada and consumer Ampere (99 KiB)
# the 96 KiB-and-smaller ones, two-stage 128 x 64 tiles among them. The pruning below drops what the device's
# real limit (_common.max_shared_bytes) or a given call cannot use; the autotuner skips any config that still
# fails to compile or launch (OutOfResources), and the self-check catches a kernel with none left.
CONFIGS = [
    _config(128, 128, 8, 2),
    _config(128, 128, 8, 3),
    _config(128, 64, 4, 2),
    _config(128, 64, 4, 3),
    _config(128, 64, 8, 3),
    _config(128, 64, 4, 4),
    _config(128, 64, 8, 4),
    _config(128, 32, 4, 4),
    _config(64, 128, 4, 3),
    _config(64, 64, 4, 2),
    _config(64, 64, 4, 3),
    _config(64, 64, 4, 4),
    _config(64, 32, 4, 4),
    _config(32, 64, 4, 2),
    _config(16, 32, 4, 2),
]

# Under the interpreter autotuning would time every config on the CPU: one fixed config, big blocks
# (the interpreter's cost is per block operation, not per element).
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


def shared_bytes_estimate(block_m: int, block_n: int, stages: int, head_dim: int, elt_bytes: int) -> int:
    """Upper estimate of the shared memory a config takes: the Q tile plus ``stages`` buffers of K and V."""
    return (block_m + 2 * stages * block_n) * head_dim * elt_bytes


def prune_configs(
    configs: list[triton.Config], head_dim: int, seqlen_bucket: int, elt_bytes: int, smem_limit: int
) -> list[triton.Config]:
    """Configs worth timing: query blocks no longer than the longest segment (rounded up to a power of
    two), shared memory within the device's limit. Never empty: the smallest config is kept."""
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, seqlen_bucket)
        and shared_bytes_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, head_dim, elt_bytes)
        <= smem_limit
    ]
    if keep:
        return keep
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


def _early_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's hook (Triton 3.0 to 3.9 call it alike): prune for the device Q is on."""
    args = {**named_args, **kwargs}
    q = args["Q"]
    smem = max_shared_bytes(q.device)
    return prune_configs(configs, args["HEAD_DIM"], args["seqlen_bucket"], q.element_size(), smem)


_packed_attention_tuned = triton.autotune(
    configs=CONFIGS,
    key=["seqlen_bucket", "HEAD_DIM"],  # the autotuner adds the tensors' dtypes to the key
    prune_configs_by={"early_config_prune": _early_prune},
)(_packed_attention_fwd)


# -- launcher ------------------------------------------------------------------------------------------------
def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention within each packed segment.

    Args:
        q, k, v: (total_tokens, heads, head_dim), one dtype (bf16/fp16; fp32 for tests), same device;
            head_dim a power of two >= 16. The last dimension must be contiguous.
        cu_seqlens: int32 (batch + 1,) cumulative segment lengths, on q's device.
        max_seqlen: the longest segment's length (sizes the grid; a larger value only costs idle programs).
        scale: softmax scale, default head_dim ** -0.5.
    Returns:
        (total_tokens, heads, head_dim) in q's dtype.
    """
    total, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype: {q.shape}/{k.shape}/{v.shape}, {q.dtype}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1:
        raise ValueError("cu_seqlens must be a 1-d int32 tensor (batch + 1,)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch = cu_seqlens.numel() - 1
    scale = head_dim**-0.5 if scale is None else scale
    out = output_buffer((total, heads, head_dim), q.dtype, q.device)
    if total == 0 or max_seqlen == 0:
        return finish(out, q.dtype)
    args = (
        q, k, v, out, cu_seqlens, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        heads, triton.next_power_of_2(max_seqlen),
    )
    options = dict(
        HEAD_DIM=head_dim,
        DOT_FP32=dot_in_fp32(q.dtype),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if INTERPRET:
        block_m = INTERPRET_CONFIG["BLOCK_M"]
        grid = (triton.cdiv(max_seqlen, block_m), batch * heads)
        _packed_attention_fwd[grid](*args, **options, **INTERPRET_CONFIG)
    else:
        grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _packed_attention_tuned[grid](*args, **options)
    return finish(out, q.dtype)


# -- reference -----------------------------------------------------------------------------------------------
def packed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense softmax attention segment by segment, in ``compute_dtype`` (fp32: the exact reference; bf16/fp16:
    what plain torch gets in low precision). Returns q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).to(compute_dtype) for t in (q, k, v))  # (H, L, D)
        weights = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        out[start:end] = (weights @ vs).transpose(0, 1).to(q.dtype)
    return out


def attention_flops(seqlens: list[int], heads: int, head_dim: int) -> int:
    """Forward FLOPs: two (L x L x D) matmuls per segment and head, 2 FLOPs per multiply-add."""
    return sum(4 * n * n * heads * head_dim for n in seqlens)


__all__ = ["packed_attention", "packed_attention_reference", "attention_flops", "CONFIGS", "prune_configs"]
