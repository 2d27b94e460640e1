"""The ``framepack-rt`` command. Bad arguments give one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a transformer; for a model with weights on a device, time one forward pass."""
    from framepack_rt.commands import transformer_step as steps
    from framepack_rt.pipeline import devices, memory

    placement = devices.resolve_placement(args.device, args.dtype)
    if args.model == "tiny":
        placement = devices.fp32_only(placement)
    try:
        config = steps.model_config(args.model)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    # The 13B preset is described on the meta device on the CPU (random 13B weights would need 48 GiB of RAM);
    # on a GPU that holds it, it gets random weights made on the device, to time a step.
    skipped = None
    if args.model == "framepack-13b" and placement.device.type != "cpu":
        meta = steps.load_transformer(args.model, placement, random_on_device=False)
        estimate = memory.with_free_memory(memory.estimate_parts({"transformer": memory.count_module(meta)}, placement))
        if estimate.fits() is False:
            skipped = f"the random weights {estimate.summary()}"
    model = steps.load_transformer(args.model, placement, random_on_device=skipped is None)
    params = sum(p.numel() for p in model.parameters())
    print(f"model        {args.model}")
    print(f"parameters   {params:,}")
    print(f"blocks       {config.num_layers} double-stream + {config.num_single_layers} single-stream, "
          f"{config.num_attention_heads} heads x {config.attention_head_dim}")
    if args.resolution is not None:  # the memory plan (model/memory_plan.py) instead of a timed forward
        from framepack_rt.model.memory_plan import plan_for_resolution

        try:
            print(plan_for_resolution(config, args.resolution, window=args.window, quantize=args.quantize,
                                      budget_gb=args.memory_budget_gb, dtype=placement.compute_dtype))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return 0
    if next(model.parameters()).device.type == "meta":
        if skipped:
            print(f"forward      skipped: {skipped}")
        return 0
    height, width = args.latent_size or info_latent_size(args.model)
    shapes = steps.StepShapes(height, width, steps.SMALL_TOKENS, steps.SMALL_TOKENS, steps=1)
    inputs = steps.example_inputs(config, shapes, placement.device, placement.compute_dtype)
    ms, out = steps.time_forward(model, inputs)
    print(f"forward      {ms:.1f} ms for latents {tuple(out.shape)} on {placement.describe()}")
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def info_latent_size(model: str) -> tuple[int, int]:
    """The latent size info times a forward at without --latent-size: the built-in sets' own (the demo's 96x96
    frames: 12x12), else 12x12 (a folder's real 640 bucket would take minutes on a CPU)."""
    from framepack_rt.commands import transformer_step as steps
    from framepack_rt.pipeline.builtin import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        shapes = steps.shapes_for(model)
        return shapes.latent_height, shapes.latent_width
    return 12, 12


