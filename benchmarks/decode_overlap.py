"""The VAE decode overlapped with the next section's sampling, against one after the other.

    python benchmarks/decode_overlap.py                       # the demo model, CPU, 8 sections, 3 rounds
    python benchmarks/decode_overlap.py --model tiny --steps 2 --json out.json

Each round times an F1 stream with decode_overlap off, then on (the order alternates between rounds, so slow
drift in the machine's load falls on both): the wall time to the first section, the wall time between
sections as the caller receives them (median), and frames per second over the sections after the first.
The frames of both runs are compared: they must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from framepack_rt.pipeline import devices
from framepack_rt.stream import DEFAULT_MODEL


def timed_stream(pipe, image, prompt: str, sections: int, steps: int | None, overlap: bool) -> dict:
    stream = pipe.stream(image, prompt, steps=steps, seed=1, decode_overlap=overlap)
    began = time.perf_counter()
    stamps, frames, sample_ms, decode_ms = [], [], [], []
    for _ in range(sections):
        section = next(stream)
        stamps.append(time.perf_counter())
        frames.append(section.frames)
        sample_ms.append(section.sample_ms)
        decode_ms.append(section.decode_ms)
    stream.stop()
    if stream._ahead is not None:
        stream._ahead.join(60)  # the section decoded ahead: not left running into the next measurement
    gaps = np.diff(stamps) * 1000
    later = sum(len(f) for f in frames[1:])
    return dict(first_ms=(stamps[0] - began) * 1000, gap_ms_p50=float(np.median(gaps)),
                fps=later / (stamps[-1] - stamps[0]), sample_ms_p50=statistics.median(sample_ms),
                decode_ms_p50=statistics.median(decode_ms), frames=np.concatenate(frames))


def run(model: str = DEFAULT_MODEL, sections: int = 8, rounds: int = 3, steps: int | None = None,
        device: str = "auto", dtype: str = "auto") -> dict:
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    pipe = FramePackPipeline.from_pretrained(model, device=device, dtype=dtype)
    if pipe.example is not None:
        image, prompt = pipe.example
    else:
        image, prompt = np.full((64, 64, 3), 30, np.uint8), "a red ball moves right"
        image[24:40, 8:24] = (220, 40, 40)
    timed_stream(pipe, image, prompt, 2, steps, True)  # warm-up: first calls, both threads
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    identical = True
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {overlap: timed_stream(pipe, image, prompt, sections, steps, overlap) for overlap in order}
        identical &= bool(np.array_equal(results[False].pop("frames"), results[True].pop("frames")))
        runs["off"].append(results[False])
        runs["on"].append(results[True])
    summary = {name: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
               for name, rows in runs.items()}
    return dict(
        config=dict(model=model, sections=sections, rounds=rounds, steps=steps or pipe.default_steps,
                    device=pipe.placement.describe() if pipe.placement else device),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
        identical_frames=identical, off=summary["off"], on=summary["on"],
        fps_gain=summary["on"]["fps"] / summary["off"]["fps"], runs=runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"demo | tiny | PATH (default: {DEFAULT_MODEL})")
    parser.add_argument("--sections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int)
    devices.add_arguments(parser)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        r = run(args.model, args.sections, args.rounds, args.steps, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"decode_overlap.py: {exc}\n")
    c = r["config"]
    print(f"{c['model']}, {c['steps']} steps, {c['sections']} sections x {c['rounds']} rounds, {c['device']} "
          f"({r['machine']})")
    for name in ("off", "on"):
        s = r[name]
        print(f"  overlap {name:3s}: first section {s['first_ms']:7.1f} ms, between sections {s['gap_ms_p50']:7.1f} ms "
              f"(sample {s['sample_ms_p50']:.1f} + decode {s['decode_ms_p50']:.1f}), {s['fps']:6.1f} frames/s")
    print(f"  frames/s with overlap / without: {r['fps_gain']:.2f}x; frames identical: {r['identical_frames']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
