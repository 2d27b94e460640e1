"""Generation speed of a pipeline in frames per second, and where the time goes.

    python benchmarks/generation_speed.py                    # the built-in default, CPU, default steps
    python benchmarks/generation_speed.py --steps 4 --sections 8 --json out.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/generation_speed.py --threads 1 --no-decode-overlap

Runs one warm-up section, then times N sections of an F1 stream: frames produced per wall-clock second
(steady state), split into sampling (transformer) and VAE decode, with the transformer's ms per step. With
decode overlap (the default) the decode of section k runs on its own thread beside the sampling of k + 1, so
the two shares can add up to more than 100%. ``--threads`` sets torch's intra-op threads; OpenMP's wait policy
is read from the environment when torch starts (OMP_WAIT_POLICY), so it is printed, not set, here.
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


def run(model: str = DEFAULT_MODEL, sections: int = 6, steps: int | None = None, teacache: float | None = None,
        device: str = "auto", cfg: float | None = None, dtype: str = "auto", threads: int | None = None,
        decode_overlap: bool | None = None, channels_last: bool = False, decoder: str = "auto",
        solver: str | None = None) -> dict:
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    if threads:
        torch.set_num_threads(threads)

    pipe = FramePackPipeline.from_pretrained(model, device=device, dtype=dtype, decoder=decoder)
    guidance = pipe.guidance(cfg)
    if channels_last:  # the VAE decoder's tap convolutions in NHWC: faster, thread-count dependent (cpu_conv.py)
        from framepack_rt.pipeline.cpu_conv import use_tap_convs

        use_tap_convs(pipe.parts.vae().live.decoder, channels_last=True)
    if pipe.example is not None:  # the demo model's own start: what it was trained to continue
        image, prompt = pipe.example
    else:
        image, prompt = np.full((64, 64, 3), 30, np.uint8), "a red ball moves right"
        image[24:40, 8:24] = (220, 40, 40)
    stream = pipe.stream(image, prompt, steps=steps, teacache=teacache, guidance=guidance,
                         decode_overlap=decode_overlap, solver=solver)
    next(stream)  # warm-up: first-call allocations, and the first section's shorter output
    rows = []
    began = time.perf_counter()
    for _ in range(sections):
        s = next(stream)
        rows.append(dict(section=s.index, frames=len(s.frames), sample_ms=s.sample_ms, decode_ms=s.decode_ms,
                         ms_per_step=s.ms_per_step, steps_run=s.steps_run, steps_skipped=s.steps_skipped))
    wall = time.perf_counter() - began
    frames = sum(r["frames"] for r in rows)
    sample, decode = sum(r["sample_ms"] for r in rows), sum(r["decode_ms"] for r in rows)
    h, w = rows and stream._decoder._hw
    return dict(
        config=dict(model=model, sections=sections, steps=steps or pipe.default_steps, cfg=guidance.cfg,
                    solver=solver or pipe.default_solver,
                    teacache=teacache, device=pipe.placement.describe(), frame_size=[h, w],
                    decode_overlap=stream._ahead is not None, channels_last=channels_last,
                    decoder=type(stream._decoder).__name__),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load {os.getloadavg()[0]:.2f}",
        fps=frames / wall,
        frames=frames,
        wall_s=wall,
        sample_share=sample / (wall * 1000),
        decode_share=decode / (wall * 1000),
        ms_per_step_p50=statistics.median(r["ms_per_step"] for r in rows),
        rows=rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"demo | tiny | PATH (default: {DEFAULT_MODEL})")
    parser.add_argument("--sections", type=int, default=6)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--teacache", type=float)
    devices.add_arguments(parser)  # --device, --dtype: auto by default, as every command
    parser.add_argument("--cfg", type=float, help="real-CFG scale (default: the model's; 1: off)")
    parser.add_argument("--solver", help="sampler solver (default: the model's; engine/sampling.py's SOLVERS)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, the cores)")
    parser.add_argument("--no-decode-overlap", dest="decode_overlap", action="store_false", default=None,
                        help="decode each section after sampling it, on the same thread")
    parser.add_argument("--channels-last", action="store_true",
                        help="the VAE decoder's CPU convolutions in NHWC (faster; frames then depend on the thread "
                             "count, so off by default)")
    devices.add_decoder_argument(parser)  # --decoder auto|vae|fast
    parser.add_argument("--json")
    args = parser.parse_args()
    try:
        r = run(args.model, args.sections, args.steps, args.teacache, args.device, args.cfg, args.dtype, args.threads,
                args.decode_overlap, args.channels_last, args.decoder, args.solver)
    except (FileNotFoundError, ValueError) as exc:  # a bad --device/--dtype, too little memory, no such model
        parser.exit(2, f"generation_speed.py: {exc}\n")
    c = r["config"]
    print(f"{c['model']} {c['frame_size'][0]}x{c['frame_size'][1]}, {c['steps']} steps, {c['solver']}, cfg {c['cfg']:g}, "
          f"{c['device']}, {c['decoder']}, decode overlap {'on' if c['decode_overlap'] else 'off'} ({r['machine']})")
    print(f"  {r['fps']:.1f} frames/s over {r['frames']} frames ({r['wall_s']:.2f} s)")
    print(f"  sampling {r['sample_share']:.0%} of the time ({r['ms_per_step_p50']:.1f} ms per step), "
          f"decode {r['decode_share']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
