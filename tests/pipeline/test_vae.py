"""VAE wrapper, streaming decode (both directions) and latent preview, on the tiny HunyuanVideo VAE."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.pipeline.tiny_models import build_tiny_models
from framepack_rt.pipeline.vae import (
    LATENT_RGB_BIAS,
    LATENT_RGB_FACTORS,
    SCALING_FACTOR,
    FrameChunk,
    StreamingDecoder,
    VideoVAE,
    assemble,
    frame_count,
    latent_preview,
)

W = 9  # latent window: one section


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return VideoVAE(build_tiny_models(seed=0).vae)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def smooth_latents(frames: int, seed: int = 1) -> torch.Tensor:
    """(1, 16, frames, 4, 4) varying slowly in time: 5 random key latents, linearly interpolated."""
    keys = randn(1, 16, 5, 4, 4, seed=seed)
    return torch.nn.functional.interpolate(keys, size=(frames, 4, 4), mode="trilinear", align_corners=True)


def stream(vae: VideoVAE, z: torch.Tensor, sizes: list[int], direction: str = "forward"):
    """Push z (1, 16, T, h, w) split into sections of ``sizes`` (time order); returns decoder and chunks."""
    total = z.shape[2]
    dec = StreamingDecoder(vae, direction=direction, total_latents=total if direction == "backward" else None)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    order = range(len(sizes)) if direction == "forward" else reversed(range(len(sizes)))
    chunks = [dec.push(z[:, :, bounds[i] : bounds[i + 1]]) for i in order]
    return dec, chunks + [dec.finish()]


def test_encode_applies_scaling_factor(vae):
    assert vae.scaling_factor == SCALING_FACTOR == 0.476986
    images = randn(2, 3, 32, 48).clamp(-1, 1)
    latents = vae.encode(images)
    assert latents.shape == (2, 16, 1, 4, 6)
    with torch.no_grad():
        mean = vae.model.encode(images[:, :, None]).latent_dist.mode()
    torch.testing.assert_close(latents, mean * 0.476986, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(randn(1, 3, 30, 48))


@pytest.mark.parametrize("t", [1, 2, 5, 9])
def test_decode_frame_counts_and_uint8(vae, t):
    z = randn(1, 16, t, 2, 3, seed=t)
    frames = vae.decode_frames(z[0])
    assert frame_count(t) == 4 * t - 3
    assert frames.shape == (4 * t - 3, 16, 24, 3) and frames.dtype == torch.uint8
    with torch.no_grad():
        pixels = vae.model.decode(z / 0.476986).sample  # the scaling factor is undone before decoding
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 3, 0)
    assert torch.equal(frames, expected)


@pytest.mark.parametrize(
    "sizes",
    [[W, W, W, W], [1, W, W, W], [1 + W, W, W], [5], [4], [3, 4], [2, 5, 1, 7, 8]],
    ids=["f1-4x9", "start+3x9", "10+2x9", "5", "4", "3+4", "irregular"],
)
def test_forward_stream_equals_one_shot_decode(vae, sizes):
    z = randn(1, 16, sum(sizes), 2, 3, seed=len(sizes))
    dec, chunks = stream(vae, z, sizes)
    assert torch.equal(assemble(chunks), vae.decode_frames(z)[0])
    # Chunks arrive in order; after n latents, 12 * ((n - 2) // 3) + 1 frames are out (none before n = 5).
    n = 0
    for size, chunk in zip(sizes, chunks):
        n += size
        assert chunk.stop == (12 * ((n - 2) // 3) + 1 if n >= 5 else 0)
    assert chunks[-1].stop == frame_count(n)


def test_forward_frames_per_f1_section(vae):
    dec, chunks = stream(vae, randn(1, 16, 4 * W, 2, 2), [W] * 4)
    # 9 latents = 33 frames, of which the last 8 (latents 7, 8: their tile is incomplete) wait for section 2;
    # every later section releases 4w = 36 frames; finish releases the 8 held back.
    assert [len(c.frames) for c in chunks] == [25, 36, 36, 36, 8]
    assert sum(len(c.frames) for c in chunks) == frame_count(4 * W) == 141


@pytest.mark.parametrize("sizes", [[1 + W, W, W], [1 + W, W, W, W, W], [4, 3], [2, 5, 1, 7, 8]])
def test_backward_stream_equals_one_shot_decode(vae, sizes):
    z = randn(1, 16, sum(sizes), 2, 3, seed=7)
    dec, chunks = stream(vae, z, sizes, direction="backward")
    assert torch.equal(assemble(chunks), vae.decode_frames(z)[0])
    starts = [c.start for c in chunks[:-1] if len(c.frames)]
    assert starts == sorted(starts, reverse=True) and starts[-1] == 0  # end-first; the first frame comes last


def test_backward_needs_the_whole_clip(vae):
    with pytest.raises(ValueError, match="total_latents"):
        StreamingDecoder(vae, direction="backward")
    dec = StreamingDecoder(vae, direction="backward", total_latents=19)
    dec.push(randn(16, W, 2, 2))
    with pytest.raises(ValueError, match="incomplete"):
        dec.finish()
    with pytest.raises(ValueError, match="more latents"):
        StreamingDecoder(vae, direction="backward", total_latents=5).push(randn(16, 6, 2, 2))


def test_seams_are_no_larger_than_changes_inside_sections(vae):
    sections = 4
    z = smooth_latents(sections * W)
    _, chunks = stream(vae, z, [W] * sections)
    joins = [4 * (W * j - 1) for j in range(1, sections)]  # diff index: last frame of a section -> next first

    def change(frames: torch.Tensor) -> torch.Tensor:
        f = frames.float()
        return (f[1:] - f[:-1]).abs().mean(dim=(1, 2, 3))

    d = change(assemble(chunks))
    inside = torch.stack([d[i] for i in range(len(d)) if i not in joins])
    assert max(d[i] for i in joins) <= inside.max()
    # The check has teeth: decoding each section alone and concatenating jumps at every join.
    naive = torch.cat([vae.decode_frames(z[:, :, i * W : (i + 1) * W])[0] for i in range(sections)])
    dn = change(naive)
    naive_joins = [33 * j - 1 for j in range(1, sections)]
    naive_inside = torch.stack([dn[i] for i in range(len(dn)) if i not in naive_joins])
    assert min(dn[i] for i in naive_joins) > naive_inside.max()


def test_decode_cost_per_section_is_constant(vae):
    sections = 8
    dec, chunks = stream(vae, randn(1, 16, sections * W, 2, 2), [W] * sections)
    per_section = dec.latents_decoded[:sections]
    assert per_section[0] == 10  # warm-up: 2 tiles of 5
    assert set(per_section[1:]) == {15}  # 3 tiles of 5 latents per 9-latent section, however long the clip
    assert dec._lat.shape[2] < dec.tile  # latents kept are bounded, not the history
    assert [len(c.frames) for c in chunks[1:sections]] == [4 * W] * (sections - 1)


def test_assemble_rejects_gaps():
    empty = torch.zeros(0, 8, 8, 3, dtype=torch.uint8)
    frames = torch.zeros(3, 8, 8, 3, dtype=torch.uint8)
    assert assemble([FrameChunk(3, frames), FrameChunk(0, frames), FrameChunk(6, empty)]).shape[0] == 6
    with pytest.raises(ValueError, match="gap"):
        assemble([FrameChunk(0, frames), FrameChunk(4, frames)])


def test_latent_preview_map():
    assert torch.tensor(LATENT_RGB_FACTORS).shape == (16, 3) and len(LATENT_RGB_BIAS) == 3
    z = torch.zeros(1, 16, 2, 3, 5)
    z[:, 10, 1] = 2.0  # channel 10 pushes all of R, G, B up: 2 * (0.1166, 0.1627, 0.0962) + bias
    preview = latent_preview(z)
    assert preview.shape == (1, 2, 3, 5, 3) and preview.dtype == torch.uint8
    assert preview[0, 0, 0, 0].tolist() == [round(0.0259 * 255), 0, 0]  # bias only, clamped at 0
    expected = [round(min(max(2 * f + b, 0), 1) * 255) for f, b in zip((0.1166, 0.1627, 0.0962), LATENT_RGB_BIAS)]
    assert preview[0, 1, 2, 4].tolist() == expected


def test_stream_equals_one_shot_decode_with_spatial_tiling():
    # Low-VRAM mode: spatial tiles inside each temporal tile, as diffusers does them (small tiles here).
    vae = VideoVAE(build_tiny_models(seed=0).vae)
    vae.model.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                            tile_sample_stride_width=16)
    z = randn(1, 16, 1 + 2 * W, 4, 4, seed=3)
    for direction in ("forward", "backward"):
        _, chunks = stream(vae, z, [1 + W, W], direction)
        assert torch.equal(assemble(chunks), vae.decode_frames(z)[0])
