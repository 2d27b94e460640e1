"""Triton kernels, installed as ``framepack_rt.kernels`` (see setup.py for why not top-level ``kernels``)."""

import importlib.machinery
import importlib.util
import os
import sys


def _installed_namesake() -> importlib.machinery.ModuleSpec | None:
    """Where this folder was imported as a top-level ``kernels`` (Python started in the repository root, so
    ``python -m framepack_rt...`` there): the spec of an installed package of that name (Hugging Face's kernels,
    which transformers imports from 5.25), found on sys.path without the repository root; else None."""
    if __name__ != "kernels":
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != root])
    return spec if spec is not None and spec.loader is not None else None


_namesake = _installed_namesake()
if _namesake is not None:  # that name is the installed package's: hand it over
    _module = importlib.util.module_from_spec(_namesake)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds under the name
    _namesake.loader.exec_module(_module)
else:
    # Our package (also under the top-level name when nothing else has it: a package without a version, which
    # transformers up to 5.24 probes and reads as Hugging Face's kernels not installed).
    # The switch only: importing the package never imports triton (the kernel modules are loaded on first use).
    from framepack_rt.kernels.dispatch import kernels_forced, use_kernels

    __all__ = ["kernels_forced", "use_kernels"]
