"""The ``framepack-rt`` command. Bad arguments give one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def _load_transformer(spec: str):
    import torch

    from framepack_rt.model.config import PRESETS
    from framepack_rt.model.transformer import FramePackTransformer

    if spec in PRESETS:
        # The 13B preset is only described (meta device): random 13B weights would need 51 GB of RAM.
        device = "meta" if spec == "framepack-13b" else "cpu"
        return FramePackTransformer.from_config(spec, device=device)
    if spec == "demo":
        from framepack_rt import demo

        spec = str(demo.weights_dir() / "transformer")
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"--model {spec}: not a preset ({', '.join(PRESETS)}) and not a folder")
    return FramePackTransformer.from_pretrained(path, dtype=torch.bfloat16)


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a transformer; for a model with real weights, time one forward pass."""
    import torch

    model = _load_transformer(args.model)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    print(f"model        {args.model}")
    print(f"parameters   {params:,}")
    print(f"blocks       {cfg.num_layers} double-stream + {cfg.num_single_layers} single-stream, "
          f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}")
    if model.device.type == "meta":
        return 0
    height, width = args.latent_size
    inputs = _example_inputs(cfg, height, width, model.dtype)
    with torch.no_grad():
        model(**inputs)  # warm-up
        start = time.perf_counter()
        out = model(**inputs)
        elapsed = time.perf_counter() - start
    print(f"forward      {elapsed * 1000:.1f} ms for latents {tuple(out.shape)} on {model.device}")
    return 0


def _example_inputs(cfg, height: int, width: int, dtype) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 9, height, width, generator=g).to(dtype),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 16, cfg.text_embed_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype),
        image_embeds=torch.randn(1, 16, cfg.image_proj_dim, generator=g).to(dtype),
        guidance=torch.tensor([10_000.0]),
        indices_latents=torch.arange(20, 29),
        latents_clean=torch.randn(1, cfg.in_channels, 2, height, width, generator=g).to(dtype),
        indices_latents_clean=torch.tensor([0, 19]),
        latents_history_2x=torch.randn(1, cfg.in_channels, 2, height, width, generator=g).to(dtype),
        indices_latents_history_2x=torch.tensor([17, 18]),
        latents_history_4x=torch.randn(1, cfg.in_channels, 16, height, width, generator=g).to(dtype),
        indices_latents_history_4x=torch.arange(1, 17),
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


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

    from framepack_rt.stream import options
    from framepack_rt.stream.server import ServerSettings, serve

    settings = ServerSettings(model=args.model, fps=args.fps, window=args.window, steps=args.steps,
                              teacache=args.teacache, cfg=args.cfg, buffer_seconds=args.buffer, stamp=args.stamp,
                              **options.settings_kwargs(args))
    try:
        asyncio.run(serve(settings, args.host, args.port, announce=lambda line: print(line, flush=True)))
    except (OSError, RuntimeError) as exc:  # port taken, pipeline missing: one line, not a traceback
        raise UsageError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack-rt", description="Real-time FramePack video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a transformer and time one forward pass")
    info.add_argument("--model", default="tiny", help="tiny | demo | framepack-13b | PATH to a transformer folder")
    info.add_argument("--latent-size", type=_latent_size, default=(12, 12), help="latent HxW (image / 8)")
    info.set_defaults(run=cmd_info)

    from framepack_rt.commands import generate
    from framepack_rt.stream import DEFAULT_MODEL

    gen = sub.add_parser("generate", help="write an MP4 from a start image and a prompt")
    generate.add_arguments(gen, default_model=DEFAULT_MODEL)
    gen.set_defaults(run=generate.run)

    serve = sub.add_parser("serve", help="stream live generation to browsers over WebRTC")
    serve.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or PATH (default: {DEFAULT_MODEL})")
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
    from framepack_rt.stream import options

    options.add_arguments(serve)  # limits and --token
    serve.set_defaults(run=cmd_serve)

    from framepack_rt.bench import latency as bench

    bench_cmd = sub.add_parser("bench", help="measure streaming latency end to end (see benchmarks/latency.py)")
    bench.add_arguments(bench_cmd)
    bench_cmd.set_defaults(run=bench.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"framepack-rt {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
