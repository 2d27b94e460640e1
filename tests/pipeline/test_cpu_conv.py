"""The CPU tap-convolution path equals Conv3d."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.pipeline.cpu_conv import TapConv3d, use_tap_convs


@pytest.mark.parametrize(
    "kernel, padding, shape",
    [((3, 3, 3), (0, 0, 0), (2, 8, 5, 9, 7)), ((3, 3, 3), (1, 1, 1), (1, 4, 3, 6, 6)),
     ((1, 1, 1), (0, 0, 0), (1, 16, 4, 5, 5)), ((3, 1, 1), (0, 0, 0), (1, 3, 3, 4, 4))],
    ids=["3x3x3", "3x3x3-padded", "1x1x1", "temporal-only"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_tap_conv_equals_conv3d(kernel, padding, shape, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], 6, kernel, padding=padding)
    x = torch.randn(*shape)
    expected = conv(x)
    assert use_tap_convs(conv, channels_last=channels_last) == 1 and isinstance(conv, TapConv3d)
    out = conv(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # channels-last hands the next layer NHWC memory (no reorder there); the plain path keeps T and C swapped
    assert out.is_contiguous(memory_format=torch.channels_last_3d) == channels_last


def test_channels_last_is_opt_in_and_can_be_switched_back():
    conv = torch.nn.Conv3d(2, 2, 3)
    use_tap_convs(conv)
    assert not conv.channels_last  # off by default: NHWC results depend on the thread count
    assert use_tap_convs(conv, channels_last=True) == 1 and conv.channels_last  # an already switched conv
    assert use_tap_convs(conv) == 1 and not conv.channels_last


def test_only_stride_one_convs_switch():
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 3), torch.nn.Conv3d(2, 2, 3, stride=2), torch.nn.Conv2d(2, 2, 3))
    assert use_tap_convs(model) == 1
    assert type(model[1]) is torch.nn.Conv3d


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_tiny_vae_decode_unchanged(channels_last):
    from framepack_rt.pipeline.tiny_models import build_tiny_models

    vae = build_tiny_models().vae
    z = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(z).sample
        assert use_tap_convs(vae.decoder, channels_last=channels_last) > 5
        torch.testing.assert_close(vae.decode(z).sample, expected, atol=1e-4, rtol=1e-4)


def test_the_pipeline_vae_encodes_with_taps_too_and_the_same_latents():
    """VideoVAE switches the encoder as well as the decoder (the on-policy targets and start latents are
    encoded on the CPU: 2.8x faster on the demo VAE at 96 px), with the latents of the plain Conv3d path."""
    import copy

    from framepack_rt.pipeline.cpu_conv import TapConv3d
    from framepack_rt.pipeline.tiny_models import build_tiny_models
    from framepack_rt.pipeline.vae import VideoVAE

    plain = build_tiny_models().vae.eval()
    video = VideoVAE(copy.deepcopy(plain))
    assert any(isinstance(m, TapConv3d) for m in video.live.encoder.modules())
    pixels = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = plain.encode(pixels).latent_dist.mode()
        torch.testing.assert_close(video.live.encode(pixels).latent_dist.mode(), expected, atol=1e-5, rtol=1e-5)


def test_demo_vae_frames_same_in_both_layouts():
    """channels-last is fp32 rounding away from the plain path: pixels equal to within one uint8 level (the
    demo VAE; a 9-latent clip measured 27 of 405,504 values off by one; here one 5-latent tile)."""
    from framepack_rt.pipeline.builtin import DEMO_WEIGHTS_DIR
    from framepack_rt.pipeline.vae import VideoVAE

    vae = VideoVAE.from_pretrained(DEMO_WEIGHTS_DIR / "vae")
    z = torch.randn(16, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    frames = {}
    for channels_last in (False, True):
        use_tap_convs(vae.live.decoder, channels_last=channels_last)
        frames[channels_last] = vae.decode_frames(z).int()
    diff = (frames[True] - frames[False]).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
