"""The VAE decoder against the fast decoder: time per section and picture error, on the demo world's clips.

    python benchmarks/decoders.py                         # the shipped demo model
    python benchmarks/decoders.py --model runs/fd/set --size 96 --json out.json

World clips the training never used (seeds from --seed, default 7) are encoded with the model's VAE, then decoded
by both decoders as a stream decodes them: the start latent, then sections of --window latents. Reported per
decoder: ms per section (after one warm-up section), frames/s of decoding alone, and the error against the
rendered frames (PSNR over all pixels, and the mean absolute error on the shapes' pixels, in levels of 255).
A fast decoder that draws larger frames than the VAE (VideoVAE.fast_scale) is compared with the clips rendered
at its size, and the VAE's frames with the same, scaled up bilinearly as the page shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import torch

from framepack_rt.demo.evaluate import load_pipeline
from framepack_rt.demo.train_decoder import clip_pixels, decode_stream, picture_errors, upscale_frames
from framepack_rt.demo.world import WorldConfig
from framepack_rt.pipeline.fast_decoder import CausalStreamingDecoder
from framepack_rt.pipeline.vae import StreamingDecoder, VideoVAE


def run(model: str = "demo", size: int = 64, clips: int = 4, sections: int = 4, window: int = 9, seed: int = 7) -> dict:
    pipe = load_pipeline(model)  # "demo", or a run's folder with the demo's buckets
    vae: VideoVAE = pipe.parts.vae()
    if vae.fast is None:
        raise SystemExit(f"{model} has no fast decoder (fast_decoder/ beside vae/); train one: "
                         "python -m framepack_rt.demo.train decoder --out RUN")
    seeds = [int(s) for s in np.random.default_rng([seed, 11]).integers(2**31, size=clips)]
    n, scale = 1 + sections * window, vae.fast_scale
    clips_ = []  # per clip, once for both decoders: its latents, and the frames both are compared with
    for s in seeds:
        pixels, _ = clip_pixels([s], n, WorldConfig(size=size))
        with torch.no_grad():
            latents = vae.live.encode(pixels).latent_dist.mode()[0] * vae.scaling_factor
        large, fg = clip_pixels([s], n, WorldConfig(size=size), scale)
        clips_.append((latents, ((large[0].permute(1, 2, 3, 0) + 1) * 127.5).round(), fg[0, 0].bool()))
    results: dict[str, dict] = {}
    for name in ("vae", "fast"):
        ms, psnrs, shape_errs = [], [], []
        for latents, truth, shapes in clips_:
            decoder = StreamingDecoder(vae) if name == "vae" else CausalStreamingDecoder(vae.fast)
            frames, times = decode_stream(decoder, latents, window)
            drawn = frames.shape[1]
            psnr, shape_err = picture_errors(upscale_frames(frames, scale * size // drawn), truth, shapes)
            ms += times[1:]
            psnrs.append(psnr)
            shape_errs.append(shape_err)
        per_section = float(np.median(ms))
        results[name] = {"frame_size": drawn, "ms_per_section": per_section, "decode_fps": 4 * window / per_section * 1000,
                         "psnr_db": float(np.mean(psnrs)), "shape_mae": float(np.mean(shape_errs))}
    return {"model": model, "size": size, "compared_at": size * scale, "clips": clips, "sections": sections, "window": window,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                       f"load {os.getloadavg()[0]:.2f}",
            **results, "speedup": results["vae"]["ms_per_section"] / results["fast"]["ms_per_section"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo or a model folder with vae/ and fast_decoder/")
    p.add_argument("--size", type=int, default=64, help="world frame side (the model's)")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--sections", type=int, default=4)
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = run(args.model, args.size, args.clips, args.sections, args.window, args.seed)
    for name in ("vae", "fast"):
        r = report[name]
        print(f"{name:5s} {r['frame_size']:4d} px {r['ms_per_section']:7.1f} ms/section  {r['decode_fps']:7.0f} frames/s  "
              f"PSNR {r['psnr_db']:5.1f} dB  shapes |err| {r['shape_mae']:5.1f}/255")
    print(f"fast decoder: {report['speedup']:.1f}x the VAE's speed; errors at {report['compared_at']} px "
          f"(smaller frames scaled up bilinearly) ({report['machine']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
