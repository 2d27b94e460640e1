"""Fused multi-scale patchify: every Conv3d patch embedding (kernel = stride) as a GEMM over gathered patches,
written straight into one packed token buffer, and its torch reference.

FramePack embeds the noisy latents with a (1,2,2) kernel and the clean context latents with (1,2,2) / (2,4,4) /
(4,8,8) kernels, and the model wants the tokens as one sequence [4x | 2x | 1x | noisy]. The torch path pads,
permutes, copies each scale into a patch matrix, runs a GEMM and concatenates. Here a program gathers its
(BLOCK_M patches x BLOCK_K patch elements) tile straight from the (B, C, T, H, W) latents, with the replicate
padding done by clamping the gather indices, multiplies it by the weight tile, adds the bias and stores the
tokens at their final offset in the (B, L_total, C_out) buffer. One launch per scale, no intermediate tensor.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence

import torch
import triton
import triton.language as tl

from framepack_rt.kernels._common import INTERPRET, dot_in_fp32, finish, output_buffer


@triton.jit
def _patch_embed_kernel(
    X,  # pointer: latents (B, C_in, T, H, W), any strides
    Wt,  # pointer: weight (C_out, C_in * KT * KH * KW), rows contiguous: the conv weight flattened
    Bias,  # pointer: (C_out,) (unused when HAS_BIAS is false)
    Out,  # pointer: packed tokens (B, L_total, C_out), last dim contiguous
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ol,
    frames, height, width,  # latent extent; patches past it read the clamped (replicated) edge
    grid_h, grid_w,  # patches along H and W
    n_tokens, c_out, k_total,
    token_offset,  # where this scale's tokens start in the packed sequence
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # keep dot operands fp32 (bf16 under the interpreter)
    PRECISION: tl.constexpr,  # "ieee" for fp32 weights (no silent tf32); ignored for 16-bit ones
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)  # fastest: programs sharing a patch tile run together (L2 reuse)
    pid_m = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token index within this scale, (t, y, x) raster
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
    m_valid = offs_m < n_tokens
    n_valid = offs_n < c_out
    # Patch origin of each token (int32: per-scale token counts are small).
    m32 = offs_m.to(tl.int32)
    tp = m32 // (grid_h * grid_w)
    yp = (m32 // grid_w) % grid_h
    xp = m32 % grid_w
    x_base = X + batch * stride_xb

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # patch element, (c, kt, kh, kw) order like weight.flatten(1)
        k_valid = offs_k < k_total
        c = offs_k // (KT * KH * KW)
        dt = (offs_k // (KH * KW)) % KT
        dy = (offs_k // KW) % KH
        dx = offs_k % KW
        # Replicate padding: an index past the far edge reads the edge.
        t = tl.minimum(tp[:, None] * KT + dt[None, :], frames - 1)
        y = tl.minimum(yp[:, None] * KH + dy[None, :], height - 1)
        x = tl.minimum(xp[:, None] * KW + dx[None, :], width - 1)
        a_ptrs = (
            x_base + c[None, :].to(tl.int64) * stride_xc + t.to(tl.int64) * stride_xt
            + y.to(tl.int64) * stride_xh + x.to(tl.int64) * stride_xw
        )
        a = tl.load(a_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        w_ptrs = Wt + offs_n[None, :] * k_total + offs_k[:, None]  # (BLOCK_K, BLOCK_N) tile of weight^T
        w = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        else:
            a = a.to(w.dtype)  # the latents take the weight's dtype, as the torch path's .to() does
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]

    o_ptrs = Out + batch * stride_ob + (token_offset + offs_m)[:, None] * stride_ol + offs_n[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


# -- configurations ------------------------------------------------------------------------------------------
def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps,
                         num_stages=stages)


# Hopper candidates. K is 64 (1x, noisy), 512 (2x) or 4096 (4x) at C_in = 16; C_out = 3072.
CONFIGS = [
    _config(128, 128, 64, 4, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 256, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
]
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}


def prune_configs(configs: list[triton.Config], n_tokens: int, c_out: int) -> list[triton.Config]:
    """Drop tiles larger than the problem (rounded up to a power of two); never empty."""
    keep = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(n_tokens))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(c_out))
    ]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _early_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    return prune_configs(configs, args["n_tokens"], args["c_out"])


_patch_embed_tuned = triton.autotune(
    configs=CONFIGS,
    key=["k_total", "c_out", "KT", "KH", "KW"],
    prune_configs_by={"early_config_prune": _early_prune},
)(_patch_embed_kernel)


# -- launcher ------------------------------------------------------------------------------------------------
Scale = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (latents, conv weight, conv bias)


def token_count(latents_shape: Sequence[int], kernel: Sequence[int]) -> int:
    """Tokens one scale contributes: patches of the replicate-padded (T, H, W) grid."""
    return math.prod(-(-s // k) for s, k in zip(latents_shape[-3:], kernel))


def fused_patchify(scales: Sequence[Scale]) -> torch.Tensor:
    """Embed every scale into one packed token buffer.

    Args:
        scales: in packed order (FramePack: [4x, 2x, 1x, noisy]), each (latents (B, C_in, T, H, W),
            weight (C_out, C_in, kt, kh, kw), bias (C_out,) or None). Kernel = stride = the weight's
            (kt, kh, kw); latents whose T/H/W are not multiples of it are replicate-padded at the far end.
            All weights share C_out, dtype and device; all latents share B.
    Returns:
        (B, sum of tokens, C_out) in the weight dtype; each scale's tokens in the conv's (t, y, x) order.
    """
    if not scales:
        raise ValueError("fused_patchify needs at least one scale")
    weight0 = scales[0][1]
    batch, c_out, dtype, device = scales[0][0].shape[0], weight0.shape[0], weight0.dtype, weight0.device
    for latents, weight, _ in scales:
        if latents.ndim != 5 or weight.ndim != 5 or latents.shape[1] != weight.shape[1]:
            raise ValueError(f"latents {tuple(latents.shape)} do not fit conv weight {tuple(weight.shape)}")
        if latents.shape[0] != batch or weight.shape[0] != c_out or weight.dtype != dtype:
            raise ValueError("all scales must share the batch size, C_out and the weight dtype")
    counts = [token_count(latents.shape, weight.shape[2:]) for latents, weight, _ in scales]
    out = output_buffer((batch, sum(counts), c_out), dtype, device)
    offset = 0
    for (latents, weight, bias), n_tokens in zip(scales, counts):
        kt, kh, kw = weight.shape[2:]
        _, _, frames, height, width = latents.shape
        w2d = weight.reshape(c_out, -1)
        w2d = w2d if w2d.is_contiguous() else w2d.contiguous()
        args = (
            latents, w2d, bias if bias is not None else w2d, out,
            *latents.stride(), out.stride(0), out.stride(1),
            frames, height, width, -(-height // kh), -(-width // kw), n_tokens, c_out, w2d.shape[1], offset,
        )
        options = dict(
            KT=kt, KH=kh, KW=kw, HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(dtype),
            PRECISION="ieee" if dtype == torch.float32 else "tf32",
        )
        if INTERPRET:
            cfg = INTERPRET_CONFIG
            grid = (triton.cdiv(c_out, cfg["BLOCK_N"]), triton.cdiv(n_tokens, cfg["BLOCK_M"]), batch)
            _patch_embed_kernel[grid](*args, **options, **cfg)
        else:
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(c_out, meta["BLOCK_N"]), triton.cdiv(n_tokens, meta["BLOCK_M"]), batch
            )
            _patch_embed_tuned[grid](*args, **options)
        offset += n_tokens
    return finish(out, dtype)


# -- reference -----------------------------------------------------------------------------------------------
def fused_patchify_reference(scales: Sequence[Scale]) -> torch.Tensor:
    """The model's torch path: ``framepack_rt.model.transformer.patchify`` per scale, then one concatenation."""
    from framepack_rt.model.transformer import patchify  # late: the model imports the kernels' dispatch

    tokens = []
    for latents, weight, bias in scales:
        conv = SimpleNamespace(kernel_size=tuple(weight.shape[2:]), weight=weight, bias=bias)
        tokens.append(patchify(conv, latents))
    return torch.cat(tokens, dim=1)


__all__ = ["fused_patchify", "fused_patchify_reference", "token_count", "CONFIGS", "prune_configs"]
