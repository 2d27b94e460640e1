"""What every kernel launcher shares: interpreter workarounds and Hopper resource limits.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, read by ``triton.jit`` when a kernel is *defined*) is how the
kernels are tested on machines without a GPU. Two of its bf16 defects shape the launchers, never the math:
  * bf16 arithmetic (``tl.dot`` included) on bf16 values gives garbage: kernels upcast right after ``tl.load``,
    and the ones built on ``tl.dot`` take a ``DOT_FP32`` switch so that under the interpreter the dot operands
    stay fp32 (on the GPU they stay in the storage dtype and run on tensor cores);
  * fp32 -> bf16 conversion truncates (and its "rtne" mode drops the carry), so under the interpreter a
    bf16 output is written to an fp32 buffer and rounded by torch (:func:`output_buffer` / :func:`finish`).
"""

from __future__ import annotations

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Hopper (sm_90) shared memory per block, opt-in maximum: 227 KiB.
SM90_MAX_SHARED_BYTES = 232448


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


def max_shared_bytes(device: torch.device | None = None) -> int:
    """Shared memory a block may use on the current GPU (sm_90's limit when no GPU can be asked)."""
    try:
        from triton.runtime import driver

        index = torch.cuda.current_device() if device is None else device.index or 0
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # no driver (CPU, interpreter, ahead-of-time compile): assume Hopper
        return SM90_MAX_SHARED_BYTES
