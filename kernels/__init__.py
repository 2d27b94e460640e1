"""Triton kernels, installed as ``framepack_rt.kernels`` (see setup.py for why not top-level ``kernels``)."""

# The switch only: importing the package never imports triton (the kernel modules are loaded on first use).
from framepack_rt.kernels.dispatch import kernels_forced, use_kernels

__all__ = ["kernels_forced", "use_kernels"]
