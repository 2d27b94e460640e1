"""HunyuanVideo causal VAE: image -> latent, latents -> uint8 frames, streaming decode, latent preview.

Frame counts: the VAE is causal, 4x in time, 8x in space, so T latents decode to 4T - 3 frames (latent 0 is
one frame, every later latent four). Latents here are always *scaled* (multiplied by 0.476986), the form the
transformer samples in.

Streaming (StreamingDecoder) reproduces the one-shot decode of the whole clip exactly. diffusers decodes long
clips in temporal tiles (5 latents, stride 3, the first 4 frames of each tile crossfaded linearly into the
previous one); a tile depends on its own latents only. So the stream anchors the same tile grid at latent 0,
decodes each tile once, as soon as its 5 latents exist, and emits a frame once every tile covering it is done.
That beats FramePack's release (re-decode the newest 2w latents each section, crossfade 33 frames): no seam at
all (frames equal the full decode), 15 latents of VAE work per 9-latent section instead of ~30, and at most 12
frames held back instead of a whole section.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch

from framepack_rt.pipeline.cpu_conv import use_tap_convs

SCALING_FACTOR = 0.476986

# Latent -> RGB in [0, 1] for previews without the VAE: the HunyuanVideo factors FramePack's release uses in
# diffusers_helper/hunyuan.py vae_decode_fake ("From comfyui": ComfyUI latent_formats.HunyuanVideo), applied
# to scaled latents. Rows: latent channels 0..15; columns: R, G, B.
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
)
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)
HUNYUAN_BLOCK_OUT_CHANNELS = (128, 256, 512, 512)  # the release's VAE, the one those factors describe


def frame_count(latent_frames: int) -> int:
    """Frames the causal VAE decodes from ``latent_frames`` latents: 1 + 4 (T - 1)."""
    return 4 * latent_frames - 3 if latent_frames > 0 else 0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8 on the CPU."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu()


@dataclass(frozen=True)
class LatentRGB:
    """A linear map from scaled latents to RGB in [0, 1]: a (3, C, k, k) kernel over each latent position's
    k x k neighbourhood (edges replicated) plus a bias; k = 1 is the classic per-position "latent RGB factors"."""

    weight: torch.Tensor  # (3, latent channels, k, k), fp32 on the CPU
    bias: torch.Tensor  # (3,)

    @classmethod
    def hunyuan(cls) -> "LatentRGB":
        """The published factors of the HunyuanVideo release's VAE (LATENT_RGB_FACTORS)."""
        return cls(torch.tensor(LATENT_RGB_FACTORS).T[:, :, None, None].contiguous(), torch.tensor(LATENT_RGB_BIAS))


def latent_preview(latents: torch.Tensor, rgb: LatentRGB | None = None) -> torch.Tensor:
    """Scaled latents (B, C, T, h, w) -> uint8 RGB (B, T, h, w, 3) at latent resolution (no VAE; per step).
    ``rgb``: the VAE's own map (:meth:`VideoVAE.latent_rgb`); None: the HunyuanVideo release's factors."""
    rgb = rgb or LatentRGB.hunyuan()
    b, c, t, h, w = latents.shape
    frames = latents.float().transpose(1, 2).reshape(b * t, c, h, w)
    pad = rgb.weight.shape[-1] // 2
    if pad:
        frames = torch.nn.functional.pad(frames, (pad, pad, pad, pad), mode="replicate")
    out = torch.nn.functional.conv2d(frames, rgb.weight.to(latents.device), rgb.bias.to(latents.device))
    out = out.view(b, t, 3, h, w).permute(0, 1, 3, 4, 2)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def preview_fit_images(size: int = 64, count: int = 32, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]: plain backgrounds with one to three discs and squares of random
    colours, a fixed set (seeded): the generic part of what :class:`PreviewFit` fits a VAE's map on."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images = torch.empty(count, 3, size, size)
    for i in range(count):
        image = torch.rand(3, 1, 1, generator=g).expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = float(size * (0.08 + 0.17 * torch.rand(1, generator=g)))
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if torch.rand(1, generator=g) < 0.5 else (
                ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r))
            image[:, shape] = torch.rand(3, 1, generator=g)
        images[i] = image
    return images * 2 - 1


