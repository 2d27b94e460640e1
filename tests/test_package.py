"""Package hygiene: import layout, no CUDA at import time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    # cwd=/ so the repository root is not on sys.path: we test the installed layout.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd="/")


def test_no_top_level_kernels_or_stream_package():
    """transformers imports a package named `kernels` (Hugging Face's, required from transformers 5.25); ours must
    not answer to that name. Where Hugging Face's is installed, that one is what the name finds."""
    result = run_python(
        """
        import importlib.util, os
        import framepack_rt, framepack_rt.kernels, framepack_rt.stream
        ours = os.path.dirname(os.path.dirname(os.path.abspath(framepack_rt.kernels.__file__)))
        for name in ("kernels", "stream"):
            spec = importlib.util.find_spec(name)
            assert spec is None or not os.path.abspath(spec.origin).startswith(ours + os.sep), spec
        import transformers
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_kernels_folder_hands_its_top_level_name_to_the_installed_package(tmp_path):
    """From the repository root (`python -m ...` there) the folder kernels/ is found as top-level `kernels`: it
    hands the name to an installed package of that name, and stays itself where there is none (transformers up
    to 5.24 imports it then, as a package without a version)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = run_python("import importlib.util; print(importlib.util.find_spec('kernels') is not None)")
    assert installed.stdout.strip() in ("True", "False"), installed.stderr
    found = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], capture_output=True,
                           text=True, cwd=root, env={**os.environ, "PYTHONPATH": ""})
    assert found.returncode == 0, found.stderr
    ours = found.stdout.strip().startswith(os.path.join(root, "kernels"))
    assert ours != (installed.stdout.strip() == "True"), found.stdout  # Hugging Face's if installed, else ours
    probe = subprocess.run([sys.executable, "-c", "from transformers import CLIPTextModel"], capture_output=True,
                           text=True, cwd=root, env={**os.environ, "PYTHONPATH": ""})
    assert probe.returncode == 0, probe.stderr  # transformers' probe for kernels survives either way
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'the installed kernels'\n")
    code = "import kernels, sys; print(kernels.MARK, sys.modules['kernels'] is kernels)"
    handed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert handed.returncode == 0 and handed.stdout.strip() == "the installed kernels True", handed.stderr


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
