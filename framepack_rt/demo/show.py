"""Look at the demo: a world clip, or what a model makes of a world start frame, as a PNG contact sheet (+ MP4).

    python -m framepack_rt.demo.show world --seed 3 --seconds 6 --out world.png
    python -m framepack_rt.demo.show generate --model runs/demo/weights --prompt "a red ball moves right" \\
        --then "a red ball moves left" --sections 4 --out gen.png

Each sheet row is one second of video (every 5th frame); the prompt in force is printed per row in the log.
With --mp4, the frames are also written as an H.264 file (framepack_rt.pipeline.media.Mp4Writer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def contact_sheet(frames: np.ndarray, every: int = 5, per_row: int = 6, scale: int = 2) -> np.ndarray:
    """(T, H, W, 3) uint8 -> one image: rows of ``per_row`` frames, taking every ``every``-th frame."""
    picked = frames[::every]
    rows = -(-len(picked) // per_row)
    h, w = frames.shape[1:3]
    sheet = np.zeros((rows * (h + 2), per_row * (w + 2), 3), np.uint8)
    for i, frame in enumerate(picked):
        r, c = divmod(i, per_row)
        sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = frame
    return sheet.repeat(scale, axis=0).repeat(scale, axis=1)


def main(argv: list[str] | None = None) -> None:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("world", "generate"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=6.0, help="world: clip length")
    p.add_argument("--model", default="demo", help="generate: 'demo' or a weights folder")
    p.add_argument("--prompt", default="a red ball moves right")
    p.add_argument("--then", default=None, help="generate: prompt from the middle section on")
    p.add_argument("--sections", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--mp4", action="store_true")
    args = p.parse_args(argv)

    from framepack_rt.demo.world import frames_for_latents, make_clip, start_image

    if args.what == "world":
        clip = make_clip(args.seed, frames_for_latents(int(args.seconds * 30 / 4) + 1))
        frames = clip.frames
        for frame, prompt in clip.timeline:
            print(f"{frame / 30:5.2f} s  {prompt}")
    else:
        from framepack_rt.demo.evaluate import load_pipeline, stream_f1

        image, _ = start_image(args.seed, args.prompt, x=0.3)
        prompts = [args.prompt] * args.sections
        if args.then:
            prompts[args.sections // 2 :] = [args.then] * (args.sections - args.sections // 2)
        frames = stream_f1(load_pipeline(args.model), image, prompts, args.seed, args.steps)
        for k, prompt in enumerate(prompts):
            print(f"section {k}: {prompt}")
    Image.fromarray(contact_sheet(frames)).save(args.out)
    print(f"{len(frames)} frames -> {args.out}")
    if args.mp4:
        from framepack_rt.pipeline.media import Mp4Writer

        with Mp4Writer(Path(args.out).with_suffix(".mp4")) as writer:
            writer.write(frames)


if __name__ == "__main__":
    main()