class PreviewFit:
    """Least squares of latents -> the mean colour of each latent position's pixel block, as normal equations,
    so that more pictures can join at no re-encoding cost: the "latent RGB factors" real systems ship, fitted
    for any VAE. A small VAE is not linear enough for one map to fit every scene, so each stream adds its own
    start image, weighted (:meth:`solve`): its colours are the ones its video shows. Measured on the demo VAE,
    12 scenes of its world with the objects moved from the start, mean error at latent resolution: generic
    set alone 48/255, start weighted 8x 28, 32x 19, 128x 15 (the default), 512x 12; kernel 3 was no better
    (15 at 128x); the release's factors 124."""

    def __init__(self, kernel: int = 1, ridge: float = 1e-2) -> None:
        self.kernel, self.ridge = kernel, ridge
        self.gram: torch.Tensor | None = None  # (D, D) float64, D = C k k + 1
        self.cross: torch.Tensor | None = None  # (D, 3)
        self.rows = 0
        self.channels = 0

    def _features(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N h w, C k k + 1): each position's neighbourhood (edges replicated) and a 1."""
        n, c, h, w = latents.shape
        pad = self.kernel // 2
        x = torch.nn.functional.pad(latents.float(), (pad, pad, pad, pad), mode="replicate") if pad else latents.float()
        cols = torch.nn.functional.unfold(x, self.kernel).transpose(1, 2).reshape(n * h * w, -1)
        return torch.cat([cols, torch.ones(cols.shape[0], 1)], dim=1).double()

    @staticmethod
    def _targets(images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        ratio = images.shape[-1] // latents.shape[-1]
        blocks = torch.nn.functional.avg_pool2d((images.float().cpu() + 1) / 2, ratio)  # (N, 3, h, w)
        return blocks.permute(0, 2, 3, 1).reshape(-1, 3).double()

    def add(self, latents: torch.Tensor, images: torch.Tensor, weight: float = 1.0) -> "PreviewFit":
        """Scaled latents (N, C, h, w) of ``images`` (N, 3, H, W) in [-1, 1] join the fit; returns self."""
        x, y = self._features(latents.cpu()), self._targets(images, latents)
        gram, cross = weight * x.T @ x, weight * x.T @ y
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.rows += int(round(weight * x.shape[0]))
        self.channels = latents.shape[1]
        return self

    def solve(self, latents: torch.Tensor | None = None, images: torch.Tensor | None = None,
              weight: float = 128.0) -> LatentRGB:
        """The map of everything added, plus (not kept) ``latents`` of ``images`` counted ``weight`` times."""
        if self.gram is None:
            raise ValueError("nothing to fit: add() latents and their images first")
        gram, cross, rows = self.gram, self.cross, self.rows
        if latents is not None and images is not None:
            x, y = self._features(latents.cpu()), self._targets(images, latents)
            gram, cross, rows = gram + weight * x.T @ x, cross + weight * x.T @ y, rows + weight * x.shape[0]
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        eye[-1, -1] = 0  # the bias is not shrunk
        solution = torch.linalg.solve(gram + self.ridge * rows * eye, cross).float()  # (D, 3)
        k = self.kernel
        weight_map = solution[:-1].T.reshape(3, self.channels, k, k).contiguous()
        return LatentRGB(weight_map, solution[-1].contiguous())


def check_pair(vae_config: Any, fast_decoder: torch.nn.Module) -> int:
    """A fast decoder reads one VAE's latents: the same channels and temporal compression, and a spatial upsampling
    of the VAE's times 1, 2, 4 ... (a decoder may draw larger frames than the VAE). -> that factor, or a ValueError."""
    theirs = (fast_decoder.config.latent_channels, fast_decoder.spatial_compression_ratio,
              fast_decoder.config.temporal_compression_ratio)
    ours = (vae_config.latent_channels, vae_config.spatial_compression_ratio, vae_config.temporal_compression_ratio)
    scale, rest = divmod(theirs[1], ours[1])
    if theirs[0] != ours[0] or theirs[2] != ours[2] or rest or scale < 1 or scale & (scale - 1):
        raise ValueError(f"the fast decoder reads latents of {theirs[0]} channels at {theirs[1]}x/{theirs[2]}x "
                         f"compression, the VAE makes {ours[0]} at {ours[1]}x/{ours[2]}x: use the fast decoder trained "
                         "for this VAE (`python -m framepack_rt.demo.train decoder`), or decoder 'vae'")
    return scale


class VideoVAE:
    """diffusers ``AutoencoderKLHunyuanVideo`` with the scaling factor and pixel conversions applied."""

    def __init__(self, model: torch.nn.Module, *, spatial_tiling: bool = False,
                 fast_decoder: torch.nn.Module | None = None) -> None:
        """fast_decoder: a FastVideoDecoder trained for this VAE (fast_decoder.py), which streams may decode with."""
        self.model: torch.nn.Module | None = model.eval()
        # frames of the fast decoder / frames of the VAE, per side (a decoder trained to draw larger: 2)
        self.fast_scale = 1 if fast_decoder is None else check_pair(model.config, fast_decoder)
        self.fast = fast_decoder
        self.scaling_factor = float(model.config.scaling_factor)
        # Streaming equality with decode() relies on diffusers' temporal tiling being on (its default).
        model.use_framewise_decoding = True
        if spatial_tiling:  # low-VRAM: 256 px spatial tiles, as the release enables when VRAM is short
            model.enable_tiling()
        # CPU only at run time: conv2d taps beat slow_conv3d (cpu_conv.py). The encoder too: encoding the
        # on-policy recordings' targets went from 6.0 to 2.1 s a 53-frame clip at 96 px (one thread).
        use_tap_convs(model.decoder)
        use_tap_convs(model.encoder)
        self._preview_fit: PreviewFit | None = None  # the latent preview's generic fit, made once (latent_rgb)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        spatial_tiling: bool = False, fast_decoder: str | Path | None = None) -> "VideoVAE":
        """``path``: a vae/ folder; ``fast_decoder``: its fast_decoder/ folder, if the model has one."""
        from diffusers import AutoencoderKLHunyuanVideo

        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        model = AutoencoderKLHunyuanVideo.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        fast = None
        if fast_decoder is not None:
            from framepack_rt.pipeline.fast_decoder import load_fast_decoder

            fast = load_fast_decoder(fast_decoder, device=device, dtype=dtype)
        return cls(model.to(device), spatial_tiling=spatial_tiling, fast_decoder=fast)

    @property
    def live(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("VideoVAE was released; load it again")
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self.live.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.live.parameters()).dtype

    def release(self) -> None:
        """Drop the weights (low-VRAM mode: load -> decode -> free)."""
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = self.fast = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def latent_rgb(self, start_latent: torch.Tensor | None = None, start_image: np.ndarray | None = None) -> LatentRGB:
        """This VAE's latent -> RGB map for the previews of a stream from ``start_image`` (H, W, 3) uint8 whose
        scaled latent is ``start_latent`` (1, C, 1, h, w). The HunyuanVideo release's VAE (its block widths):
        the published factors. Any other VAE: a :class:`PreviewFit` of its own (the generic images encoded
        once per VAE, 1-2 s on 2 busy cores for the demo VAE) with the start image added: another VAE's
        latents mean other colours, and the release's factors turn the demo's latents almost black."""
        config = self.live.config
        if list(config.block_out_channels) == list(HUNYUAN_BLOCK_OUT_CHANNELS) and config.latent_channels == 16:
            return LatentRGB.hunyuan()
        if self._preview_fit is None:
            images = preview_fit_images()
            self._preview_fit = PreviewFit().add(self.encode(images)[:, :, 0], images)
        if start_latent is None or start_image is None:
            return self._preview_fit.solve()
        pixels = torch.from_numpy(np.array(start_image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        return self._preview_fit.solve(start_latent[:, :, 0].float(), pixels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> scaled latents (B, 16, 1, H/8, W/8).

        ``sample=False`` takes the posterior mean (deterministic); the release samples (``sample=True``), whose
        spread for an image is far below what the sampler's noise does to it.
        """
        if images.ndim != 4 or images.shape[-1] % 8 or images.shape[-2] % 8:
            raise ValueError(f"expected (B, 3, H, W) with H, W multiples of 8, got {tuple(images.shape)}")
        dist = self.live.encode(images[:, :, None].to(self.device, self.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 16, T, h, w) -> pixels (B, 3, 4T - 3, 8h, 8w) in about [-1, 1]."""
        return self.live.decode((latents / self.scaling_factor).to(self.device, self.dtype)).sample

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 16, T, h, w) -> uint8 (B, 4T - 3, 8h, 8w, 3); (16, T, h, w) -> (4T - 3, 8h, 8w, 3)."""
        if latents.ndim == 4:
            return to_uint8(self.decode(latents[None]))[0]
        return to_uint8(self.decode(latents))

    @torch.no_grad()
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """One temporal tile of *unscaled* latents, exactly as diffusers' temporal tiling decodes it."""
        m = self.live
        r = m.spatial_compression_ratio
        if m.use_tiling and (z.shape[-1] > m.tile_sample_min_width // r or z.shape[-2] > m.tile_sample_min_height // r):
            return m.tiled_decode(z).sample
        return m.decoder(m.post_quant_conv(z))


@dataclass(frozen=True)
class FrameChunk:
    """Frames that became final: clip frames [start, start + len(frames)), uint8 (N, H, W, 3) on the CPU."""

    start: int
    frames: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.frames.shape[0]


def assemble(chunks: Iterable[FrameChunk]) -> torch.Tensor:
    """Chunks in any order -> the clip in playback order (N, H, W, 3); they must tile [0, N) without gaps."""
    chunks = sorted((c for c in chunks if c.frames.shape[0]), key=lambda c: c.start)
    position = 0
    for c in chunks:
        if c.start != position:
            raise ValueError(f"chunks leave a gap or overlap at frame {position} (next starts at {c.start})")
        position = c.stop
    return torch.cat([c.frames for c in chunks])


def _blend(a: torch.Tensor, b: torch.Tensor, blend: int) -> torch.Tensor:
    """diffusers' blend_t: b's first e frames fade in from a's last e frames (a may be just a's tail)."""
    e = min(a.shape[2], b.shape[2], blend)
    b = b.clone()
    for x in range(e):  # same arithmetic as diffusers (python-float weights), so results match bit for bit
        b[:, :, x] = a[:, :, a.shape[2] - e + x] * (1 - x / e) + b[:, :, x] * (x / e)
    return b


class StreamingDecoder:
    """Turns each sampled section's latents into final frames right away; cost per section is constant.

    ``direction="forward"`` (F1): sections are pushed in time order (the start latent may be pushed first or be
    part of the first section). After n latents, frames [0, 12 * ((n - 2) // 3) + 1) have been emitted (none
    before n = 5); ``finish()`` emits the rest, 4n - 3 in all. With window 9 and no separate start latent:
    25 frames for the first section, 36 (= 4w) for every later one, 8 at finish. At most 12 frames are
    held back, the frames of the last 1-3 latents, whose tile is not complete yet.

    ``direction="backward"`` (inverted anti-drifting): sections are pushed end-first (each one precedes the
    last) and ``total_latents`` must be known. Each push returns the frames that became final, placed before
    those already returned; ``assemble`` puts the chunks in playback order. Playing in order is only
    possible once the first section (with the start latent) arrives.

    ``latents_decoded[i]`` is the number of latent frames push/finish call i sent through the VAE decoder.
    """

    def __init__(self, vae: VideoVAE, *, direction: Literal["forward", "backward"] = "forward",
                 total_latents: int | None = None) -> None:
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        if direction == "backward" and not total_latents:
            raise ValueError("backward decoding needs total_latents: the tile grid is anchored at latent 0")
        m = vae.live
        self.vae, self.direction, self.total = vae, direction, total_latents
        self.r = m.temporal_compression_ratio  # 4
        self.tile = m.tile_sample_min_num_frames // self.r + 1  # 5 latents per tile
        self.step = m.tile_sample_stride_num_frames // self.r  # 3 latents between tile starts
        self.stride = m.tile_sample_stride_num_frames  # 12 frames kept per tile
        self.blend = m.tile_sample_min_num_frames - m.tile_sample_stride_num_frames  # 4 crossfaded frames
        self.latents_decoded: list[int] = []
        self._lat: torch.Tensor | None = None  # unscaled latents of clip indices [lo, lo + T)
        self._finished = False
        self._hw = (0, 0)  # output frame size, known from the first push
        if direction == "forward":
            self._lo, self._n, self._k, self._emitted = 0, 0, 0, 0
            self._tail: torch.Tensor | None = None  # last `blend` frames of the previous tile, float
        else:
            self._lo = self._first_final = total_latents
            self._k = -(-total_latents // self.step) - 1  # last tile first
            self._head: torch.Tensor | None = None  # first frames of the last decoded tile, awaiting its blend

    def _decode(self, k: int, stop: int) -> torch.Tensor | None:
        start = k * self.step
        if k > 0 and stop - start <= 1:
            return None  # a one-latent tail tile only yields the frame that belongs to the previous tile
        z = self._lat[:, :, start - self._lo : stop - self._lo]
        self.latents_decoded[-1] += z.shape[2]
        d = self.vae.decode_tile(z)
        return d[:, :, 1:] if k > 0 else d  # a later tile's first frame belongs to the previous tile

    def _chunk(self, start: int, pieces: list[torch.Tensor]) -> FrameChunk:
        if not pieces:
            h, w = self._hw
            return FrameChunk(start, torch.zeros(0, h, w, 3, dtype=torch.uint8))
        return FrameChunk(start, to_uint8(torch.cat(pieces, dim=2))[0])

    def push(self, latents: torch.Tensor) -> FrameChunk:
        """Scaled latents (16, k, h, w) or (1, 16, k, h, w) of the next section -> the frames now final."""
        if self._finished:
            raise RuntimeError("push after finish()")
        z = latents[None] if latents.ndim == 4 else latents
        if z.ndim != 5 or z.shape[0] != 1:
            raise ValueError(f"expected (16, k, h, w) or (1, 16, k, h, w) latents, got {tuple(latents.shape)}")
        z = (z / self.vae.scaling_factor).to(self.vae.device, self.vae.dtype)
        ratio = self.vae.live.spatial_compression_ratio
        self._hw = (z.shape[-2] * ratio, z.shape[-1] * ratio)
        self.latents_decoded.append(0)
        if self.direction == "forward":
            self._lat = z if self._lat is None else torch.cat([self._lat, z], dim=2)
            self._n += z.shape[2]
            return self._forward(final=False)
        if self._lo - z.shape[2] < 0:
            raise ValueError(f"more latents pushed than total_latents={self.total}")
        self._lat = z if self._lat is None else torch.cat([z, self._lat], dim=2)
        self._lo -= z.shape[2]
        return self._backward()

    def finish(self) -> FrameChunk:
        """Emit what is still held back (forward); check the clip is complete (backward)."""
        self._finished = True
        self.latents_decoded.append(0)
        if self.direction == "forward":
            return self._forward(final=True)
        if self._lo != 0:
            raise ValueError(f"clip incomplete: {self.total - self._lo} of {self.total} latents pushed")
        return self._chunk(0, [])

    @torch.no_grad()
    def _forward(self, final: bool) -> FrameChunk:
        start, pieces = self._emitted, []
        # A tile is decodable once complete; at the end of the clip, partial tiles too.
        while self._k * self.step + (1 if final else self.tile) <= self._n:
            k = self._k
            d = self._decode(k, min(k * self.step + self.tile, self._n))
            self._k += 1
            if d is None:
                continue
            if k > 0:
                d = _blend(self._tail, d, self.blend)
            pieces.append(d[:, :, : self.stride + (k == 0)])
            self._tail = d[:, :, -self.blend :]
            keep = self._k * self.step - self._lo  # only the next tile's latents stay: bounded memory
            self._lat, self._lo = self._lat[:, :, keep:], self._lo + keep
        self._emitted += sum(p.shape[2] for p in pieces)
        return self._chunk(start, pieces)

    @torch.no_grad()
    def _backward(self) -> FrameChunk:
        pieces: list[torch.Tensor] = []
        while self._k >= 0 and self._k * self.step >= self._lo:
            k = self._k
            d = self._decode(k, min(k * self.step + self.tile, self.total))
            self._k -= 1
            if d is None:
                continue
            if self._head is not None:  # the later tile's head fades in from this tile's tail: now final
                assert k == 0 or d.shape[2] >= 2 * self.blend  # tail must not overlap this tile's own head
                pieces.insert(0, _blend(d[:, :, -self.blend :], self._head, self.blend))
            region = d[:, :, : self.stride + (k == 0)]
            held = min(region.shape[2], self.blend) if k > 0 else 0
            self._head = region[:, :, :held] if held else None
            pieces.insert(0, region[:, :, held:])
            self._first_final = (self.r * k * self.step + 1 + held) if k > 0 else 0
            stop = max(self._k, 0) * self.step + self.tile - self._lo  # keep what the next tile needs
            self._lat = self._lat[:, :, :stop]
        return self._chunk(self._first_final, pieces)
