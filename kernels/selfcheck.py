"""Kernels that check themselves: each Triton kernel, before its first use on a device (per dtype and shape
class), runs on a small probe beside its torch reference.

A compile error, ``OutOfResources``, any other exception from the launch, or a result beyond the tolerance
fails the check: ONE warning on the ``framepack_rt.kernels`` logger names the kernel and the reason, and the
result is kept for the process, so :mod:`framepack_rt.kernels.dispatch` (and the attention choice) run that
op on torch from then on. The tolerance is the project's rule (tests/kernels use the same functions):
  * fp32: ``|kernel - reference| <= FP32_ATOL * scale`` (only the summation order differs);
  * fp16 / bf16: the kernel's max error against the fp32 reference is at most twice torch's own error in that
    dtype plus ``LOWP_ATOL * scale``;
with ``scale = max(1, max |reference|)``.

The shape class is what selects a different compiled kernel: head_dim for q/k norm + RoPE and attention, the
model width for AdaLN, (in_channels, width) for patchify. The probe has that class's constexprs and few rows.
Kernel modules (and so triton) are imported only when a check runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import threading
from typing import Callable, Mapping, Sequence

import torch

LOGGER = logging.getLogger("framepack_rt.kernels")

FP32_ATOL = 1e-5  # fp32 inputs: the kernel and the fp32 reference differ only in summation order
LOWP_ATOL = 1e-4

KERNELS = ("patchify", "qk_norm_rope", "modulate", "residual_gate_modulate", "packed_attention")
# Probe shape class where the caller names none: (in_channels, width), (head_dim,), (width,).
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "patchify": (16, 64),
    "qk_norm_rope": (128,),
    "modulate": (64,),
    "residual_gate_modulate": (64,),
    "packed_attention": (128,),
}


# -- the tolerance rule --------------------------------------------------------------------------------------
def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| in fp32 (NaN when either holds a NaN); 0 for empty tensors."""
    return (got.float() - ref.float()).abs().max().item() if got.numel() else 0.0


def tolerance(torch_error: float | None, scale: float = 1.0) -> float:
    """The largest max error a kernel may have against the fp32 reference: ``FP32_ATOL * scale`` for fp32
    inputs (``torch_error`` None), else ``2 * torch_error + LOWP_ATOL * scale`` where ``torch_error`` is
    torch's own error in the low-precision dtype."""
    if torch_error is None:
        return FP32_ATOL * scale
    return 2 * torch_error + LOWP_ATOL * scale


def reference_scale(ref: torch.Tensor) -> float:
    """The ``scale`` of the tolerance rule: max(1, max |reference|)."""
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


# -- results -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """One kernel's self-check on one (device, dtype, shape class)."""

    name: str
    ok: bool
    reason: str  # "passed", or why the kernel is not used (exception, or error against tolerance)
    max_error: float | None = None  # worst max |kernel - fp32 reference| over the probe's outputs
    tolerance: float | None = None  # the bound that error was held to
    device: str = ""
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()


Outputs = tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class ProbeCase:
    """One call of a kernel and its torch reference on the same inputs."""

    kernel: Callable[[], Outputs]
    reference: Callable[[torch.dtype], Outputs]  # computed in the given dtype (fp32: the exact reference)


def _module(name: str):
    return importlib.import_module(f"framepack_rt.kernels.{name}")


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


