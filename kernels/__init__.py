"""Triton kernels, installed as ``framepack_rt.kernels`` (see setup.py for why not top-level ``kernels``)."""

if __name__ == "kernels":
    # Python started in the repository root (``python -m framepack_rt...`` there) finds this folder as a top-level
    # ``kernels``: the name of Hugging Face's kernels package, which transformers imports. That name is not ours,
    # so hand it to the installed package when there is one, and otherwise answer as a package that is absent.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ folder is framepack_rt.kernels, "
                                  "not Hugging Face's kernels package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds under the name
    _spec.loader.exec_module(_module)
else:
    # The switch only: importing the package never imports triton (the kernel modules are loaded on first use).
    from framepack_rt.kernels.dispatch import kernels_forced, use_kernels

    __all__ = ["kernels_forced", "use_kernels"]
