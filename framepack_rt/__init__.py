"""framepack-rt: FramePack next-section video generation, served live.

The transformer is imported lazily so that ``import framepack_rt`` stays cheap (and never touches CUDA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "FramePackConfig": "framepack_rt.config",
    "FramePackTransformer": "framepack_rt.model",
}

if TYPE_CHECKING:  # pragma: no cover
    from framepack_rt.config import FramePackConfig
    from framepack_rt.model import FramePackTransformer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'framepack_rt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
