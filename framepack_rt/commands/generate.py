"""``framepack-rt generate``: image + prompt(s) -> an H.264 MP4, with a progress bar over sections and steps."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from framepack_rt.pipeline import devices
from framepack_rt.pipeline.media import Mp4Writer, load_image, parse_prompt_schedule
from framepack_rt.pipeline.framepack_pipeline import FPS, MODES
from framepack_rt.engine.sampling import SOLVERS
from framepack_rt.engine.schedules import num_sections, video_frames_for_latents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from framepack_rt.commands import model_flag

    model_flag.add_argument(parser)
    parser.add_argument("--image", help="start image (PNG/JPEG; default: the model's example start, e.g. the demo's "
                                        "red ball)")
    parser.add_argument("--prompt", help="what happens in the video (default with no --image: the example's prompt)")
    parser.add_argument("--prompt-schedule", help='prompts over time, "0:a ball rolls;3.5:the ball stops"')
    parser.add_argument("--seconds", type=float, required=True, help="video length in seconds")
    parser.add_argument("--mode", default="f1", help="f1 (forward) or inverted (anti-drifting)")
    parser.add_argument("--end-image", help="end frame (inverted mode)")
    parser.add_argument("--out", required=True, help="output .mp4 path")
    parser.add_argument("--steps", type=int, help="sampling steps per section (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacache", type=float, metavar="THRESH", help="TeaCache threshold, e.g. 0.15")
    parser.add_argument("--cfg", type=float, metavar="SCALE",
                        help="real classifier-free guidance scale, 1 = off (default: the model's; demo 2, folders 1)")
    parser.add_argument("--solver", default=None, help=f"sampler solver, one of {', '.join(SOLVERS)} (default: the "
                                                      "model's; demo euler_stochastic, folders unipc_bh1)")
    parser.add_argument("--window", type=int, default=9, help="latent frames per section")
    devices.add_arguments(parser, memory=True)  # --device, --dtype, --low-vram, --memory-budget-gb, --quantize
    devices.add_decoder_argument(parser)
    from framepack_rt.commands import parallel

    parallel.add_arguments(parser)  # --sequence-parallel N, --cfg-parallel, --parallel-timeout
    from framepack_rt.commands import lora_flags

    lora_flags.add_arguments(parser)  # --lora FILE[:SCALE], --fuse-lora


def validate(args: argparse.Namespace) -> None:
    """Everything checkable before loading a model, so mistakes cost nothing. Raises ValueError."""
    if args.seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds:g}")
    if args.mode not in MODES:
        raise ValueError(f"--mode {args.mode!r}: choose one of {', '.join(MODES)}")
    if args.prompt is not None and args.prompt_schedule is not None:
        raise ValueError("give one of --prompt and --prompt-schedule, not both")
    if args.prompt is None and args.prompt_schedule is None and args.image is not None:
        raise ValueError("give --prompt or --prompt-schedule (only the model's example start comes with a prompt)")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if args.end_image and args.mode != "inverted":
        raise ValueError("--end-image needs --mode inverted")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if args.cfg is not None and args.cfg <= 0:
        raise ValueError(f"--cfg must be > 0 (1 turns real CFG off), got {args.cfg:g}")
    if args.solver is not None and args.solver not in SOLVERS:
        raise ValueError(f"--solver {args.solver!r}: choose one of {', '.join(SOLVERS)}")
    devices.check_memory_flags(args.low_vram, args.memory_budget_gb)
    if args.image is not None:
        load_image(args.image)  # readable?
    if args.end_image:
        load_image(args.end_image)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: the output is an MP4, give a .mp4 path")
    if not out.parent.exists():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from framepack_rt.commands import lora_flags

    loras = lora_flags.specs(args)
    if loras and (args.sequence_parallel > 1 or args.cfg_parallel):
        raise ValueError("--lora with --sequence-parallel or --cfg-parallel is not supported yet: run on one worker")
    if args.sequence_parallel > 1 or args.cfg_parallel:  # several worker processes (commands/parallel.py)
        from framepack_rt.commands.parallel import run_parallel

        return run_parallel(args, args.sequence_parallel, args.cfg_parallel, args.device, args.parallel_timeout)
    validate(args)
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    began = time.perf_counter()
    pipe = FramePackPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, low_vram=args.low_vram,
                                             memory_budget_gb=args.memory_budget_gb, quantize=args.quantize,
                                             compile=args.compile, decoder=args.decoder)
    if loras:
        pipe.load_loras(loras, fuse=args.fuse_lora)
    frames_written = write_video(pipe, args)
    elapsed = time.perf_counter() - began
    print(f"wrote {args.out}: {frames_written} frames ({frames_written / FPS:.2f} s at {FPS} fps) in {elapsed:.1f} s")
    return 0


def length_note(seconds: float, window: int, sections: int, frames: int) -> str:
    """What --seconds becomes: video comes in whole sections (4 frames a latent), plus the start frame."""
    per_section = 4 * window
    return (f"--seconds {seconds:g} makes {sections} section{'s' if sections != 1 else ''} of {window} latents "
            f"({per_section} frames, {per_section / FPS:.2f} s each) plus the start frame: {frames} frames, "
            f"{frames / FPS:.2f} s at {FPS} fps. Video comes in whole sections: --seconds rounds to the nearest "
            f"number of them (at least 1)")


def warn_unused_entries(schedule, late, args: argparse.Namespace, sections: int) -> None:
    """Entries inside the video that never take over: prompts change where a section starts, so an entry
    after the last section's start, or one a later entry supersedes before the next start, is not used."""
    from framepack_rt.engine.prompts import entry_sections
    from framepack_rt.engine.schedules import f1_schedule, inverted_schedule
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    layout = f1_schedule(args.window, sections) if args.mode == "f1" else inverted_schedule(
        sections, args.window, has_end_frame=bool(args.end_image))
    starts = sorted(FramePackPipeline.section_start_seconds(layout, k) for k in range(sections))
    taken = entry_sections([c.seconds for c in schedule],
                           lambda k: FramePackPipeline.section_start_seconds(layout, k), 0, sections)
    unused = [c for c, k in zip(schedule, taken) if k is None and c not in late]
    if unused:
        shown = ", ".join(f"{t:.2f}" for t in starts[:8]) + (", ..." if len(starts) > 8 else "")
        print(f"warning: --prompt-schedule entries at {', '.join(f'{c.seconds:g}' for c in unused)} s are not used: "
              f"a prompt takes over where a section starts (at {shown} s), and no section starts between them "
              "and the next entry or the end", file=sys.stderr)


