"""Kernel tests run Triton's CPU interpreter: TRITON_INTERPRET must be set before triton is first imported,
because ``triton.jit`` reads it when a kernel is defined. Hence this line before any other import.
(test_compile_sm90.py compiles for real, in subprocesses that drop the variable.)"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if "framepack_rt.kernels._common" in sys.modules and not sys.modules["framepack_rt.kernels._common"].INTERPRET:
    raise pytest.UsageError(
        "the Triton kernels were imported before tests/kernels/conftest.py could turn the interpreter on: "
        "run tests/kernels in its own pytest process, or set TRITON_INTERPRET=1"
    )

from framepack_rt.kernels.selfcheck import max_error, tolerance  # noqa: E402


@pytest.fixture
def check() -> Callable[..., None]:
    """check(got, ref32, lowp=None, scale=1.0): the project's tolerance rule, the one the kernels' self-check
    applies (framepack_rt.kernels.selfcheck.tolerance).

    fp32 inputs (lowp None): |got - ref32| <= FP32_ATOL * scale. Low precision: the kernel's max error
    against the fp32 reference is at most twice torch's own error in that dtype (``lowp``: the torch
    reference computed in bf16/fp16) plus LOWP_ATOL * scale."""

    def run(got: torch.Tensor, ref32: torch.Tensor, lowp: torch.Tensor | None = None, scale: float = 1.0) -> None:
        assert got.shape == ref32.shape, (tuple(got.shape), tuple(ref32.shape))
        err = max_error(got, ref32)
        if lowp is None:
            bound = tolerance(None, scale)
            assert err <= bound, f"fp32 error {err:.3g} > {bound:.3g}"
            return
        torch_err = max_error(lowp, ref32)
        bound = tolerance(torch_err, scale)
        assert err <= bound, f"kernel error {err:.3g} > 2 x torch {lowp.dtype} error {torch_err:.3g} + atol"

    return run
