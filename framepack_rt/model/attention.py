"""The one dispatch point for attention.

Every attention call in the model goes through :func:`packed_attention`, on packed (varlen) sequences in the
flash-attn layout: q, k, v are (total_tokens, heads, head_dim) and ``cu_seqlens`` (int32, batch + 1) marks
where each sample's sequence starts. No work is spent on padding because there is none.

Backends, picked per call:
  * ``flash_attn``: flash-attn's varlen kernel, when flash-attn is installed and the tensors are on CUDA;
  * ``triton``: the project's Triton kernel (``framepack_rt.kernels.packed_attention``) on CUDA;
  * ``sdpa``: exact torch ``scaled_dot_product_attention`` segment by segment (CPU, or anything else).
``FRAMEPACK_ATTENTION=sdpa|triton|flash_attn`` forces one (an error says why when it cannot run). Without it,
the kernels' switch (``framepack_rt.kernels.use_kernels`` / ``FRAMEPACK_KERNELS``) forces ``triton`` on (any
device: the CPU runs it under Triton's interpreter) or keeps it off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable

import torch
import torch.nn.functional as F

from framepack_rt.kernels.dispatch import kernels_forced, wants_kernels

BACKENDS = ("flash_attn", "triton", "sdpa")


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen() -> Callable | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _triton_varlen() -> Callable | None:
    try:
        module = importlib.import_module("framepack_rt.kernels.packed_attention")
    except ImportError:  # the kernel module, or triton itself, is not available
        return None
    return getattr(module, "packed_attention", None)


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device``, best first."""
    names = []
    if device.type == "cuda" and _flash_attn_varlen() is not None:
        names.append("flash_attn")
    if (device.type == "cuda" or kernels_forced()) and _triton_varlen() is not None:
        names.append("triton")
    names.append("sdpa")
    return names


def select_backend(q: torch.Tensor) -> str:
    forced = os.environ.get("FRAMEPACK_ATTENTION", "").strip()
    usable = available_backends(q.device)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FRAMEPACK_ATTENTION={forced!r}: choose one of {', '.join(BACKENDS)}")
        if forced not in usable:
            raise RuntimeError(
                f"FRAMEPACK_ATTENTION={forced!r} cannot run on {q.device}: usable here are {usable}"
            )
        return forced
    kernels = kernels_forced()
    if kernels:
        wants_kernels(q)  # raises with the reason when the kernel cannot run here
        return "triton"
    if kernels is False:
        usable = [name for name in usable if name != "triton"]
    if q.dtype == torch.float32:
        return "sdpa"  # the fused kernels take fp16/bf16 only
    return usable[0]


def sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int], scale: float | None = None
) -> torch.Tensor:
    """Exact reference: dense SDPA on each segment. Equal-length segments run as one batched call."""
    if len(set(seqlens)) == 1:
        n, length = len(seqlens), seqlens[0]
        # (total, H, D) -> (n, H, L, D)
        qb, kb, vb = (t.unflatten(0, (n, length)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        return out.transpose(1, 2).flatten(0, 1)
    out = torch.empty_like(q)
    start = 0
    for length in seqlens:
        end = start + length
        seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seg, scale=scale)[0].transpose(0, 1)
        start = end
    return out


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    seqlens: list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention over packed sequences.

    Args:
        q, k, v: (total_tokens, heads, head_dim), same dtype and device.
        cu_seqlens: int32 (batch + 1,) cumulative lengths, on q's device (flash-attn convention).
        max_seqlen: the longest segment.
        seqlens: the segment lengths as Python ints (the host copy of ``cu_seqlens.diff()``, so that no
            backend needs a device sync to read them).
        scale: softmax scale, default head_dim ** -0.5.
    Returns:
        (total_tokens, heads, head_dim) in q's dtype.
    """
    backend = select_backend(q)
    if backend == "flash_attn":
        fn = _flash_attn_varlen()
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale)
    if backend == "triton":
        return _triton_varlen()(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    return sdpa_varlen(q, k, v, seqlens, scale=scale)
