"""Does the fast decoder move objects frame by frame, or a latent at a time? Centroid steps on world clips.

    python benchmarks/decoder_motion.py                      # the shipped demo model
    python benchmarks/decoder_motion.py --model runs/set --clips 8 --json out.json

Lone-ball world clips the training never used (seeds from --seed) are encoded with the model's VAE and decoded
by its fast decoder. Per frame the ball's centroid is found (pixels far from the background colour); reported,
in pixels at the VAE's frame size: the mean step between frames of the same latent, the mean step across a
latent boundary (frame 4t to 4t + 1), the largest step, and the same for the rendered clip. A decoder that
draws a latent's four frames alike gives about 0 within and four frames' motion across.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import torch

from framepack_rt.demo.evaluate import load_pipeline
from framepack_rt.demo.train_decoder import centroid_steps, centroids
from framepack_rt.demo.world import WorldConfig, frames_for_latents, make_clip


def run(model: str = "demo", size: int = 64, clips: int = 8, latents: int = 13, seed: int = 5) -> dict:
    pipe = load_pipeline(model)  # "demo", or a run's folder with the demo's buckets
    vae = pipe.parts.vae()
    if vae.fast is None:
        raise SystemExit(f"{model} has no fast decoder (fast_decoder/ beside vae/); train one: "
                         "python -m framepack_rt.demo.train decoder --out RUN")
    seeds = [int(s) for s in np.random.default_rng([seed, 13]).integers(2**31, size=clips)]
    vae_weight, fast_weight = next(vae.live.parameters()), next(vae.fast.parameters())  # their device and dtype
    decoded, world = [], []
    for s in seeds:
        clip = make_clip(s, frames_for_latents(latents), WorldConfig(size=size), num_objects=1)
        pixels = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.live.encode(pixels.to(vae_weight)).latent_dist.mode() * vae.scaling_factor
            frames = vae.fast(z.to(fast_weight))[0]
        frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        scale = frames.shape[1] / clip.frames.shape[1]
        for target, drawn, factor in ((decoded, frames, scale), (world, clip.frames, 1.0)):
            target.append(centroids(drawn, clip.background) / factor)
    return {"model": model, "clips": clips, "latents": latents, "size": size,
            "fast": centroid_steps(decoded), "world": centroid_steps(world),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                       f"load {os.getloadavg()[0]:.2f}"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo or a model folder with vae/ and fast_decoder/")
    p.add_argument("--size", type=int, default=64, help="world frame side (the model's)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--latents", type=int, default=13)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = run(args.model, args.size, args.clips, args.latents, args.seed)
    print(f"centroid steps, px at {report['size']} px ({args.clips} lone-ball clips, {args.latents} latents):")
    for name in ("fast", "world"):
        r = report[name]
        print(f"  {name:5s} within a latent {r['within']:.2f}  across a boundary {r['across']:.2f}  "
              f"largest {r['largest']:.2f}")
    print(f"({report['machine']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
