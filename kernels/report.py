"""What the kernels' self-checks and the attention choice find on this machine, at the 13B's shapes:

    python -m framepack_rt.kernels.report [--dtype bfloat16|float16|float32]

prints one line per kernel (passed with its error and tolerance, or FAILED with the reason), then the attention
backend chosen for the joint sequence and for the text refiner, with every candidate's time and TFLOP/s.
Needs a CUDA device (or TRITON_INTERPRET=1 for the kernels on the CPU, slowly; attention is then not timed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import torch

from framepack_rt.kernels import aot, selfcheck


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m framepack_rt.kernels.report``: every kernel's check and the attention choice at the 13B's
    shapes on this machine's GPU (the CPU only under TRITON_INTERPRET=1). Exit status 1 when a kernel fails."""
    from framepack_rt.model.attention import attention_for  # same layer; late: attention imports the kernels

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    opts = parser.parse_args(argv)
    dtype = getattr(torch, opts.dtype)
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif importlib.import_module("framepack_rt.kernels._common").INTERPRET:  # imports triton
        device = torch.device("cpu")
    else:
        print("report: no CUDA device; set TRITON_INTERPRET=1 to check the kernels on the CPU (slow)")
        return 2
    shapes = {"patchify": (16, aot.DIM), "qk_norm_rope": (aot.HEAD_DIM,), "modulate": (aot.DIM,),
              "residual_gate_modulate": (aot.DIM,), "packed_attention": (aot.HEAD_DIM,)}
    checks = selfcheck.check_all(device, dtype, shapes)
    for c in checks:
        verdict = f"ok, max error {c.max_error:.3g} <= {c.tolerance:.3g}" if c.ok else f"FAILED: {c.reason}"
        print(f"{c.name:24s} {c.device} {opts.dtype} shape {c.shape}: {verdict}")
    if device.type == "cuda":
        for length in (aot.SEQ, 512):  # the joint video + context sequence, the text refiner's
            print(attention_for(device, dtype, aot.HEAD_DIM, length).summary())
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
