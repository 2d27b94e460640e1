"""The latent preview's colours: a linear latent -> RGB map fitted on the VAE in use (vae.LatentRGB)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack_rt.pipeline.vae import LatentRGB, PreviewFit, VideoVAE, latent_preview, preview_fit_images


class LinearVAE:
    """encode() = a known linear map of each 8x8 block's mean colour: what the fit must recover."""

    def __init__(self, mix: torch.Tensor, offset: torch.Tensor) -> None:
        self.mix, self.offset = mix, offset  # (16, 3), (16,)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        rgb = torch.nn.functional.avg_pool2d((images + 1) / 2, 8)  # (N, 3, h, w) in [0, 1]
        return (torch.einsum("nrhw,cr->nchw", rgb, self.mix) + self.offset[:, None, None])[:, :, None]


@pytest.mark.parametrize("kernel", [1, 3])
def test_fit_recovers_the_colours_of_a_linear_encoder(kernel):
    g = torch.Generator().manual_seed(0)
    vae = LinearVAE(torch.randn(16, 3, generator=g), torch.randn(16, generator=g))
    images = preview_fit_images(size=32, count=16)
    rgb = PreviewFit(kernel=kernel, ridge=1e-9).add(vae.encode(images)[:, :, 0], images).solve()
    assert rgb.weight.shape == (3, 16, kernel, kernel) and rgb.bias.shape == (3,)
    test = preview_fit_images(size=32, count=4, seed=1)
    expected = (torch.nn.functional.avg_pool2d((test + 1) / 2, 8).permute(0, 2, 3, 1) * 255).round()
    got = latent_preview(vae.encode(test), rgb)[:, 0].float()
    assert (got - expected).abs().max() <= 1


def test_a_start_image_joins_the_fit_without_changing_it():
    g = torch.Generator().manual_seed(0)
    vae = LinearVAE(torch.randn(16, 3, generator=g), torch.randn(16, generator=g))
    images = preview_fit_images(size=32, count=8)
    fit = PreviewFit().add(vae.encode(images)[:, :, 0], images)
    before = fit.solve()
    start = preview_fit_images(size=32, count=1, seed=3)
    with_start = fit.solve(vae.encode(start)[:, :, 0], start)
    assert not torch.equal(with_start.weight, before.weight)  # the start counted ...
    assert torch.equal(fit.solve().weight, before.weight)  # ... for that stream only
    with pytest.raises(ValueError, match="nothing to fit"):
        PreviewFit().solve()


def test_fit_images_are_fixed_and_varied():
    a, b = preview_fit_images(), preview_fit_images()
    assert torch.equal(a, b) and a.shape == (32, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert a.mean(dim=(2, 3)).std(dim=0).min() > 0.2  # backgrounds of many colours, every channel


@pytest.fixture(scope="module")
def demo_vae() -> VideoVAE:
    from framepack_rt.pipeline.builtin import DEMO_WEIGHTS_DIR

    return VideoVAE.from_pretrained(DEMO_WEIGHTS_DIR / "vae")


def world_scene(moved: bool) -> np.ndarray:
    """A red ball and a blue square on the demo world's dark green: the start, or with both objects moved."""
    from framepack_rt.demo.world import render, WorldObject

    centers = np.array([[[20.0, 24.0], [44.0, 40.0]]], np.float32) + (np.float32(12) if moved else 0)
    objects = [WorldObject(colour="red", shape="ball"), WorldObject(colour="blue", shape="square")]
    return render(objects, (30, 60, 50), centers, np.array([[9.0, 7.0]], np.float32), 64)[0]


def test_demo_preview_shows_a_scene_in_its_colours(demo_vae):
    """With the release's factors the demo's latents come out almost black (issue 19); the map fitted on the
    demo VAE with the stream's start image shows a later frame of that scene (objects moved) at latent
    resolution within a mean error of 25/255 (measured 14: see PreviewFit), and the ball red."""
    start, later = world_scene(moved=False), world_scene(moved=True)

    def encode(image: np.ndarray) -> torch.Tensor:
        return demo_vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)

    rgb = demo_vae.latent_rgb(encode(start), start)
    truth = torch.from_numpy(later).float().reshape(8, 8, 8, 8, 3).mean(dim=(1, 3))
    fitted = latent_preview(encode(later), rgb)[0, 0].float()
    release = latent_preview(encode(later))[0, 0].float()
    error = (fitted - truth).abs().mean()
    assert fitted.shape == (8, 8, 3) and error < 25, error
    assert release.mean() < 25 and (release - truth).abs().mean() > 2 * error
    red = (truth[..., 0] > 150) & (truth[..., 1] < 80)  # blocks the ball fills
    assert red.any() and (fitted[red][:, 0] - fitted[red][:, 1]).min() > 60  # measured 100


def test_the_generic_fit_is_made_once_per_vae(demo_vae):
    demo_vae.latent_rgb()
    fit = demo_vae._preview_fit
    demo_vae.latent_rgb()
    assert fit is not None and demo_vae._preview_fit is fit


def test_release_vae_keeps_the_published_factors():
    """The HunyuanVideo release's VAE (its block widths) uses the factors FramePack ships, with no fit."""

    class Config:
        block_out_channels, latent_channels, scaling_factor = [128, 256, 512, 512], 16, 0.476986

    class ReleaseShaped(torch.nn.Module):
        config = Config()

        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = torch.nn.Conv3d(1, 1, 1), torch.nn.Conv3d(1, 1, 1)

        def encode(self, *_):
            raise AssertionError("the release's VAE must not be fitted")

    rgb = VideoVAE(ReleaseShaped()).latent_rgb()
    assert torch.equal(rgb.weight, LatentRGB.hunyuan().weight) and torch.equal(rgb.bias, LatentRGB.hunyuan().bias)
