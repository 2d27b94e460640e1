"""Package hygiene: import layout, no CUDA at import time."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    # cwd=/ so the repository root is not on sys.path: we test the installed layout.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd="/")


def test_no_top_level_kernels_or_stream_package():
    """transformers probes for a package named `kernels`; ours must not answer to that name."""
    result = run_python(
        """
        import importlib.util
        import framepack_rt.kernels, framepack_rt.stream
        assert importlib.util.find_spec("kernels") is None, importlib.util.find_spec("kernels")
        assert importlib.util.find_spec("stream") is None, importlib.util.find_spec("stream")
        import transformers.utils.import_utils as iu
        assert not iu.is_kernels_available() if hasattr(iu, "is_kernels_available") else True
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_nothing_touches_cuda_at_import():
    result = run_python(
        """
        import pkgutil, importlib, torch
        def boom(*a, **k):
            raise AssertionError("torch.cuda called at import time")
        for name in ("is_available", "device_count", "current_device", "get_device_properties",
                     "_lazy_init", "synchronize", "get_device_capability"):
            setattr(torch.cuda, name, boom)
        import framepack_rt
        count = 0
        for pkg in ("framepack_rt", "framepack_rt.kernels", "framepack_rt.stream"):  # see setup.py's mapping
            for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
                if not info.name.endswith("__main__"):
                    importlib.import_module(info.name)
                    count += 1
        assert count > 60, count  # every layer's modules, kernels and stream included
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_the_public_api_is_at_the_top_and_imported_lazily():
    result = run_python(
        """
        import sys
        import framepack_rt
        assert "torch" not in sys.modules, "import framepack_rt must stay cheap"
        from framepack_rt import FramePackConfig, FramePackPipeline, FramePackTransformer
        from framepack_rt.model.transformer import FramePackTransformer as T
        from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline as P
        assert FramePackTransformer is T and FramePackPipeline is P and FramePackConfig.preset("tiny")
        assert {"FramePackConfig", "FramePackPipeline", "FramePackTransformer"} <= set(dir(framepack_rt))
        try:
            framepack_rt.NoSuchThing
        except AttributeError as exc:
            assert "NoSuchThing" in str(exc)
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