# -- the probes, one per kernel family -----------------------------------------------------------------------
def _patchify_cases(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> list[ProbeCase]:
    c_in, c_out = shape
    g = torch.Generator().manual_seed(0)
    scales = []
    for kernel, frames in (((4, 8, 8), 5), ((2, 4, 4), 3), ((1, 2, 2), 2)):  # FramePack's 4x, 2x, 1x
        fan_in = c_in * math.prod(kernel)
        latents = _randn(g, 1, c_in, frames, 9, 10).to(device)  # 9 x 10: the replicate padding runs too
        weight = _randn(g, c_out, c_in, *kernel, scale=fan_in**-0.5).to(device, dtype)
        bias = _randn(g, c_out, scale=0.1).to(device, dtype)
        scales.append((latents, weight, bias))
    mod = _module("patchify")

    def reference(compute: torch.dtype) -> Outputs:
        return (mod.fused_patchify_reference([(x, w.to(compute), b.to(compute)) for x, w, b in scales]),)

    return [ProbeCase(lambda: (mod.fused_patchify(scales),), reference)]


def _qk_norm_rope_cases(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> list[ProbeCase]:
    (head_dim,) = shape
    g = torch.Generator().manual_seed(1)
    x = _randn(g, 2, 24, 2, head_dim, scale=2.0).to(device, dtype)  # (B, L, H, D): video q or k
    ctx = _randn(g, 7, 2, head_dim, scale=2.0).to(device, dtype)  # (T, H, D): context, norm only
    weight = (1 + _randn(g, head_dim, scale=0.1)).to(device, dtype)
    angles = _randn(g, 1, 24, head_dim // 2 if head_dim > 1 else 1, scale=3.0).repeat_interleave(2, -1)
    cos, sin = (t[..., :head_dim].to(device) for t in (angles.cos(), angles.sin()))
    mod = _module("qk_norm_rope")

    def case(inputs: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | tuple[None, None]) -> ProbeCase:
        def reference(compute: torch.dtype) -> Outputs:
            return (mod.qk_norm_rope_reference(inputs.to(compute), weight.to(compute), *tables),)

        return ProbeCase(lambda: (mod.qk_norm_rope(inputs, weight, *tables),), reference)

    return [case(x, (cos, sin)), case(ctx, (None, None))]


def _adaln_cases(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], residual: bool
) -> list[ProbeCase]:
    (dim,) = shape
    g = torch.Generator().manual_seed(2)
    mod = _module("adaln")
    cases = []
    # Video stream: (B, L, C) with per-sample (B, 1, C) vectors; context stream: (T, C) with per-token rows.
    for x_shape, vec_shape in (((2, 20, dim), (2, 1, dim)), ((7, dim), (7, dim))):
        x = _randn(g, *x_shape, scale=2.0).to(device, dtype)
        y = _randn(g, *x_shape).to(device, dtype)
        gate, shift, scale = (_randn(g, *vec_shape, scale=0.5).to(device, dtype) for _ in range(3))

        def kernel(x=x, y=y, gate=gate, shift=shift, scale=scale) -> Outputs:
            if residual:
                return tuple(mod.residual_gate_modulate(x, y, gate, shift, scale))
            return (mod.modulate(x, shift, scale),)

        def reference(compute: torch.dtype, x=x, y=y, gate=gate, shift=shift, scale=scale) -> Outputs:
            args = [t.to(compute) for t in (x, y, gate, shift, scale)]
            if residual:
                return tuple(mod.residual_gate_modulate_reference(*args))
            return (mod.residual_gate_modulate_reference(args[0], None, None, args[3], args[4])[1],)

        cases.append(ProbeCase(kernel, reference))
    return cases


def _attention_cases(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> list[ProbeCase]:
    (head_dim,) = shape
    g = torch.Generator().manual_seed(3)
    lengths = [5, 70]  # ragged, one partial query and key block
    q, k, v = (_randn(g, sum(lengths), 2, head_dim).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    mod = _module("packed_attention")

    def reference(compute: torch.dtype) -> Outputs:
        return (mod.packed_attention_reference(q, k, v, cu, compute_dtype=compute),)

    return [ProbeCase(lambda: (mod.packed_attention(q, k, v, cu, max(lengths)),), reference)]


PROBES: dict[str, Callable[[torch.device, torch.dtype, tuple[int, ...]], list[ProbeCase]]] = {
    "patchify": _patchify_cases,
    "qk_norm_rope": _qk_norm_rope_cases,
    "modulate": lambda device, dtype, shape: _adaln_cases(device, dtype, shape, residual=False),
    "residual_gate_modulate": lambda device, dtype, shape: _adaln_cases(device, dtype, shape, residual=True),
    "packed_attention": _attention_cases,
}


def run_probe(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> KernelCheck:
    """Run one kernel's probe now (no cache, no logging) and judge it by the tolerance rule."""

    def result(ok: bool, reason: str, err: float | None = None, bound: float | None = None) -> KernelCheck:
        return KernelCheck(name, ok, reason, err, bound, device_key(device), dtype, shape)

    worst: tuple[float, float] | None = None  # (error, tolerance) of the output closest to its bound
    for case in PROBES[name](device, dtype, shape):
        ref32 = case.reference(torch.float32)
        lowp = None if dtype == torch.float32 else case.reference(dtype)
        try:  # anything the launch raises (compile error, OutOfResources, bad arguments) fails the kernel
            got = case.kernel()
        except Exception as error:  # noqa: BLE001 - the reason is logged and kept, and torch runs instead
            lines = str(error).strip().splitlines()
            return result(False, f"{type(error).__name__}: {lines[0] if lines else ''}"[:300])
        if len(got) != len(ref32):
            return result(False, f"returned {len(got)} outputs, the reference {len(ref32)}")
        for index, out in enumerate(got):
            if out.shape != ref32[index].shape:
                return result(False, f"output shape {tuple(out.shape)}, expected {tuple(ref32[index].shape)}")
            err = max_error(out, ref32[index])
            torch_err = None if lowp is None else max_error(lowp[index], ref32[index])
            bound = tolerance(torch_err, reference_scale(ref32[index]))
            if not err <= bound:  # NaN fails too
                return result(False, f"max error {err:.3g} > tolerance {bound:.3g}", err, bound)
            if worst is None or err / bound > worst[0] / worst[1]:
                worst = (err, bound)
    return result(True, "passed", *(worst or (None, None)))


# -- the process-wide record ---------------------------------------------------------------------------------
def device_key(device: torch.device | str) -> str:
    """"cuda:0" for torch.device("cuda") (the current device), "cpu", ...: one key per physical device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


class SelfChecks:
    """Every check made in this process, by (kernel, device, dtype, shape class); each runs at most once."""

    def __init__(self) -> None:
        self._results: dict[tuple[str, str, torch.dtype, tuple[int, ...]], KernelCheck] = {}
        self._lock = threading.Lock()

    def check(self, name: str, device: torch.device, dtype: torch.dtype, shape: Sequence[int] | None) -> KernelCheck:
        if name not in PROBES:
            raise ValueError(f"no self-check for kernel {name!r}: the kernels are {', '.join(KERNELS)}")
        shape = tuple(DEFAULT_SHAPES[name] if shape is None else shape)
        key = (name, device_key(device), dtype, shape)
        with self._lock:  # the server's worker and a caller may ask at once: one probe, one warning
            found = self._results.get(key)
            if found is None:
                found = run_probe(name, torch.device(key[1]), dtype, shape)
                self._results[key] = found
                if not found.ok:
                    LOGGER.warning(
                        "Triton kernel %s failed its self-check on %s %s (shape %s); the torch path runs instead "
                        "for the rest of this process (FRAMEPACK_KERNELS=0 skips the kernels altogether). Reason: %s",
                        name, key[1], str(dtype).replace("torch.", ""), shape, found.reason,
                    )
            return found

    def results(self) -> list[KernelCheck]:
        with self._lock:
            return list(self._results.values())

    def clear(self) -> None:
        """Forget every result (tests; a process never needs it)."""
        with self._lock:
            self._results.clear()


CHECKS = SelfChecks()


def check_kernel(
    name: str, device: torch.device, dtype: torch.dtype, shape: Sequence[int] | None = None
) -> KernelCheck:
    """The self-check of kernel ``name`` (one of :data:`KERNELS`) for ``dtype`` on ``device`` and the shape
    class ``shape`` (default :data:`DEFAULT_SHAPES`): run on first use, then remembered for the process."""
    return CHECKS.check(name, device, dtype, shape)


def check_all(
    device: torch.device, dtype: torch.dtype, shapes: Mapping[str, Sequence[int]] | None = None
) -> list[KernelCheck]:
    """Every kernel's self-check, in :data:`KERNELS` order (``shapes``: shape class per kernel name)."""
    shapes = shapes or {}
    return [check_kernel(name, device, dtype, shapes.get(name)) for name in KERNELS]


__all__ = [
    "KernelCheck", "check_kernel", "check_all", "KERNELS", "DEFAULT_SHAPES", "CHECKS",
    "tolerance", "max_error", "reference_scale", "FP32_ATOL", "LOWP_ATOL", "device_key",
]
