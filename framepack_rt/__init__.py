"""framepack-rt: FramePack next-section video generation, served live.

The public API, imported lazily so that ``import framepack_rt`` stays cheap (and never touches CUDA)::

    from framepack_rt import FramePackPipeline, FramePackTransformer, FramePackConfig

The package is layered, each layer importing only itself and the layers below it:
``model`` (and ``kernels``) <- ``engine`` <- ``pipeline`` <- ``commands``, ``stream``, ``bench``, ``demo``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "FramePackConfig": "framepack_rt.model.config",
    "FramePackTransformer": "framepack_rt.model.transformer",
    "FramePackPipeline": "framepack_rt.pipeline.framepack_pipeline",
}

if TYPE_CHECKING:  # pragma: no cover
    from framepack_rt.model.config import FramePackConfig
    from framepack_rt.model.transformer import FramePackTransformer
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'framepack_rt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
