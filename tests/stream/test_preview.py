"""The page's latent preview: what the server sends for a demo start (issue 19: not an 8x8 near-black square)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from framepack_rt.stream.buffer import FrameBuffer
from framepack_rt.stream.generation import Generation
from framepack_rt.stream.images import upscale_preview


def test_upscale_preview_is_smooth_and_sized():
    small = np.zeros((8, 8, 3), np.uint8)
    small[:, 4:] = 200  # a hard edge: bicubic scaling leaves intermediate values, blocks would not
    big = upscale_preview(small)
    assert big.shape == (128, 128, 3) and big.dtype == np.uint8
    assert len(np.unique(big[64, :, 0])) > 4
    assert upscale_preview(np.zeros((10, 6, 3), np.uint8)).shape == (220, 132, 3)  # the shorter side to >= 128
    large = np.zeros((160, 90, 3), np.uint8)
    assert upscale_preview(large, min_side=64) is large


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def demo_section_and_previews():
    """The demo model's first section from its example start, with the preview messages a session posts."""
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    pipe = FramePackPipeline.from_pretrained("demo", device="cpu")
    messages: list[dict] = []
    generation = Generation(FrameBuffer(64), messages.append)
    generation.PREVIEW_INTERVAL_S = 0.0  # every step's preview, to look at the last one
    image, prompt = pipe.example
    stream = pipe.stream(image, prompt, on_step=generation.on_step, decode_overlap=False)
    section = next(stream)
    stream.stop()
    return image, section, [m for m in messages if m["type"] == "preview"]


def test_demo_start_preview_is_upscaled_and_shows_the_frames(demo_section_and_previews):
    image, section, previews = demo_section_and_previews
    assert previews and previews[-1]["step"] == previews[-1]["steps"]
    last = previews[-1]
    rgb = decode_data_url(last["image"])
    frame = section.frames[-1].astype(np.float32)  # the newest latent's last frame: what the preview shows
    n = frame.shape[0] // 16  # latent side: the fast decoder draws frames at twice the VAE's side (8 px a latent)
    side = n * -(-128 // n)  # scaled up by the integer factor that reaches 128 px (12x12 latents: 11x, 132 px)
    assert rgb.shape == (side, side, 3) and (last["width"], last["height"]) == (side, side)
    # Not near-black: as bright as the video it previews (the release's factors gave a mean near 5 / 255).
    assert rgb.mean() > 0.6 * frame.mean() and rgb.mean() > 20
    # And the same picture, at latent resolution: n x n blocks of the frame against the preview scaled down.
    k = frame.shape[0] // n
    blocks = frame.reshape(n, k, n, k, 3).mean(axis=(1, 3))
    preview = np.asarray(Image.fromarray(rgb).resize((n, n), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(preview - blocks).mean() < 25, np.abs(preview - blocks).mean()


def test_page_scales_video_and_preview_smoothly():
    """No nearest-neighbour blocks: neither the style sheet nor the script asks for pixelated scaling."""
    from pathlib import Path

    static = Path(__file__).resolve().parents[2] / "stream" / "static"
    for name in ("style.css", "app.js", "index.html"):
        assert "pixelated" not in (static / name).read_text(), name
