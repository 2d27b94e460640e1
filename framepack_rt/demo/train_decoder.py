"""Stage 3 of the demo's training: the fast streaming decoder (framepack_rt.pipeline.fast_decoder) for a VAE.

    python -m framepack_rt.demo.train decoder --out runs/fd     # needs OUT/vae: the VAE whose latents it decodes

The VAE stays frozen. World clips of ``--decoder-latents`` latents are encoded once (their scaled posterior means,
cached in OUT/decoder_cache.pt with the clips' seeds); each step takes a batch of cached clips, renders their
frames again from the seeds (the world is deterministic), and trains the decoder to give those frames back from
the latents, with a little noise on the latents: in a stream they come from the sampler, not from the encoder.
``--decoder-scale 2`` trains a decoder that draws frames twice the VAE's side from the same latents: the targets
are the same scenes rendered at twice the size (the world is resolution-free), so a 64 px model streams 128 px.
``--decoder-flow`` adds the flow head that moves a latent's four frames apart (fast_decoder.py).
The loss is the VAE's (L1 + MSE, weighted up on the shapes). Checkpoints (OUT/decoder_ckpt) make it resumable
with the same command; the result is OUT/fast_decoder in the diffusers layout, which ``export`` ships.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from framepack_rt.demo import dist as D
from framepack_rt.demo.world import WorldConfig, frames_for_latents, make_clip, render
from framepack_rt.pipeline.fast_decoder import CausalStreamingDecoder, FastVideoDecoder
from framepack_rt.pipeline.vae import StreamingDecoder, assemble

CACHE_SEED = 3  # clip seeds come from (seed, CACHE_SEED): apart from the VAE's (seed, step) and the evaluation's


def clip_seeds(seed: int, count: int) -> list[int]:
    """The world seeds of the cached clips."""
    return [int(s) for s in np.random.default_rng([seed, CACHE_SEED]).integers(2**31, size=count)]


def clip_pixels(seeds: list[int], num_latents: int, cfg: WorldConfig,
                scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips rendered from their seeds -> pixels (B, 3, 4T - 3, H, W) in [-1, 1] and a shape mask (B, 1, ...).
    ``scale``: the same clips (simulated at ``cfg.size``) drawn ``scale`` times larger."""
    clips = [make_clip(s, frames_for_latents(num_latents), cfg) for s in seeds]
    # Pixel centres sit at integer coordinates, so x at cfg.size is scale * x + (scale - 1) / 2 at the larger size.
    frames = [c.frames if scale == 1 else render(c.objects, c.background, scale * c.centers + (scale - 1) / 2,
                                                 scale * c.radii, scale * cfg.size) for c in clips]
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    bg = torch.tensor([c.background for c in clips], dtype=torch.float32).view(len(seeds), 3, 1, 1, 1) / 127.5 - 1
    return pixels, ((pixels - bg).abs().amax(dim=1, keepdim=True) > 0.02).float()


@torch.no_grad()
def build_cache(vae: torch.nn.Module, seeds: list[int], num_latents: int, cfg: WorldConfig,
                batch: int = 8) -> torch.Tensor:
    """Scaled posterior means (N, C, T, h, w) fp16 of the clips, encoded ``batch`` at a time."""
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, len(seeds), batch):
        pixels, _ = clip_pixels(seeds[i : i + batch], num_latents, cfg)
        out.append((vae.encode(pixels).latent_dist.mode() * scale).half())
    return torch.cat(out)