def _latent_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 12x12") from None
    if h <= 0 or w <= 0 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: latent height and width must be positive and even")
    return h, w


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve live generation over WebRTC until Ctrl-C / SIGTERM: the page at the printed URL."""
    import asyncio

    from framepack_rt.commands import lora_flags
    from framepack_rt.pipeline import devices
    from framepack_rt.stream import options
    from framepack_rt.stream.server import ServerSettings, serve

    options.configure_logging(args)  # --log-level: sessions, rejections (stream/logs.py)
    devices.check_memory_flags(args.low_vram, args.memory_budget_gb)
    settings = ServerSettings(model=args.model, fps=args.fps, window=args.window, steps=args.steps,
                              teacache=args.teacache, cfg=args.cfg, buffer_seconds=args.buffer, stamp=args.stamp,
                              device=args.device, dtype=args.dtype, low_vram=args.low_vram,
                              memory_budget_gb=args.memory_budget_gb, quantize=args.quantize, compile=args.compile,
                              decoder=args.decoder, loras=lora_flags.specs(args), fuse_lora=args.fuse_lora,
                              decode_overlap=False if args.no_decode_overlap else None,
                              **options.settings_kwargs(args))
    if args.cluster == "ray":  # many replicas on Ray Serve (stream/cluster.py)
        from framepack_rt.stream import cluster

        try:
            return cluster.serve_cluster(settings, cluster.settings_from(args), args.host, args.port,
                                         announce=lambda line: print(line, flush=True))
        except (ImportError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    if args.sequence_parallel > 1 or args.cfg_parallel:  # several worker processes (commands/parallel.py)
        from framepack_rt.commands.parallel import serve_parallel

        return serve_parallel(args, settings)
    try:
        asyncio.run(serve(settings, args.host, args.port, announce=lambda line: print(line, flush=True)))
    except (OSError, RuntimeError) as exc:  # port taken, pipeline missing: one line, not a traceback
        raise UsageError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack-rt", description="Real-time FramePack video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a transformer and time one forward pass")
    from framepack_rt.commands import model_flag

    model_flag.add_argument(info, presets=True)  # a PATH here may also be a transformer folder alone
    info.add_argument("--latent-size", type=_latent_size, default=None,
                      help="latent HxW (image / 8; default: the built-in models' own frame size, else 12x12)")
    info.add_argument("--resolution", type=int, metavar="PX",
                      help="print the memory plan at PX x PX pixels (weights, activations, buffers, VAE tiles)")
    info.add_argument("--window", type=int, default=9, help="latent frames per section, for the plan (default: 9)")
    info.add_argument("--quantize", choices=["fp8"], default=None, help="plan with fp8 block weights")
    info.add_argument("--memory-budget-gb", type=_positive_float, metavar="GB",
                      help="plan what stays resident and what streams within this device budget")
    from framepack_rt.pipeline import devices

    devices.add_arguments(info)
    info.set_defaults(run=cmd_info)

    from framepack_rt.commands import doctor, generate

    doctor_cmd = sub.add_parser("doctor", help="versions, device, kernel checks, attention, a timed step, memory: "
                                               "run first on a new GPU")
    doctor.add_arguments(doctor_cmd)
    doctor_cmd.set_defaults(run=doctor.run)

    gen = sub.add_parser("generate", help="write an MP4 from a start image and a prompt")
    generate.add_arguments(gen)
    gen.set_defaults(run=generate.run)

    serve = sub.add_parser("serve", help="stream live generation to browsers over WebRTC")
    model_flag.add_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8188, help="port (default: 8188; 0 picks a free one)")
    serve.add_argument("--fps", type=float, default=30.0, help="playback frame rate (default: 30)")
    serve.add_argument("--window", type=int, default=9, help="latent frames per section (default: 9)")
    serve.add_argument("--steps", type=int, default=None, help="sampling steps per section (default: the model's)")
    serve.add_argument("--teacache", type=float, default=None, metavar="THRESH",
                       help="TeaCache threshold, e.g. 0.15 (default: off)")
    serve.add_argument("--cfg", type=_positive_float, default=None, metavar="SCALE",
                       help="real classifier-free guidance scale, 1 = off (default: the model's; demo 2)")
    serve.add_argument("--buffer", type=float, default=2.0, metavar="SECONDS",
                       help="most generated video waiting to be played, bounding the delay (default: 2)")
    serve.add_argument("--stamp", action="store_true",
                       help="stamp frame numbers into the top rows, for `framepack-rt bench --url` glass-to-glass")
    from framepack_rt.commands import threads

    threads.add_argument(serve)  # --threads N
    devices.add_arguments(serve, memory=True)
    devices.add_decoder_argument(serve)
    from framepack_rt.commands import parallel

    parallel.add_arguments(serve)  # --sequence-parallel N, --cfg-parallel, --parallel-timeout, --no-decode-overlap
    from framepack_rt.stream import options

    options.add_arguments(serve)  # limits and --token
    from framepack_rt.commands import lora_flags

    lora_flags.add_arguments(serve)  # --lora FILE[:SCALE], --fuse-lora
    from framepack_rt.stream import cluster

    cluster.add_arguments(serve)  # --cluster ray, --replicas N, autoscaling bounds
    serve.set_defaults(run=cmd_serve)

    from framepack_rt.bench import latency as bench

    bench_cmd = sub.add_parser("bench", help="measure streaming latency end to end (see benchmarks/latency.py)")
    bench.add_arguments(bench_cmd)
    bench_cmd.set_defaults(run=bench.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' "Loading weights" bars, one per encoder on every run (read when transformers is imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from framepack_rt.commands import threads
    from framepack_rt.pipeline.parallel_launch import WorkerFailed

    parser = build_parser()
    args = parser.parse_args(argv)
    threads.apply(getattr(args, "threads", None))
    try:
        return args.run(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"framepack-rt {args.command}: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # --sequence-parallel: a worker died or timed out (its rank is named)
        print(f"framepack-rt {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
