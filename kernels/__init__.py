"""Triton kernels, installed as ``framepack_rt.kernels`` (see setup.py for why not top-level ``kernels``)."""
