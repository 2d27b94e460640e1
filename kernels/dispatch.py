"""Where the model chooses between the Triton kernels and the torch path.

Decision, in order:
  1. ``use_kernels(True | False)`` (a context manager, this thread/task only), else
  2. ``FRAMEPACK_KERNELS=1 | 0`` in the environment, else
  3. auto: the kernel when every tensor of the call is on CUDA and triton imports, the torch path otherwise.
Forced on (1 or 2) means the kernels run on any device, attention included (``framepack_rt.model.attention`` asks
:func:`kernels_forced`). On the CPU that needs Triton's interpreter: ``TRITON_INTERPRET=1`` set before triton
is first imported. That is what tests/kernels does; anything else gets an error saying so, never a silent
fallback. Forced off keeps every call on torch, on CUDA too.

Then the kernel's self-check (:mod:`framepack_rt.kernels.selfcheck`): before a kernel is first used for a
(device, dtype, shape class) it runs on a small probe against its torch reference; one that fails (compile
error, OutOfResources, wrong result) is logged once and its op runs on torch for the rest of the process.

:func:`kernel_plan` makes that decision once per (device, dtype, switch state, shapes) for the model's four
fusable ops; the per-call functions at the end (:func:`modulate`, ...) make it per call, for direct callers.
The torch paths here are the model's own lines, so with kernels off the numerics are exactly the model's.
Kernel modules are imported only when a kernel runs: importing this module never imports triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from framepack_rt.kernels import selfcheck

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
    """Whether this call runs the Triton kernel (raises when forced on where no kernel can run).
    The switch only: the self-check is asked separately (:func:`kernel_plan`, :func:`kernel_passes`)."""
    return _switch_allows(all(t.is_cuda for t in tensors), kernels_forced())


def _switch_allows(on_cuda: bool, forced: bool | None) -> bool:
    if forced is False:
        return False
    if forced is None:
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"kernels forced on ({ENV_VAR}=1 or use_kernels(True)) but triton is not installed")
    if not on_cuda:
        from framepack_rt.kernels._common import INTERPRET

        if not INTERPRET:
            raise RuntimeError(
                "kernels forced on for CPU tensors: that needs Triton's interpreter, TRITON_INTERPRET=1 set "
                "before triton is first imported"
            )
    return True


def kernel_passes(kernel: str, device: torch.device, dtype: torch.dtype, shape: Sequence[int]) -> bool:
    """Whether ``kernel`` passed its self-check for this (device, dtype, shape class); probes on first ask."""
    return selfcheck.check_kernel(kernel, device, dtype, shape).ok


# -- decided once: the model's plan of which ops run fused ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """The model's four fusable ops, each already resolved to the Triton kernel or the torch path.

    Built once per (device, dtype, switch state, shapes) by :func:`kernel_plan` and held by the model's step
    plan, so a forward asks no switch, environment or ContextVar per op call (and traces as one graph)."""

    fused: frozenset[str]  # names of the ops that run as Triton kernels
    patch_embed: Callable[[Sequence[tuple[nn.Conv3d, torch.Tensor]]], torch.Tensor]
    norm_rope: Callable[..., torch.Tensor]
    modulate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    residual_gate_modulate: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    checks: tuple[selfcheck.KernelCheck, ...] = ()  # the self-checks behind the choice (empty: kernels off)


# The plan's ops, in KernelPlan's field order, and the kernel (self-check name) behind each.
OPS = ("patch_embed", "norm_rope", "modulate", "residual_gate_modulate")
OP_KERNELS = {
    "patch_embed": "patchify",
    "norm_rope": "qk_norm_rope",
    "modulate": "modulate",
    "residual_gate_modulate": "residual_gate_modulate",
}


def kernel_plan(
    device: torch.device,
    dtype: torch.dtype,
    *,
    head_dim: int | None = None,
    dim: int | None = None,
    in_channels: int | None = None,
) -> KernelPlan:
    """Which ops run fused for tensors of ``dtype`` on ``device``: the switch (use_kernels / FRAMEPACK_KERNELS
    / auto: CUDA with triton), read now, then each kernel's self-check for the model's shape classes
    (``head_dim``: q/k norm + RoPE; ``dim``: AdaLN and patchify's width; ``in_channels``: patchify's input;
    None: selfcheck.DEFAULT_SHAPES). Cached: the same arguments and switch state give the same plan object."""
    device = torch.device(device)
    forced = kernels_forced()
    if device.type == "meta":
        return _plan("meta", dtype, False, (None, None, None))
    return _plan(selfcheck.device_key(device), dtype, forced, (head_dim, dim, in_channels))


@functools.lru_cache(maxsize=None)
def _plan(device: str, dtype: torch.dtype, forced: bool | None, dims: tuple[int | None, ...]) -> KernelPlan:
    torch_ops = (torch_patch_embed, torch_norm_rope, torch_modulate_op, torch_residual_gate)
    if device == "meta" or not _switch_allows(device.startswith("cuda"), forced):
        return KernelPlan(frozenset(), *torch_ops)
    head_dim, dim, in_channels = dims
    default = selfcheck.DEFAULT_SHAPES
    shapes = {
        "patch_embed": (in_channels or default["patchify"][0], dim or default["patchify"][1]),
        "norm_rope": (head_dim,) if head_dim else default["qk_norm_rope"],
        "modulate": (dim,) if dim else default["modulate"],
        "residual_gate_modulate": (dim,) if dim else default["residual_gate_modulate"],
    }
    checks = {op: selfcheck.check_kernel(OP_KERNELS[op], torch.device(device), dtype, shapes[op]) for op in OPS}
    fused_ops = (fused_patch_embed, fused_norm_rope, fused_modulate_op, fused_residual_gate)
    chosen = [fused if checks[op].ok else plain for op, fused, plain in zip(OPS, fused_ops, torch_ops)]
    return KernelPlan(frozenset(op for op in OPS if checks[op].ok), *chosen, checks=tuple(checks.values()))


def reset_decisions() -> None:
    """Forget every plan and self-check result (tests that swap kernels in; a process never needs it)."""
    _plan.cache_clear()
    selfcheck.CHECKS.clear()


# -- the op implementations: torch (the model's own lines) and fused ------------------------------------------
def torch_patch_embed(pieces: Sequence[tuple[nn.Conv3d, torch.Tensor]]) -> torch.Tensor:
    from framepack_rt.model.transformer import patchify

    tokens = [patchify(conv, latents) for conv, latents in pieces]
    return torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]


def fused_patch_embed(pieces: Sequence[tuple[nn.Conv3d, torch.Tensor]]) -> torch.Tensor:
    from framepack_rt.kernels.patchify import fused_patchify

    return fused_patchify([(latents, conv.weight, conv.bias) for conv, latents in pieces])


def torch_norm_rope(
    x: torch.Tensor, norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    if rope is None:
        return norm(x)
    from framepack_rt.model.rope import apply_rope

    return apply_rope(norm(x), *rope)


def fused_norm_rope(
    x: torch.Tensor, norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    from framepack_rt.kernels.qk_norm_rope import qk_norm_rope

    cos, sin = rope if rope is not None else (None, None)
    return qk_norm_rope(x, norm.weight, cos, sin, eps=norm.eps)


def torch_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from framepack_rt.model.layers import modulate as torch_modulate

    return torch_modulate(x, shift, scale)


def fused_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from framepack_rt.kernels.adaln import modulate as fused_modulate

    return fused_modulate(x, shift, scale)


def torch_residual_gate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from framepack_rt.model.layers import modulate as torch_modulate

    x = x + y * gate
    return x, torch_modulate(x, shift, scale)


def fused_residual_gate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from framepack_rt.kernels.adaln import residual_gate_modulate as fused

    return fused(x, y, gate, shift, scale)


# -- the model's dispatch points, decided per call (kept for direct callers; the model uses kernel_plan) -------
def patch_embed(pieces: Sequence[tuple[nn.Conv3d, torch.Tensor]]) -> torch.Tensor:
    """[(conv, latents), ...] in packed order -> tokens (B, L_total, C), one buffer."""
    weight = pieces[0][0].weight
    fused = wants_kernels(*(latents for _, latents in pieces)) and kernel_passes(
        "patchify", weight.device, weight.dtype, (weight.shape[1], weight.shape[0])
    )
    return (fused_patch_embed if fused else torch_patch_embed)(pieces)


def norm_rope(
    x: torch.Tensor, norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``apply_rope(norm(x), *rope)`` (or ``norm(x)`` without tables) for per-head q or k (..., H, D)."""
    fused = wants_kernels(x) and kernel_passes("qk_norm_rope", x.device, norm.weight.dtype, (x.shape[-1],))
    return (fused_norm_rope if fused else torch_norm_rope)(x, norm, rope)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift``."""
    fused = wants_kernels(x) and kernel_passes("modulate", x.device, x.dtype, (x.shape[-1],))
    return (fused_modulate_op if fused else torch_modulate_op)(x, shift, scale)


def residual_gate_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = x + y * gate`` and ``modulate(x, shift, scale)``: (new x, modulated x)."""
    fused = wants_kernels(x) and kernel_passes("residual_gate_modulate", x.device, x.dtype, (x.shape[-1],))
    return (fused_residual_gate if fused else torch_residual_gate)(x, y, gate, shift, scale)