def write_video(pipe, args: argparse.Namespace) -> int:
    """What ``generate`` does with a loaded pipeline (one process, or rank 0 of several): sample, decode, write
    the MP4; returns the frames written."""
    from tqdm import tqdm

    schedule = parse_prompt_schedule(args.prompt_schedule) if args.prompt_schedule else None
    image, prompt = args.image, args.prompt
    if image is None:
        if pipe.example is None:
            raise ValueError(f"model {args.model!r} has no example start: pass --image")
        image, example_prompt = pipe.example
        if prompt is None and schedule is None:
            prompt = example_prompt
    steps = args.steps or pipe.default_steps
    sections = num_sections(args.seconds, args.window)
    frames = video_frames_for_latents(sections * args.window + 1)
    print(length_note(args.seconds, args.window, sections, frames), file=sys.stderr)
    if schedule is not None:
        late = [change for change in schedule if change.seconds >= frames / FPS]
        if late:
            print(f"warning: --prompt-schedule entries at {', '.join(f'{c.seconds:g}' for c in late)} s start after "
                  f"the video ends ({frames / FPS:.2f} s) and are not used", file=sys.stderr)
        warn_unused_entries(schedule, late, args, sections)
    bar = tqdm(total=sections * steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step(progress) -> None:
        bar.set_description(f"section {progress.section + 1}/{sections}")
        bar.update(1)

    stream = pipe.stream(image, prompt or schedule[0].prompt, seed=args.seed, steps=steps,
                         window=args.window, mode=args.mode, seconds=args.seconds, teacache=args.teacache,
                         end_image=args.end_image, on_step=on_step, prompt_schedule=schedule,
                         guidance=pipe.guidance(args.cfg), solver=args.solver,
                         decode_overlap=False if getattr(args, "no_decode_overlap", False) else None)
    chunks = []
    with Mp4Writer(args.out, fps=FPS) as writer:
        for section in stream:
            if args.mode == "f1":
                writer.write(section.frames)  # forward sections arrive in playback order: write as they come
            else:
                chunks.append((section.first_frame, section.frames))
        for _, frames in sorted(chunks, key=lambda c: c[0]):
            writer.write(frames)
        frames_written = writer.frames_written
    bar.close()
    return frames_written
