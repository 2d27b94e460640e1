"""A small causal decoder for streaming: latents -> frames at a fraction of the VAE decoder's cost.

Real-time video systems decode with a tiny autoencoder distilled for the big one's latent space (TAESD for
images, TAEHV for HunyuanVideo). ``FastVideoDecoder`` is that idea for this package's VAEs: a 2D convolution
stack that turns each latent, read together with the latent before it, into that latent's four frames at once.
It runs per latent (not per frame, and with no temporal tiles), so its full-resolution layers run once for four
frames, and every latent is decoded exactly once: the VAE's tiles (5 latents, stride 3) decode each latent
5/3 times. Frames of latent t are final as soon as latents t - 1 and t are known, so a stream holds nothing back
(but a start latent pushed alone, which waits for the first section).

Latent t (t >= 1) covers frames 4t - 3 .. 4t; latent 0 covers frame 0 only, as HunyuanVideo's causal VAE lays
them out, so a clip of T latents has the VAE's 4T - 3 frames. It reads *scaled* latents (what the transformer
makes) and is trained against one VAE (``python -m framepack_rt.demo.train decoder``); a model folder ships it
as ``fast_decoder/`` beside ``vae/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from framepack_rt.pipeline.vae import FrameChunk, to_uint8


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class FastVideoDecoder(ModelMixin, ConfigMixin):
    """Scaled latents (B, C, T, h, w) -> pixels (B, 3, 4T - 3, 8h, 8w) in about [-1, 1], one latent at a time.

    ``block_out_channels[i]`` is the width at 2^i times the latent resolution; the last entry is the
    full-resolution width (ReLU convolutions, no normalisation: cheap on a CPU). ``trained_latent_size``: the side
    of the square latents it was trained on (None: not recorded). Convolutional as it is, it does not carry over
    to other sizes unchanged: the demo's, trained on 8x8 latents, drew a red ball orange on grey from 12x12 ones.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 16, out_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (64, 32, 16, 16), temporal_compression_ratio: int = 4,
                 motion_flow: bool = False, trained_latent_size: int | None = None) -> None:
        super().__init__()
        widths = list(block_out_channels)
        if len(widths) < 2:
            raise ValueError("block_out_channels needs at least two widths (one per resolution)")
        self.conv_in = nn.Conv2d(2 * latent_channels, widths[0], 3, padding=1)  # the latent and the one before
        stages = []
        for i in range(len(widths) - 1):
            stages += [_Residual(widths[i]), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.ReLU()]
        self.stages = nn.Sequential(*stages)
        self.conv_out = nn.Conv2d(widths[-1], out_channels * temporal_compression_ratio, 3, padding=1)
        # Motion within a latent: without help the convolutions draw a latent's frames alike (a moving object
        # stands still for four frames, then jumps), since moving an edge by a velocity read from two latents is
        # a product a small ReLU stack does not learn. The flow head reads that velocity at the latent
        # resolution, and each frame is its drawing resampled along it, shifted by its time from the latent's
        # middle. Zero-initialised, so a decoder grown from one without it starts as the same function.
        self.flow_head = nn.Sequential(nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(widths[0], 2, 3, padding=1)) if motion_flow else None
        if self.flow_head is not None:
            nn.init.zeros_(self.flow_head[2].weight)
            nn.init.zeros_(self.flow_head[2].bias)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, latents: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, C, T, h, w). ``previous`` (B, C, 1, h, w): the latent before them, whose frames are
        already out; then all 4T frames come back. None: latents[:, :, 0] is a clip's first latent (read with
        itself as the one before), which gives one frame: 4T - 3 in all."""
        b, c, t, h, w = latents.shape
        before = latents[:, :, :1] if previous is None else previous.to(latents.dtype)
        context = torch.cat([before, latents[:, :, :-1]], dim=2)
        x = torch.cat([latents, context], dim=1).transpose(1, 2).reshape(b * t, 2 * c, h, w)
        features = torch.relu(self.conv_in(x))
        x = self.conv_out(self.stages(features))
        r, ch = self.config.temporal_compression_ratio, self.config.out_channels
        x = x.reshape(b * t, r, ch, *x.shape[-2:])
        if self.flow_head is not None:
            flow = self.flow_head(features)
            if previous is None:  # the clip's first latent, read with itself: its one frame stays where it is
                first = (torch.arange(b * t, device=flow.device) % t != 0).to(flow.dtype)
                flow = flow * first.view(-1, 1, 1, 1)
            x = self.follow_flow(x, flow)
        frames = x.reshape(b, t, r, ch, *x.shape[-2:]).permute(0, 3, 1, 2, 4, 5).reshape(b, ch, t * r, *x.shape[-2:])
        return frames if previous is not None else frames[:, :, r - 1 :]

    @staticmethod
    def follow_flow(frames: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """frames (N, r, C, H, W), a latent's r frames; flow (N, 2, h, w): the motion in full-resolution pixels a
        frame (x, y) -> frame k moved by (k - (r - 1) / 2) times the flow, upsampled smoothly to (H, W)."""
        n, r, c, height, width = frames.shape
        flow = nn.functional.interpolate(flow.float(), size=(height, width), mode="bilinear", align_corners=False)
        ys, xs = torch.meshgrid(torch.arange(height, device=flow.device, dtype=flow.dtype),
                                torch.arange(width, device=flow.device, dtype=flow.dtype), indexing="ij")
        offsets = torch.arange(r, device=flow.device, dtype=flow.dtype) - (r - 1) / 2
        # Each output pixel reads its frame where the content was before moving: at p - offset * flow.
        src_x = xs - offsets.view(1, r, 1, 1) * flow[:, None, 0]
        src_y = ys - offsets.view(1, r, 1, 1) * flow[:, None, 1]
        grid = torch.stack([(2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1], dim=-1)  # align_corners=False
        moved = nn.functional.grid_sample(frames.reshape(n * r, c, height, width).float(),
                                          grid.reshape(n * r, height, width, 2), mode="bilinear",
                                          padding_mode="border", align_corners=False)
        return moved.to(frames.dtype).reshape(n, r, c, height, width)


class CausalStreamingDecoder:
    """:class:`framepack_rt.pipeline.vae.StreamingDecoder`'s calls (push, finish, FrameChunk,
    ``latents_decoded``) with a :class:`FastVideoDecoder`: each push returns the frames of every latent whose
    predecessor is known, so nothing is held back and each latent is decoded once.

    Forward (F1): a push of k latents returns 4k frames (4k - 3 for the clip's first push). A start latent
    pushed alone is decoded with the next push, so the first section starts at frame 0, as with the VAE's
    decoder. Backward (sections pushed end-first, ``total_latents`` known): a section's first latent waits for
    the section before it.
    """

    def __init__(self, model: FastVideoDecoder, *, direction: Literal["forward", "backward"] = "forward",
                 total_latents: int | None = None) -> None:
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        if direction == "backward" and not total_latents:
            raise ValueError("backward decoding needs total_latents: frame positions count from latent 0")
        self.model, self.direction, self.total = model.eval(), direction, total_latents
        self.latents_decoded: list[int] = []
        self._param = next(model.parameters())
        self._n = 0  # forward: latents pushed
        self._lo = total_latents or 0  # backward: the earliest latent pushed
        self._edge: torch.Tensor | None = None  # the latent at the open edge: forward the last, backward the first
        self._finished = False
        self._hw = (0, 0)

    def push(self, latents: torch.Tensor) -> FrameChunk:
        """Scaled latents (C, k, h, w) or (1, C, k, h, w) of the next section -> the frames now final."""
        if self._finished:
            raise RuntimeError("push after finish()")
        z = latents[None] if latents.ndim == 4 else latents
        if z.ndim != 5 or z.shape[0] != 1:
            raise ValueError(f"expected (C, k, h, w) or (1, C, k, h, w) latents, got {tuple(latents.shape)}")
        z = z.to(self._param.device, self._param.dtype)
        ratio = self.model.spatial_compression_ratio
        self._hw = (z.shape[-2] * ratio, z.shape[-1] * ratio)
        k = z.shape[2]
        if self.direction == "forward":
            if self._n == 0 and self._edge is None and k == 1:  # the start latent alone: kept for the first section
                self._edge = z
                self.latents_decoded.append(0)
                return FrameChunk(0, self._empty())
            if self._n == 0 and self._edge is not None:
                z, self._edge = torch.cat([self._edge, z], dim=2), None
            start = 0 if self._n == 0 else 4 * self._n - 3
            frames = self._run(z, self._edge)
            self._n += z.shape[2]
            self._edge = z[:, :, -1:]
            return FrameChunk(start, frames)
        lo = self._lo - k
        if lo < 0:
            raise ValueError(f"more latents pushed than total_latents={self.total}")
        seq = z if self._edge is None else torch.cat([z, self._edge], dim=2)
        if lo == 0:  # the clip's first latent: decodable on its own
            frames, start = self._run(seq, None), 0
        else:  # latent lo waits for lo - 1, in the next push
            frames, start = self._run(seq[:, :, 1:], seq[:, :, :1]), 4 * (lo + 1) - 3
        self._lo, self._edge = lo, z[:, :, :1]
        return FrameChunk(start, frames)

    def finish(self) -> FrameChunk:
        """Nothing is held back going forward; backward, check that the clip is complete."""
        self._finished = True
        if self.direction == "backward" and self._lo != 0:
            raise ValueError(f"clip incomplete: {self.total - self._lo} of {self.total} latents pushed")
        if self.direction == "forward" and self._n == 0 and self._edge is not None:  # only the start was pushed
            self._n = 1
            return FrameChunk(0, self._run(self._edge, None))
        self.latents_decoded.append(0)
        start = 4 * self._n - 3 if self.direction == "forward" and self._n else 0
        return FrameChunk(start, self._empty())

    def _empty(self) -> torch.Tensor:
        h, w = self._hw
        return torch.zeros(0, h, w, 3, dtype=torch.uint8)

    @torch.no_grad()
    def _run(self, z: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        self.latents_decoded.append(z.shape[2])
        if z.shape[2] == 0:
            return self._empty()
        return to_uint8(self.model(z, previous))[0]


def vae_folder_ratio(vae: str | Path) -> int:
    """The spatial compression of a ``vae/`` folder, read from its config.json."""
    import json

    return int(json.loads((Path(vae) / "config.json").read_text()).get("spatial_compression_ratio", 8))


def folder_scale(fast_decoder: str | Path, vae: str | Path) -> int:
    """The upsampling of a ``fast_decoder/`` folder over the ``vae/`` folder it decodes for (1: the VAE's frame
    size), read from their config.json files without loading weights (VideoVAE checks the pair at load)."""
    # Built from its config alone on the meta device (no memory, no draw from torch's global generator, which
    # seeded runs must not touch): its own defaults and spatial_compression_ratio, not a copy of them here.
    with torch.device("meta"):
        ratio = FastVideoDecoder.from_config(FastVideoDecoder.load_config(fast_decoder)).spatial_compression_ratio
    return max(1, ratio // vae_folder_ratio(vae))


def untrained_sizes(fast_decoder: str | Path, vae: str | Path,
                    buckets: Iterable[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
    """(the latent side a ``fast_decoder/`` folder was trained on, the ``buckets`` (frame height, width) whose
    latents are not that size), read from the configs without loading weights; (0, []) when the folder does not
    record its size."""
    trained = FastVideoDecoder.load_config(fast_decoder).get("trained_latent_size")
    if not trained:
        return 0, []
    ratio = vae_folder_ratio(vae)
    return int(trained), [(h, w) for h, w in buckets if (h // ratio, w // ratio) != (trained, trained)]


def load_fast_decoder(path: str | Path, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> FastVideoDecoder:
    """A ``fast_decoder/`` folder (config.json + diffusion_pytorch_model.safetensors); ``dtype`` None: fp16 on
    CUDA, else fp32."""
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    model = FastVideoDecoder.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval()
