"""Fixtures of the pipeline tests: the built-in tiny pipeline (one per module: its first calls are the slow
ones) and a start picture (a red square on dark grey)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pipe():
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    return FramePackPipeline.from_pretrained("tiny")


@pytest.fixture(scope="module")
def start_picture() -> np.ndarray:
    """For module-scoped fixtures; tests take ``image``, their own copy."""
    img = np.full((64, 64, 3), 30, np.uint8)
    img[24:40, 8:24] = (220, 40, 40)
    return img


@pytest.fixture
def image(start_picture: np.ndarray) -> np.ndarray:
    return start_picture.copy()