def vae_fingerprint(folder: str | Path) -> str:
    """A VAE folder's weights, rounded to fp16 (as sets ship them), hashed: equal for the same VAE in fp32 or fp16."""
    import hashlib

    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, tensor in sorted(load_file(file).items()):
            digest.update(name.encode())
            digest.update(tensor.half().contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def load_or_build_cache(out: Path, vae: torch.nn.Module, args: argparse.Namespace, cfg: WorldConfig,
                        info: D.DistInfo) -> tuple[list[int], torch.Tensor]:
    """The run's cached latents, rebuilt when the clips or the VAE (OUT/vae, by fingerprint) changed."""
    path = out / "decoder_cache.pt"
    seeds = clip_seeds(args.seed, args.decoder_clips)
    key = {"seeds": seeds, "size": cfg.size, "vae": vae_fingerprint(out / "vae")}
    if path.exists():
        data = torch.load(path, weights_only=True)
        if all(data.get(k) == v for k, v in key.items()) and data["latents"].shape[2] == args.decoder_latents:
            return seeds, data["latents"]
        D.log_line(out / "decoder_log.jsonl", {"stage": "decoder", "cache": "stale, rebuilt"}, info)
    began = time.perf_counter()
    latents = build_cache(vae, seeds, args.decoder_latents, cfg)
    torch.save({**key, "latents": latents}, path)
    D.log_line(out / "decoder_log.jsonl", {"stage": "decoder", "cached_clips": len(seeds),
                                           "s": round(time.perf_counter() - began, 1)}, info)
    return seeds, latents


def decoder_loss(decoder: FastVideoDecoder, latents: torch.Tensor, pixels: torch.Tensor, fg: torch.Tensor,
                 fg_weight: float) -> tuple[torch.Tensor, dict]:
    """L1 + MSE of the decoded clip against its frames, weighted up on the shapes."""
    recon = decoder(latents)
    weight = 1.0 + fg_weight * fg
    err = recon - pixels
    loss = (weight * (err.abs() + err.pow(2))).mean() / weight.mean()
    return loss, {"mse": err.pow(2).mean().item()}


def train_decoder(args: argparse.Namespace) -> Path:
    """Writes OUT/fast_decoder (diffusers layout) and OUT/decoder_ckpt (resumable)."""
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack_rt.demo.train import StageSteps

    out, info = Path(args.out), D.DistInfo()
    if not (out / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{out / 'vae'}: no VAE; train one (`train vae --out {out}`) or link its folder "
                                f"there (`ln -s /path/to/vae {out / 'vae'}`)")
    cfg = WorldConfig(size=args.size)
    vae = AutoencoderKLHunyuanVideo.from_pretrained(out / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    seeds, cache = load_or_build_cache(out, vae, args, cfg, info)
    vae_ratio = int(vae.config.spatial_compression_ratio)
    del vae
    torch.manual_seed(args.seed)
    widths = tuple(int(w) for w in args.decoder_widths.split(","))
    decoder = FastVideoDecoder(latent_channels=cache.shape[1], block_out_channels=widths, motion_flow=args.decoder_flow,
                               trained_latent_size=args.size // vae_ratio).train()
    scale = args.decoder_scale
    if decoder.spatial_compression_ratio != vae_ratio * scale:
        raise ValueError(f"--decoder-widths {args.decoder_widths} upsamples {decoder.spatial_compression_ratio}x, but "
                         f"the VAE compresses {vae_ratio}x and --decoder-scale is {scale}: give "
                         f"{(vae_ratio * scale).bit_length()} widths (one per 2x, from the latent resolution up)")
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.decoder_lr, weight_decay=0.0)
    extra = D.load_checkpoint(out / "decoder_ckpt", decoder, opt, info)
    if extra is None and args.decoder_init:  # a fresh run from another fast decoder: the layers of equal shape
        copied = init_matching(decoder, Path(args.decoder_init))
        D.log_line(out / "decoder_log.jsonl", {"stage": "decoder", "init": str(args.decoder_init),
                                               "copied": len(copied), "of": len(decoder.state_dict())}, info)
    elif extra is not None and args.decoder_init:
        D.log_line(out / "decoder_log.jsonl", {"stage": "decoder", "init": "ignored: resumed from decoder_ckpt"}, info)
    extra = extra or {"step": 0}
    steps = StageSteps("decoder", decoder, opt, out, args, args.decoder_steps, extra["step"], info)
    for step in range(extra["step"], args.decoder_steps):
        if not steps.start(step, args.decoder_lr, 0.05):
            break
        rng = np.random.default_rng([args.seed, CACHE_SEED, step])  # batches depend on (seed, step): resumable
        pick = rng.choice(len(seeds), size=args.decoder_batch, replace=False)
        pixels, fg = clip_pixels([seeds[i] for i in pick], args.decoder_latents, cfg, scale)
        latents = cache[torch.from_numpy(pick)].float()
        noise = torch.from_numpy(rng.standard_normal(latents.shape).astype(np.float32))
        std = torch.from_numpy(rng.uniform(0, args.latent_noise, (len(pick), 1, 1, 1, 1)).astype(np.float32))
        steps.take(step, *decoder_loss(decoder, latents + std * noise, pixels, fg, args.decoder_fg_weight))
    decoder.eval().save_pretrained(out / "fast_decoder")
    return out / "fast_decoder"


def init_matching(decoder: FastVideoDecoder, folder: Path) -> list[str]:
    """Copies the tensors of the fast decoder in ``folder`` whose names and shapes match ``decoder``'s (e.g. all
    but the last stages of one with fewer widths); returns the names copied."""
    from framepack_rt.pipeline.fast_decoder import load_fast_decoder

    model = load_fast_decoder(folder)
    source, ours = model.state_dict(), decoder.state_dict()
    copied = [k for k, v in source.items() if k in ours and ours[k].shape == v.shape]
    if not copied:
        raise ValueError(f"{folder}: no layer of that fast decoder fits this one: give --decoder-widths that start "
                         f"with its block_out_channels {list(model.config.block_out_channels)}, "
                         "or leave out --decoder-init")
    decoder.load_state_dict({**ours, **{k: source[k].float() for k in copied}})
    return copied


def decode_stream(decoder: StreamingDecoder | CausalStreamingDecoder, latents: torch.Tensor,
                  window: int) -> tuple[torch.Tensor, list[float]]:
    """latents (C, T, h, w) pushed as a stream pushes them -> frames (4T - 3, H, W, 3) uint8, ms per push."""
    chunks, times = [decoder.push(latents[:, :1])], []
    for i in range(1, latents.shape[1], window):
        began = time.perf_counter()
        chunks.append(decoder.push(latents[:, i : i + window]))
        times.append((time.perf_counter() - began) * 1000)
    chunks.append(decoder.finish())
    return assemble(chunks), times


def upscale_frames(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> (N, scale H, scale W, 3), bilinear: a smaller decoder's frames as a page that
    scales smoothly shows them, to compare with a decoder that draws the larger size itself."""
    if scale == 1:
        return frames
    x = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), scale_factor=scale, mode="bilinear",
                                        align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def picture_errors(frames: torch.Tensor, truth: torch.Tensor, shapes: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) over all pixels and mean |error| on the shapes' pixels, in levels of 255."""
    diff = frames.float() - truth.float()
    psnr = float(10 * torch.log10(255.0**2 / diff.pow(2).mean()))
    return psnr, float(diff.abs().mean(dim=-1)[shapes].mean())


def centroids(frames: np.ndarray, background: tuple[int, int, int], threshold: float = 40.0) -> np.ndarray:
    """uint8 frames (N, H, W, 3) -> (N, 2) centroids (x, y) of the pixels farther than ``threshold`` from the
    background colour (NaN where there are none)."""
    far = np.abs(frames.astype(np.float32) - np.array(background, np.float32)).max(axis=-1) > threshold
    out = np.full((len(frames), 2), np.nan)
    for i, mask in enumerate(far):
        ys, xs = np.nonzero(mask)
        if len(xs):
            out[i] = xs.mean(), ys.mean()
    return out


def centroid_steps(clips: list[np.ndarray]) -> dict:
    """Per clip (N, 2) centroids of frames 0..N-1 -> their frame-to-frame steps: the mean between frames of one
    latent, the mean across a latent boundary (frame 4t to 4t + 1), and the largest."""
    within, across = [], []
    for centres in clips:
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        leaves = np.arange(len(steps)) % 4 == 0  # frame f -> f + 1 leaves latent t when f = 4t
        within.append(steps[~leaves])
        across.append(steps[leaves])
    within, across = np.concatenate(within), np.concatenate(across)
    return {"within": float(np.nanmean(within)), "across": float(np.nanmean(across)),
            "largest": float(np.nanmax(np.concatenate([within, across])))}


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--decoder-steps", dest="decoder_steps", type=int, default=3000)
    sp.add_argument("--decoder-batch", dest="decoder_batch", type=int, default=8, help="clips per step")
    sp.add_argument("--decoder-lr", dest="decoder_lr", type=float, default=2e-3)
    sp.add_argument("--decoder-clips", dest="decoder_clips", type=int, default=1000, help="clips encoded once")
    sp.add_argument("--decoder-latents", dest="decoder_latents", type=int, default=5, help="latents per clip")
    sp.add_argument("--decoder-widths", dest="decoder_widths", default="64,32,16,16",
                    help="channels from the latent resolution up to the full one (one more entry per 2x)")
    sp.add_argument("--decoder-scale", dest="decoder_scale", type=int, default=1, choices=(1, 2, 4),
                    help="frames this many times the VAE's side (the targets are rendered that large); add one "
                         "--decoder-widths entry per 2x")
    sp.add_argument("--decoder-init", dest="decoder_init",
                    help="fast_decoder/ folder to start from (its layers whose shapes match)")
    sp.add_argument("--decoder-flow", dest="decoder_flow", action="store_true",
                    help="a flow head that moves each of a latent's frames along the motion it reads (zero at "
                         "first: with --decoder-init, training starts from that decoder's frames)")
    sp.add_argument("--latent-noise", dest="latent_noise", type=float, default=0.1,
                    help="max std of the noise added to the latents (sampled latents are not the encoder's)")
    sp.add_argument("--decoder-fg-weight", dest="decoder_fg_weight", type=float, default=10.0)
