"""Where the model chooses between the Triton kernels and the torch path, per call.

Decision, in order:
  1. ``use_kernels(True | False)`` (a context manager, this thread/task only), else
  2. ``FRAMEPACK_KERNELS=1 | 0`` in the environment, else
  3. auto: the kernel when every tensor of the call is on CUDA and triton imports, the torch path otherwise.
Forced on (1 or 2) means the kernels run on any device, attention included (``framepack_rt.model.attention`` asks
:func:`kernels_forced`). On the CPU that needs Triton's interpreter: ``TRITON_INTERPRET=1`` set before triton
is first imported. That is what tests/kernels does; anything else gets an error saying so, never a silent
fallback. Forced off keeps every call on torch, on CUDA too.

The torch paths here are the model's own lines, so with kernels off the numerics are exactly the model's.
Kernel modules are imported only when a kernel runs: importing this module never imports triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, Sequence

import torch
import torch.nn as nn

ENV_VAR = "FRAMEPACK_KERNELS"
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("framepack_kernels", default=None)


@contextlib.contextmanager
def use_kernels(enabled: bool | None = True) -> Iterator[None]:
    """Force the kernels on (True) or off (False) inside the block; None restores the environment's choice."""
    token = _override.set(enabled)
    try:
        yield
    finally:
        _override.reset(token)


def kernels_forced() -> bool | None:
    """True / False when forced on / off (context manager first, then FRAMEPACK_KERNELS); None for auto."""
    override = _override.get()
    if override is not None:
        return override
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{ENV_VAR}={value!r}: use 1 (force the Triton kernels), 0 (force torch) or leave it unset")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def wants_kernels(*tensors: torch.Tensor) -> bool:
    """Whether this call runs the Triton kernel (raises when forced on where no kernel can run)."""
    forced = kernels_forced()
    if forced is False:
        return False
    if forced is None:
        return triton_available() and all(t.is_cuda for t in tensors)
    if not triton_available():
        raise RuntimeError(f"kernels forced on ({ENV_VAR}=1 or use_kernels(True)) but triton is not installed")
    if not all(t.is_cuda for t in tensors):
        from framepack_rt.kernels._common import INTERPRET

        if not INTERPRET:
            raise RuntimeError(
                "kernels forced on for CPU tensors: that needs Triton's interpreter, TRITON_INTERPRET=1 set "
                "before triton is first imported"
            )
    return True


# -- the model's dispatch points -----------------------------------------------------------------------------
def patch_embed(pieces: Sequence[tuple[nn.Conv3d, torch.Tensor]]) -> torch.Tensor:
    """[(conv, latents), ...] in packed order -> tokens (B, L_total, C), one buffer."""
    if wants_kernels(*(latents for _, latents in pieces)):
        from framepack_rt.kernels.patchify import fused_patchify

        return fused_patchify([(latents, conv.weight, conv.bias) for conv, latents in pieces])
    from framepack_rt.model.transformer import patchify

    tokens = [patchify(conv, latents) for conv, latents in pieces]
    return torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]


def norm_rope(
    x: torch.Tensor, norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``apply_rope(norm(x), *rope)`` (or ``norm(x)`` without tables) for per-head q or k (..., H, D)."""
    if wants_kernels(x):
        from framepack_rt.kernels.qk_norm_rope import qk_norm_rope

        cos, sin = rope if rope is not None else (None, None)
        return qk_norm_rope(x, norm.weight, cos, sin, eps=norm.eps)
    if rope is None:
        return norm(x)
    from framepack_rt.model.rope import apply_rope

    return apply_rope(norm(x), *rope)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift``."""
    if wants_kernels(x):
        from framepack_rt.kernels.adaln import modulate as fused_modulate

        return fused_modulate(x, shift, scale)
    from framepack_rt.model.layers import modulate as torch_modulate

    return torch_modulate(x, shift, scale)


def residual_gate_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = x + y * gate`` and ``modulate(x, shift, scale)``: (new x, modulated x)."""
    if wants_kernels(x):
        from framepack_rt.kernels.adaln import residual_gate_modulate as fused

        return fused(x, y, gate, shift, scale)
    from framepack_rt.model.layers import modulate as torch_modulate

    x = x + y * gate
    return x, torch_modulate(x, shift, scale)
