"""Fused gated residual + AdaLN modulate, and its torch reference.

Where the double-stream block ends its attention sub-layer it does, per stream,

    x = x + attn_out * gate                      # gated residual of the previous sub-layer
    h = layer_norm(x) * (1 + scale) + shift      # AdaLN modulate: the MLP sub-layer's input

(LayerNorm without affine, eps 1e-6; gate/shift/scale are per-sample vectors for the video stream, per-token
rows for the packed context stream). In torch that is seven passes over (tokens, C) with bf16 round trips;
:func:`residual_gate_modulate` reads x, attn_out and the vectors once and writes the new x and h once, with
fp32 statistics. Without a residual (``y=None``) it is plain :func:`modulate`, the blocks' first AdaLN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from framepack_rt.kernels._common import finish, output_buffer

EPS = 1e-6


@triton.jit
def _adaln_kernel(
    X,  # pointer: residual stream (R, C) rows, last dim contiguous
    Y,  # pointer: previous sub-layer's output (R, C) (unused without HAS_RESIDUAL)
    Gate, Shift, Scale,  # pointers: (V, C) modulation rows; row r uses vector r // rows_per_vec
    XOut,  # pointer: new residual stream x + y * gate, (R, C) contiguous (unused without HAS_RESIDUAL)
    ModOut,  # pointer: layer_norm(x) * (1 + scale) + shift, (R, C) contiguous
    n_rows, dim, rows_per_vec,
    stride_x, stride_y, stride_gate, stride_shift, stride_scale,  # row strides
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next_power_of_2(dim): a whole row is in registers for the statistics
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_valid = rows < n_rows
    col_valid = cols < dim
    mask = row_valid[:, None] & col_valid[None, :]
    vec = rows // rows_per_vec

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(Gate + vec[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x + y * gate
        tl.store(XOut + rows[:, None] * dim + cols[None, :], x.to(XOut.dtype.element_ty), mask=mask)
    # LayerNorm statistics in fp32, on the unrounded sum (closer to the exact result than re-reading x).
    mean = tl.sum(x, axis=1) / dim
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=1) / dim + eps)
    shift = tl.load(Shift + vec[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(Scale + vec[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = centered * rstd[:, None] * (1.0 + scale) + shift
    tl.store(ModOut + rows[:, None] * dim + cols[None, :], h.to(ModOut.dtype.element_ty), mask=mask)


def launch_config(dim: int) -> dict:
    """A whole row per program at C = 3072 (BLOCK_C 4096, 8 warps); several short rows per program else."""
    block_c = triton.next_power_of_2(dim)
    block_r = max(1, 4096 // block_c)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8 if block_r * block_c >= 4096 else 4}


def _as_rows(vec: torch.Tensor, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """A modulation vector that broadcasts against x as x.shape[:j] + (1, ...) + (C,) -> ((V, C), rows per
    vector): (B, 1, C) against (B, L, C) gives (B, C) and L; (Tc, C) against (Tc, C) gives (Tc, C) and 1."""
    dim = x.shape[-1]
    while vec.ndim < x.ndim:
        vec = vec.unsqueeze(0)
    lead = list(vec.shape[:-1])
    j = len(lead)
    while j > 0 and lead[j - 1] == 1 and x.shape[j - 1] != 1:
        j -= 1
    if vec.shape[-1] != dim or lead[:j] != list(x.shape[:j]) or any(n != 1 for n in lead[j:]):
        raise ValueError(f"{name} of shape {tuple(vec.shape)} does not broadcast per row against {tuple(x.shape)}")
    rows = vec.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, math.prod(x.shape[j:-1])


def residual_gate_modulate(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = x + y * gate`` and ``layer_norm(x_new) * (1 + scale) + shift`` in one pass.

    Args:
        x, y: (..., C) of one shape (the residual stream and the previous sub-layer's output). ``y=None``
            skips the residual (then ``gate`` is ignored and x_new is x itself).
        gate, shift, scale: broadcast per row against x: (B, 1, C) for x (B, L, C); (T, C) or (1, C) for x (T, C).
    Returns:
        (x_new, modulated), both x's shape and dtype, contiguous.
    """
    dim = x.shape[-1]
    has_residual = y is not None
    if has_residual and y.shape != x.shape:
        raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)}")
    x2 = x.reshape(-1, dim)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    n_rows = x2.shape[0]
    shift_rows, rows_per_vec = _as_rows(shift, x, "shift")
    scale_rows, per_scale = _as_rows(scale, x, "scale")
    if has_residual:
        y2 = y.reshape(-1, dim)
        y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
        gate_rows, per_gate = _as_rows(gate, x, "gate")
    else:
        y2, gate_rows, per_gate = x2, shift_rows, rows_per_vec
    if not rows_per_vec == per_scale == per_gate:
        raise ValueError("gate, shift and scale must broadcast the same way (all per sample or all per token)")
    x_out = output_buffer(x.shape, x.dtype, x.device) if has_residual else x
    mod_out = output_buffer(x.shape, x.dtype, x.device)
    if n_rows:
        cfg = launch_config(dim)
        _adaln_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
            x2, y2, gate_rows, shift_rows, scale_rows, x_out, mod_out, n_rows, dim, max(rows_per_vec, 1),
            x2.stride(0), y2.stride(0), gate_rows.stride(0), shift_rows.stride(0), scale_rows.stride(0), eps,
            HAS_RESIDUAL=has_residual, **cfg,
        )
    return finish(x_out, x.dtype), finish(mod_out, x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` (AdaLN without a residual before it)."""
    return residual_gate_modulate(x, None, None, shift, scale, eps)[1]


# -- reference -----------------------------------------------------------------------------------------------
def residual_gate_modulate_reference(
    x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's torch lines: ``x = x + y * gate`` then ``framepack_rt.model.layers.modulate``."""
    from framepack_rt.model.layers import modulate as torch_modulate

    if y is not None:
        x = x + y * gate
    return x, torch_modulate(x, shift, scale)


__all__ = ["residual_gate_modulate", "modulate", "residual_gate_modulate_reference", "launch_config"]
