"""Fused q/k RMSNorm + RoPE, and its torch reference.

The model normalizes every head of q and k (RMSNorm over head_dim with a learned weight, fp32 statistics) and
then rotates the video tokens' interleaved pairs (d0, d1), (d2, d3) ... by the 3D RoPE tables. In torch that
is five passes over q (cast, square-mean, scale, weight, rotate) with bf16 round trips in between; here one
program loads BLOCK_R rows (a row = one token's head: head_dim values), does everything in fp32 registers
and stores once. The pair swap of the rotation is done in registers (reshape + split + join).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_rt.kernels._common import finish, output_buffer

EPS = 1e-6


@triton.jit
def _qk_norm_rope_kernel(
    X,  # pointer: (B, L, H, HEAD_DIM), last dim contiguous
    Out,  # pointer: (B, L, H, HEAD_DIM) contiguous
    Wt,  # pointer: RMSNorm weight (HEAD_DIM,)
    Cos, Sin,  # pointers: (B or 1, L, HEAD_DIM) fp32, last dim contiguous (unused without HAS_ROPE)
    n_rows,  # B * L * H
    seq_len, num_heads,
    stride_xb, stride_xl, stride_xh,
    stride_cb,  # 0 when one table serves every sample
    stride_cl,
    eps,
    HEAD_DIM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_valid = rows < n_rows
    head = rows % num_heads
    token = rows // num_heads
    pos = token % seq_len
    sample = token // seq_len
    offs_d = tl.arange(0, HEAD_DIM)

    x_ptrs = X + (sample * stride_xb + pos * stride_xl + head * stride_xh)[:, None] + offs_d[None, :]
    x = tl.load(x_ptrs, mask=row_valid[:, None], other=0.0).to(tl.float32)
    w = tl.load(Wt + offs_d).to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    y = x * inv_rms[:, None] * w[None, :]
    if HAS_ROPE:
        # rotated = (-y1, y0, -y3, y2, ...): split the interleaved pairs, swap, join back.
        even, odd = tl.split(tl.reshape(y, (BLOCK_R, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (BLOCK_R, HEAD_DIM))
        t_off = (sample * stride_cb + pos * stride_cl)[:, None] + offs_d[None, :]
        cos = tl.load(Cos + t_off, mask=row_valid[:, None], other=0.0)
        sin = tl.load(Sin + t_off, mask=row_valid[:, None], other=0.0)
        y = y * cos + rotated * sin
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], y.to(Out.dtype.element_ty), mask=row_valid[:, None])


def launch_config(head_dim: int) -> dict:
    """Rows per program and warps: about 4096 values per program (32 rows of 128), memory-bound work."""
    block_r = max(1, 4096 // head_dim)
    return {"BLOCK_R": block_r, "num_warps": 8 if block_r * head_dim >= 4096 else 4}


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """RMSNorm over the last dim with ``weight``, then (when tables are given) RoPE on interleaved pairs.

    Args:
        x: (B, L, H, D) or (L, H, D) per-head q or k, last dim contiguous; D a power of two.
        weight: (D,) RMSNorm weight; its dtype is the output dtype (as the model's RMSNorm).
        cos, sin: (B or 1, L, D) fp32 RoPE tables (or (L, D)); None: normalize only.
    Returns:
        Same shape as x, contiguous, in weight's dtype.
    """
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"x must be (B, L, H, D) or (L, H, D), got {tuple(x.shape)}")
    batch, seq_len, heads, head_dim = x.shape
    if head_dim & (head_dim - 1) or weight.shape != (head_dim,):
        raise ValueError(f"head_dim {head_dim} must be a power of two matching weight {tuple(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    has_rope = cos is not None
    if has_rope:
        cos, sin = (t if t.ndim == 3 else t.unsqueeze(0) for t in (cos, sin))
        if cos.shape[1:] != (seq_len, head_dim) or cos.shape[0] not in (1, batch) or sin.shape != cos.shape:
            raise ValueError(f"RoPE tables {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
        cos, sin = (t.float().contiguous() for t in (cos, sin))
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        stride_cl = cos.stride(1)
    else:
        cos = sin = weight  # never read
        stride_cb = stride_cl = 0
    out = output_buffer((batch, seq_len, heads, head_dim), weight.dtype, x.device)
    n_rows = batch * seq_len * heads
    if n_rows:
        cfg = launch_config(head_dim)
        grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
        _qk_norm_rope_kernel[grid](
            x, out, weight, cos, sin, n_rows, seq_len, heads, x.stride(0), x.stride(1), x.stride(2),
            stride_cb, stride_cl, eps, HEAD_DIM=head_dim, HAS_ROPE=has_rope, **cfg,
        )
    out = finish(out, weight.dtype)
    return out[0] if squeeze else out


# -- reference -----------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``framepack_rt.model.layers.RMSNorm.forward``: fp32 statistics, cast to the weight dtype, times the weight."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def qk_norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """The model's torch path: RMSNorm, then ``framepack_rt.model.rope.apply_rope``."""
    from framepack_rt.model.rope import apply_rope

    y = rms_norm_reference(x, weight, eps)
    return y if cos is None else apply_rope(y, cos, sin)


__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "rms_norm_reference", "launch_config"]
