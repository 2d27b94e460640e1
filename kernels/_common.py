"""What every kernel launcher shares: Triton version guards, interpreter workarounds, the GPU's shared memory.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, read by ``triton.jit`` when a kernel is *defined*) is how the
kernels are tested on machines without a GPU. Two of its bf16 defects shape the launchers, never the math:
  * bf16 arithmetic (``tl.dot`` included) on bf16 values gives garbage: kernels upcast right after ``tl.load``,
    and the ones built on ``tl.dot`` take a ``DOT_FP32`` switch so that under the interpreter the dot operands
    stay fp32 (on the GPU they stay in the storage dtype and run on tensor cores);
  * fp32 -> bf16 conversion truncates (and its "rtne" mode drops the carry), so under the interpreter a
    bf16 output is written to an fp32 buffer and rounded by torch (:func:`output_buffer` / :func:`finish`).

Version guards: setup.py allows Triton 3.0. ``triton.knobs`` (where 3.4+ keeps ``TRITON_INTERPRET``) is read
when it exists, the environment variable otherwise, as 3.0-3.3's ``triton.jit`` does. The kernels themselves
use only what 3.0 has (``tl.dot(input_precision=)``, ``tl.split`` / ``tl.join``); kernels/aot.py checks for
the newer compiler entry points it needs and says which Triton it wants.
"""

from __future__ import annotations

import os
import re
from types import ModuleType
from typing import Any

import torch
import triton

# Shared memory one block may use (the opt-in maximum), bytes, per compute capability: what
# cudaDevAttrMaxSharedMemoryPerBlockOptin reports (the SM's shared memory less 1 KiB reserved per block).
SHARED_BYTES_BY_CAPABILITY: dict[tuple[int, int], int] = {
    (7, 0): 96 * 1024,  # V100
    (7, 5): 64 * 1024,  # Turing
    (8, 0): 163 * 1024,  # A100: 164 KiB per SM
    (8, 6): 99 * 1024,  # RTX 30xx, A10, A40: 100 KiB per SM
    (8, 7): 163 * 1024,  # Orin
    (8, 9): 99 * 1024,  # RTX 40xx, L4, L40S: 100 KiB per SM
    (9, 0): 227 * 1024,  # H100 / H200: 228 KiB per SM
    (10, 0): 227 * 1024,  # B200
    (12, 0): 99 * 1024,  # RTX 50xx
}
SM90_MAX_SHARED_BYTES = SHARED_BYTES_BY_CAPABILITY[(9, 0)]  # 232448: what kernels/aot.py compiles for
UNKNOWN_GPU_SHARED_BYTES = 99 * 1024  # a capability not in the table: the smallest limit of current GPUs


def triton_version(module: ModuleType = triton) -> tuple[int, int]:
    """(major, minor) of the installed Triton ("3.4.0+git..." -> (3, 4))."""
    match = re.match(r"(\d+)\.(\d+)", getattr(module, "__version__", "0.0"))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def interpret_enabled(module: ModuleType = triton) -> bool:
    """Whether ``triton.jit`` builds interpreted kernels: ``triton.knobs.runtime.interpret`` on Triton 3.4+,
    ``TRITON_INTERPRET == "1"`` (the test 3.0-3.3's ``triton.jit`` makes) before."""
    runtime = getattr(getattr(module, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET: bool = interpret_enabled()


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a dot-based kernel must keep its operands in fp32 (bf16 under the interpreter)."""
    return INTERPRET and dtype == torch.bfloat16


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor a kernel stores into: ``dtype``, except bf16 under the interpreter (fp32, see module doc)."""
    if INTERPRET and dtype == torch.bfloat16:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def finish(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The result in ``dtype`` (a no-op except for the interpreter's fp32 stand-in buffers)."""
    return buffer if buffer.dtype == dtype else buffer.to(dtype)


def shared_bytes_limit(props: Any) -> int:
    """Shared memory per block for a device described by ``props`` (torch's device properties, or anything
    with ``major`` / ``minor``): its own ``shared_memory_per_block_optin`` where torch reports it, else the
    table per compute capability, else the smallest limit of current GPUs."""
    reported = getattr(props, "shared_memory_per_block_optin", None)
    if isinstance(reported, int) and reported > 0:
        return reported
    capability = (int(props.major), int(props.minor))
    return SHARED_BYTES_BY_CAPABILITY.get(capability, UNKNOWN_GPU_SHARED_BYTES)


def max_shared_bytes(device: torch.device | None = None) -> int:
    """Shared memory a block may use on ``device`` (default: the current CUDA device). Without a CUDA device
    (the interpreter, ahead-of-time compiles) it is sm_90's, the architecture kernels/aot.py targets."""
    if device is not None and device.type != "cuda":
        return SM90_MAX_SHARED_BYTES
    if not torch.cuda.is_available():
        return SM90_MAX_SHARED_BYTES
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return shared_bytes_limit(torch.cuda.get_device_properties(index))
