"""``framepack-rt generate|serve --sequence-parallel N [--cfg-parallel]``: one stream on N worker processes.

    run_parallel(args, world_size=2, cfg_parallel=False, device="cpu")   # args: generate's parsed arguments
    serve_parallel(args, settings)                                        # serve's arguments and ServerSettings

Rank 0 loads the whole pipeline, samples (its engine calls the transformer through
:class:`~framepack_rt.engine.parallel.DistributedTransformer`), decodes and writes the MP4, exactly as
``framepack-rt generate`` does in one process; the other ranks load only the transformer and follow. N counts
worker processes (GPUs): every transformer call runs sequence parallel over them, or, with ``--cfg-parallel``,
the two guidance branches run on two halves of N/2 each. ``--device cuda`` gives worker r the GPU cuda:r;
``--device cpu`` runs gloo (tests). Under torchrun (several machines) the workers are torchrun's.

``serve``: rank 0 hosts the server (every session, the encoders and the VAE decode) and its device worker
thread drives the world, one section at a time, whichever session it belongs to; the other ranks follow. While
no session runs, rank 0 pings the world every few seconds (engine.parallel.Keepalive), so the followers' wait
stays bounded by ``--parallel-timeout`` and a dead or hung rank 0 is noticed. A worker that dies or hangs fails
the session running (its viewers get the error), and rank 0 then stops the server: the command exits with the
error, naming the worker when the launcher saw it die.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch

from framepack_rt.engine.parallel import DistributedTransformer, Keepalive, ParallelWorld, follow
from framepack_rt.pipeline.framepack_pipeline import FPS
from framepack_rt.pipeline.parallel_launch import LaunchConfig, launch, with_transformer

DEFAULT_TIMEOUT_S = 600.0  # per collective: the 13B's first section compiles and loads within it
KEEPALIVE_MAX_S = 5.0  # serve: rank 0 pings an idle world at least this often (and 4 times per timeout)
STOP_DELAY_S = 3.0  # serve: after the world broke, sessions that generate meanwhile fail with its error first


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``generate`` and ``serve`` take for several workers, and --no-decode-overlap (the decode
    overlap lives with the launch flags: it is how one stream uses the devices it has)."""
    parser.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                        help="worker processes (one GPU each with --device cuda) for one stream: each transformer "
                             "step is split over them by tokens (Ulysses); the heads (24) must divide by N, or "
                             "by N/2 with --cfg-parallel (default 1: one process)")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="with real CFG, run the two guidance branches on two halves of the N workers")
    parser.add_argument("--parallel-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="a worker waiting longer than this on another (dead or hung) ends the run with an error")
    parser.add_argument("--no-decode-overlap", action="store_true",
                        help="decode each section after it samples instead of beside the next one's sampling "
                             "(on by default, except with --low-vram: see README, decode overlap)")


def launch_device(device: str) -> str:
    """generate's --device as the launcher takes it: "cuda" (worker r on cuda:r) or "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device}: with several workers each takes its own GPU (cuda:0 ... cuda:N-1); "
                         "give --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
    return device


def run_parallel(args: argparse.Namespace, world_size: int, cfg_parallel: bool, device: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """``generate`` (its parsed arguments) on ``world_size`` workers; rank 0 writes ``args.out``."""
    from framepack_rt.commands.generate import validate

    validate(args)
    refuse_unsupported(args.teacache, args.low_vram)
    config = LaunchConfig(world_size, cfg_parallel, launch_device(device), timeout_s)
    began = time.perf_counter()
    frames = launch(generate_worker, config, args)
    if frames is not None:  # rank 0 (under torchrun, the other ranks return None)
        print(f"wrote {args.out}: {frames} frames ({frames / FPS:.2f} s at {FPS} fps) in "
              f"{time.perf_counter() - began:.1f} s on {world_size} workers")
    return 0


def refuse_unsupported(teacache: float | None, low_vram: bool) -> None:
    """What several workers cannot do yet, refused before any process starts (ValueError)."""
    if teacache is not None:
        raise ValueError("--teacache cannot run with --sequence-parallel / --cfg-parallel yet (each worker would "
                         "decide on its own shard of tokens whether to skip a step): leave one out")
    if low_vram:
        raise ValueError("--low-vram streams blocks on one device: with several workers each holds 1/N of the work "
                         "but all of the weights; leave --low-vram out")


def serve_parallel(args: argparse.Namespace, settings: Any) -> int:
    """``framepack-rt serve`` on ``args.sequence_parallel`` workers; returns when the server stops."""
    settings = parallel_serve_settings(settings, announce=lambda line: print(line, flush=True))
    config = LaunchConfig(args.sequence_parallel, args.cfg_parallel, launch_device(args.device),
                          args.parallel_timeout)
    launch(serve_worker, config, settings, args.host, args.port, config.timeout_s)
    return 0


def parallel_serve_settings(settings: Any, announce: Callable[[str], None]) -> Any:
    """``settings`` as a server on several workers runs them (ValueError for what they cannot do yet). Sessions
    take turns on the device worker: continuous batching packs StepPlans the workers do not share (turned off)."""
    refuse_unsupported(settings.teacache, settings.low_vram)
    if getattr(settings, "loras", ()):
        raise ValueError("--lora with --sequence-parallel or --cfg-parallel is not supported yet (a session's live "
                         "LoRA scales would change rank 0's weights only): run on one worker")
    if getattr(settings, "batching", False):
        announce("framepack-rt serve: several workers: sessions take turns (continuous batching is off)")
        settings = dataclasses.replace(settings, batching=False)
    return settings


def serve_worker(world: ParallelWorld, settings: Any, host: str, port: int, timeout_s: float,
                 media_hosts: list[str] | None = None) -> None:
    """One worker of ``serve``: rank 0 serves until stopped (SIGINT, SIGTERM, or the world breaking), the
    others follow its transformer calls. ``timeout_s``: the collective timeout (sets the keepalive);
    ``media_hosts``: where viewers' connections go when not ``host`` (a cluster replica's world)."""
    import asyncio

    from framepack_rt.model.parallel import check_world
    from framepack_rt.stream.server import load_pipeline, serve

    settings = dataclasses.replace(settings, device=str(world.device))
    pipe = load_pipeline(settings)
    transformer = pipe.parts.transformer()
    check_world(transformer.config.num_attention_heads, world.sp_size)
    if world.rank != 0:
        print(f"framepack-rt serve: worker {world.rank} of {world.world_size} (pid {os.getpid()}) follows rank 0",
              flush=True)
        follow(transformer, world)
        return
    failures: list[BaseException] = []

    def stop_serving(exc: BaseException) -> None:
        """The world broke: stop the server in STOP_DELAY_S. Meanwhile every session that asks for a section
        (those waiting for buffer room do within a section's playing time) fails with the error, which its
        viewers are sent; the others are closed as the server shuts down."""
        failures.append(exc)
        threading.Timer(STOP_DELAY_S, os.kill, (os.getpid(), signal.SIGTERM)).start()

    print(f"framepack-rt serve: {world.world_size} workers, rank 0 (pid {os.getpid()}) serves and decodes",
          flush=True)
    every_s = min(KEEPALIVE_MAX_S, timeout_s / 4)
    with DistributedTransformer(transformer, world, on_broken=stop_serving) as proxy, Keepalive(proxy, every_s):
        served = with_transformer(pipe, proxy)
        asyncio.run(serve(settings, host, port, announce=lambda line: print(line, flush=True),
                          load=lambda: served, media_hosts=media_hosts))
    if failures:
        raise failures[0]


def generate_worker(world: ParallelWorld, args: argparse.Namespace) -> int | None:
    """One worker: rank 0 generates and writes (returns the frame count), the others follow (return None)."""
    from framepack_rt.model.parallel import check_world
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    pipe = FramePackPipeline.from_pretrained(args.model, device=world.device, dtype=args.dtype,
                                             quantize=args.quantize, compile=args.compile, decoder=args.decoder)
    transformer = pipe.parts.transformer()
    check_world(transformer.config.num_attention_heads, world.sp_size)
    if world.rank != 0:
        follow(transformer, world)
        return None
    from framepack_rt.commands.generate import write_video

    with DistributedTransformer(transformer, world) as proxy:
        return write_video(with_transformer(pipe, proxy), args)


def build_parser() -> argparse.ArgumentParser:
    """generate's flags and the parallel ones (added once: generate may already carry them)."""
    from framepack_rt.commands import generate

    parser = argparse.ArgumentParser(prog="python -m framepack_rt.commands.parallel",
                                     description="framepack-rt generate on several worker processes")
    generate.add_arguments(parser)
    if not any(action.dest == "sequence_parallel" for action in parser._actions):
        add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m framepack_rt.commands.parallel --sequence-parallel N [--cfg-parallel] <generate's flags>``
    (also under torchrun), until ``framepack-rt generate`` takes the flags itself."""
    from framepack_rt.pipeline.parallel_launch import WorkerFailed

    args = build_parser().parse_args(argv)
    try:
        return run_parallel(args, args.sequence_parallel, args.cfg_parallel, args.device, args.parallel_timeout)
    except ValueError as exc:
        print(f"framepack-rt generate: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:
        print(f"framepack-rt generate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
