"""Fixtures of the command tests: a start image on disk (a red square on dark grey, the demo world's colours) and
the frames of a written MP4."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest


@pytest.fixture(scope="session")
def start_image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("start") / "start.png"
    img = np.full((64, 64, 3), 30, np.uint8)
    img[24:40, 8:24] = (220, 40, 40)
    Image.fromarray(img).save(path)
    return path


def _mp4_frames(path: str | Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 30
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])


@pytest.fixture(scope="session")
def mp4_frames() -> Callable[[str | Path], np.ndarray]:
    """mp4_frames(path) -> (frames, H, W, 3) uint8: every frame of an H.264 MP4 at 30 fps (both checked)."""
    return _mp4_frames
