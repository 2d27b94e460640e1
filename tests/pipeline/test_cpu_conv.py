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
def test_tap_conv_equals_conv3d(kernel, padding, shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], 6, kernel, padding=padding)
    x = torch.randn(*shape)
    expected = conv(x)
    assert use_tap_convs(conv) == 1 and isinstance(conv, TapConv3d)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_only_stride_one_convs_switch():
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 3), torch.nn.Conv3d(2, 2, 3, stride=2), torch.nn.Conv2d(2, 2, 3))
    assert use_tap_convs(model) == 1
    assert type(model[1]) is torch.nn.Conv3d


def test_tiny_vae_decode_unchanged():
    from framepack_rt.pipeline.tiny_models import build_tiny_models

    vae = build_tiny_models().vae
    z = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(z).sample
        assert use_tap_convs(vae.decoder) > 5
        torch.testing.assert_close(vae.decode(z).sample, expected, atol=1e-4, rtol=1e-4)
